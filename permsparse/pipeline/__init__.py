"""``permsparse optimize``: the pipeline, its configuration, its steps and their engines.

    run.py        optimize(): the plain list of steps, and OptimizeResult
    config.py     OptimizeConfig (what the user asks) -> resolve() -> ResolvedConfig (typed stage configs, every
                  default decided once, model-dependent ones included)
    read.py       load, probe, analyze, model facts                       (reads only)
    learn.py      calibration, permutations per weight or block by block  (blockwise/: the block-wise engine)
    problems.py   a plan's units -> permutation problems -> a method's solution (solver, checkpoint store)
    fold.py       fold the permutations; postcondition: the permuted dense graph equals the input
    save.py       masks / rebuilt weights, provenance, atomic write; postcondition: every pruned weight N:M
    recipe.py     the ``<output>.recipe.json`` written after a run, and its replay
    evaluate.py   held-out quality of the written model against plain N:M (``--report``)

Names are loaded lazily, so ``from permsparse.pipeline.config import METHODS`` stays light.
"""

from __future__ import annotations

from typing import Any

_LAZY = {
    "optimize": "permsparse.pipeline.run",
    "OptimizeResult": "permsparse.pipeline.run",
    "OptimizeConfig": "permsparse.pipeline.config",
    "ResolvedConfig": "permsparse.pipeline.config",
    "resolve": "permsparse.pipeline.config",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'permsparse.pipeline' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = list(_LAZY)

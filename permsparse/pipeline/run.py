"""``optimize``: the whole job as a plain list of steps, each a function from declared inputs to a typed result.

    load → probe → analyze → resolve the config (model-dependent defaults) → [block-wise: calibrate, learn,
    reconstruct, tune | calibrate → learn] → fold (postcondition: permuted dense == input) → mask + save
    (postcondition: every pruned weight N:M) → recipe

Recovery (``config.recover``) and the held-out evaluation (``config.evaluate``) run after this, on the written model,
in :func:`permsparse.api.optimize`.

The promises: the input's files are never written (the output may not be one of them), the output location is
checked before any work, the output is written atomically, and a model whose permuted dense graph is not equal to the
input, or whose masks are not N:M, is never written.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from permsparse.ir.compare import Equivalence
from permsparse.ir.save import work_dir
from permsparse.passes.analysis import Plan
from permsparse.passes.fold import FoldResult, UnitPlan
from permsparse.passes.sparsify import MaskStats
from permsparse.pipeline import read
from permsparse.pipeline.config import (
    CALIBRATED_IMPORTANCES,
    OptimizeConfig,
    ResolvedConfig,
    resolve,
)
from permsparse.pipeline.fold import fold
from permsparse.pipeline.learn import calibrate, learn, learn_blockwise
from permsparse.pipeline.problems import UnitReport, open_solver
from permsparse.pipeline.save import mask_and_save

log = logging.getLogger(__name__)


@dataclass
class OptimizeResult:
    """Everything ``optimize`` did: the resolved config, the plan, the units and their reports, the fold, the checks
    and timings."""

    config: ResolvedConfig
    plan: Plan
    units: UnitPlan
    unit_reports: list[UnitReport]
    fold: FoldResult
    equivalence: Equivalence
    masks: list[MaskStats]
    nm_valid: dict[str, bool]
    selected: list[str]
    perms: dict[str, np.ndarray] = field(default_factory=dict)
    x_norms: dict[str, np.ndarray] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    output: Path | None = None
    model: onnx.ModelProto | None = None  # the written model (None for big models streamed to disk)
    quality: dict[str, dict] = field(default_factory=dict)  # filled by the API's ``--report`` evaluation
    input_sha256: str = ""
    block_reports: list = field(default_factory=list)  # block-wise runs: output error of each block
    recovery: dict | None = None  # what recovery did (``OptimizeConfig.recover``), filled by the API after the pipeline


def optimize(src: str | Path, dst: str | Path | None, config: OptimizeConfig | None = None) -> OptimizeResult:
    """Run the whole pipeline on ``src`` and (unless ``dst`` is None) write the result to ``dst``.

    Big models (weights in an external data file) are never held twice: weights are read memory-mapped when a step
    needs them, permuted weights are spilled to a temporary data file, and masks are applied while the output is
    streamed to disk one tensor at a time.
    """
    given = config or OptimizeConfig()
    src, dst = Path(src), Path(dst) if dst is not None else None
    cfg = resolve(given)  # bad options fail before any work
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    @contextmanager
    def stage(name: str) -> Iterator[None]:
        t = time.perf_counter()
        log.info("%s ...", name)
        yield
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - t
        log.info("%s done in %.1f s", name, timings[name])

    with stage("load"):
        source = read.load(src, dst)
    with stage("probe"):
        shapes = read.probe_shapes(source, cfg.check, cfg.seed)
    with stage("analyze"):
        analysis = read.analyze(source, shapes, cfg.mask, cfg.permutation.policy)
        facts, _ = read.model_facts(source, analysis, find_blocks=False)
        blocks = None
        if resolve(given, facts).blockwise:  # after the defaults that follow the input kind
            facts, blocks = read.model_facts(source, analysis, find_blocks=True)
        cfg = resolve(given, facts)
    for level, note in cfg.notes:
        getattr(log, level)("%s", note)
    with work_dir(dst.parent if dst is not None else None, "optimize") as work, \
            open_solver(cfg.permutation.cluster, cfg.permutation.work_dir, cfg.permutation.workers) as solver:
        if cfg.blockwise:
            with stage("block-wise"):
                learned = learn_blockwise(source, analysis, blocks, cfg, solver, work)
        else:
            x_norms: dict[str, np.ndarray] = {}
            if cfg.mask.importance in CALIBRATED_IMPORTANCES:
                with stage("calibrate"):
                    x_norms = calibrate(source, analysis.plan, cfg)
            with stage("learn"):
                learned = learn(analysis, x_norms, cfg, solver)
        with stage("fold"):
            folded = fold(source, analysis, learned.perms, cfg, work)
        with stage("mask+save"):
            saved = mask_and_save(source, analysis, folded, learned, cfg, dst)
    result = OptimizeResult(
        cfg, analysis.plan, analysis.units, learned.reports, folded.fold, folded.equivalence, saved.masks,
        {st.weight: st.valid for st in saved.masks}, analysis.plan.prunable, learned.perms, learned.x_norms, timings,
        dst, saved.model, input_sha256=source.digest,
        block_reports=learned.blockwise.block_reports if learned.blockwise is not None else [],
    )
    if dst is not None:
        from permsparse.pipeline.recipe import write_recipe

        write_recipe(result, src, dst)
    timings["total"] = time.perf_counter() - t0
    return result


__all__ = ["OptimizeConfig", "OptimizeResult", "ResolvedConfig", "optimize"]

"""The public Python API: one function per verb, each taking a frozen config (``None`` fields mean the default).

    import permsparse
    result = permsparse.optimize("model.onnx", "model.sparse.onnx", permsparse.OptimizeConfig(importance="wanda"))
    print(result.equivalence.max_rel_error, sum(result.nm_valid.values()))
    info = permsparse.inspect("model.sparse.onnx")
    print(info.n_valid, "of", len(info.weights), "weights are 2:4")
    again = permsparse.replay("model.onnx", "again.sparse.onnx", "model.sparse.recipe.json")  # no learning

The command line (:mod:`permsparse.cli`) is a thin layer over these functions. Heavy packages (torch, onnxruntime,
tensorrt) are imported only when a function runs.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from permsparse.inspection import InspectConfig
from permsparse.pipeline.config import OptimizeConfig

if TYPE_CHECKING:
    from permsparse.inspection import InspectResult
    from permsparse.pipeline import OptimizeResult
    from permsparse.recover import RecoverConfig, RecoverResult
    from permsparse.runtime.bench import BenchConfig, BenchResult
    from permsparse.runtime.trt import BuildConfig, BuildReport

PathLike = str | os.PathLike[str]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportConfig:
    """Settings of ``permsparse export``; ``None`` means the default (dynamo exporter, tiny preset, seed 0)."""

    exporter: str | None = None
    size: str | None = None
    seed: int | None = None
    hf_dir: str | None = None
    dtype: str | None = None


def optimize(model: PathLike, output: PathLike | None, config: OptimizeConfig | None = None, *,
             recipe: PathLike | None = None) -> OptimizeResult:
    """Analyze, calibrate, learn permutations, fold, mask, verify and write ``output`` (see :mod:`permsparse.pipeline`).

    ``recipe``: a ``<output>.recipe.json`` of an earlier run; its permutations are replayed instead of learned and its
    options are used where ``config`` leaves them ``None`` (:func:`replay`).
    """
    from permsparse.data.kinds import model_file

    model = model_file(model)  # an export folder: its model.onnx (tokenizer beside it)
    if recipe is not None:
        return replay(model, output, recipe, config)
    _sweep_stale_temp()
    return _run(model, output, config or OptimizeConfig())


def replay(model: PathLike, output: PathLike | None, recipe: PathLike, config: OptimizeConfig | None = None
           ) -> OptimizeResult:
    """Make ``output`` from ``model`` with the options and permutations recorded in ``recipe`` (no learning).

    Options given in ``config`` win over the recorded ones, except those that decide the permutation units (policy,
    pattern, prune_head, exclude), which must agree with the recipe (:func:`permsparse.pipeline.recipe.replay_config`).
    """
    from permsparse.data.kinds import model_file
    from permsparse.pipeline.recipe import check_input, read_recipe, replay_config

    model = model_file(model)
    doc = read_recipe(recipe)
    cfg = replay_config(doc, config)
    cfg.resolved()  # contradictions fail here, before any work
    _sweep_stale_temp()
    result = _run(model, output, cfg)
    check_input(doc, result.input_sha256, model)
    return result


def _run(model: PathLike, output: PathLike | None, config: OptimizeConfig) -> OptimizeResult:
    """The pipeline, then (``config.recover``) recovery and (``config.evaluate``) the held-out evaluation of the
    written model.

    Both run after the model and its recipe are written, so an interrupt there must not say "nothing written": it
    raises :class:`~permsparse.errors.Interrupted` (exit 130) naming the files that stay.
    """
    from dataclasses import replace

    from permsparse.pipeline import optimize as run

    result = run(model, output, replace(config, evaluate=False))
    if output is None or not result.config.mask.apply:
        return result
    out = Path(output)
    if result.config.recover is not None:
        from permsparse.recover.stage import recover_output

        log.info("recover ...")
        with _after_write(result, "recover", "recovery", out, "recovery did not change them"):
            result.recovery = recover_output(Path(model), out, result.config)
    if config.evaluate:
        from permsparse.ir.save import work_dir
        from permsparse.pipeline.evaluate import HELDOUT_SAMPLES, evaluate_quality

        log.info("report: measuring plain %s and the result against the dense model on %d held-out examples ...",
                 result.config.pattern, HELDOUT_SAMPLES)
        with _after_write(result, "evaluate", "the --report evaluation", out, "no report was written"), \
                work_dir(out.parent, "evaluate") as work:
            result.quality = evaluate_quality(Path(model), out, result, work)
    return result


@contextmanager
def _after_write(result: OptimizeResult, stage: str, what: str, out: Path, unchanged: str) -> Iterator[None]:
    """Time a stage that runs on the written model; an interrupt says which files stay (written and checked)."""
    import time

    from permsparse.errors import Interrupted
    from permsparse.pipeline.recipe import recipe_path

    t = time.perf_counter()
    try:
        yield
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted during {what}: {out} and {recipe_path(out).name} were written (complete and "
                          f"checked); {unchanged}") from None
    result.timings[stage] = time.perf_counter() - t
    result.timings["total"] = result.timings.get("total", 0.0) + result.timings[stage]
    log.info("%s done in %.1f s", "report: evaluation" if stage == "evaluate" else stage, result.timings[stage])


def _sweep_stale_temp() -> None:
    """Remove the solver's temporary folders left in $TMPDIR by runs that were killed (their process is gone)."""
    import tempfile

    from permsparse.optimizer.solve import _sweep_stale

    _sweep_stale(Path(tempfile.gettempdir()))


def inspect(model: PathLike, config: InspectConfig | None = None) -> InspectResult:
    """Weights, closures, fold status and N:M validity of every weight of ``model`` (read-only)."""
    from permsparse.data.kinds import model_file
    from permsparse.inspection import inspect_model

    return inspect_model(model_file(model), config)


def build(model: PathLike, engine: PathLike, config: BuildConfig | None = None) -> BuildReport:
    """A TensorRT / TensorRT-RTX engine with sparse weights, and which layers can run sparse."""
    from permsparse.runtime.trt import build_engine

    return build_engine(model, engine, config)


def bench(sparse: PathLike, dense: PathLike, config: BenchConfig | None = None) -> BenchResult:
    """Latency of ``sparse`` vs ``dense`` on onnxruntime, torch (GPU) or TensorRT (GPU)."""
    from permsparse.runtime.bench import run_bench

    return run_bench(sparse, dense, config)


def recover(sparse: PathLike, dense: PathLike, output: PathLike, config: RecoverConfig | None = None) -> RecoverResult:
    """Distil the sparse model from its dense teacher with the masks frozen and write ``output``
    (see :mod:`permsparse.recover`)."""
    from permsparse.recover import recover as run

    return run(sparse, dense, output, config)


def export(name: str, output: PathLike, config: ExportConfig | None = None) -> Path:
    """Export a built-in model (``minilm`` real weights, seeded ``vit``/``llama``) or a local HF checkpoint (``hf``)."""
    from permsparse.models.zoo import export_model

    cfg = config or ExportConfig()
    return export_model(name, output, exporter=cfg.exporter or "dynamo", size=cfg.size or "tiny",
                        seed=cfg.seed or 0, hf_dir=cfg.hf_dir, dtype=cfg.dtype or "float32")

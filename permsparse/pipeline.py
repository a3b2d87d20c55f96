"""``optimize``: the whole job as a plain list of steps (:mod:`permsparse.steps`).

    load (paths checked first) → probe shapes → analyze → [block-wise: calibrate, learn, reconstruct, tune
    | calibrate → learn] → fold → verify (dense) → mask / place reconstructed weights → check N:M → save
    (+ provenance) → recipe → (evaluate)

The promises: the input's files are never written (the output may not be one of them), the output location is
checked before any work, the output is written atomically, and a model whose permuted dense graph is not equal to the
input, or whose masks are not N:M, is never written.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from permsparse import steps
from permsparse.config import CALIBRATED_IMPORTANCES, OptimizeConfig
from permsparse.ir.compare import Equivalence
from permsparse.ir.save import work_dir
from permsparse.learn import UnitReport, open_solver
from permsparse.passes.analysis import Plan
from permsparse.passes.fold import FoldResult, UnitPlan
from permsparse.passes.sparsify import MaskStats

log = logging.getLogger(__name__)


@dataclass
class OptimizeResult:
    """Everything ``optimize`` did: the plan, the units and their reports, the fold, the checks and timings."""

    config: OptimizeConfig
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
    quality: dict[str, dict] = field(default_factory=dict)  # filled by ``evaluate`` when asked
    input_sha256: str = ""
    block_reports: list = field(default_factory=list)  # block-wise runs: output error of each block
    recovery: dict | None = None  # what recovery did (``OptimizeConfig.recover``), see permsparse.recover.stage


def optimize(src: str | Path, dst: str | Path | None, config: OptimizeConfig | None = None) -> OptimizeResult:
    """Run the whole pipeline on ``src`` and (unless ``dst`` is None) write the result to ``dst``.

    Big models (weights in an external data file) are never held twice: weights are read memory-mapped when a step
    needs them, permuted weights are spilled to a temporary data file, and masks are applied while the output is
    streamed to disk one tensor at a time.
    """
    given = config or OptimizeConfig()
    run = steps.Run(Path(src), Path(dst) if dst is not None else None, given.resolved())
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    @contextmanager
    def stage(name: str):
        t = time.perf_counter()
        log.info("%s ...", name)
        yield
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - t
        log.info("%s done in %.1f s", name, timings[name])

    with stage("load"):
        steps.load(run)
    with stage("probe"):
        steps.probe_shapes(run)
    with stage("analyze"):
        steps.analyze_graph(run)
    steps.fit_defaults(run, given)
    with work_dir(run.dst.parent if run.dst is not None else None, "optimize") as run.work, \
            open_solver(run.cfg.cluster, run.cfg.work_dir, run.cfg.workers) as run.solver:
        if steps.use_blockwise(run, given):
            with stage("block-wise"):
                steps.blockwise(run)
        else:
            if run.cfg.importance in CALIBRATED_IMPORTANCES:
                with stage("calibrate"):
                    steps.calibrate(run)
            with stage("learn"):
                run.perms = steps.learn(run)
        with stage("fold"):
            steps.fold(run)
        with stage("verify"):
            steps.verify(run)
        with stage("mask+save"):
            steps.save(run)
    result = OptimizeResult(
        run.cfg, run.plan, run.units, run.reports, run.fold, run.equivalence, run.masks,
        {st.weight: st.valid for st in run.masks}, run.plan.prunable, run.perms, run.x_norms, timings, run.dst,
        None if run.external else run.out_model, input_sha256=run.digest,
        block_reports=run.blockwise.block_reports if run.blockwise is not None else [],
    )
    if run.dst is not None:
        from permsparse.recipe import write_recipe

        write_recipe(result, run.src, run.dst)
        if run.cfg.recover is not None and run.cfg.mask:
            from permsparse.recover.stage import recover_output

            with stage("recover"):
                result.recovery = recover_output(run.src, run.dst, run.cfg)
        if run.cfg.evaluate and run.cfg.mask:
            from permsparse.evaluate import evaluate_quality

            with stage("evaluate"), work_dir(run.dst.parent, "evaluate") as work:
                result.quality = evaluate_quality(run.src, run.dst, result, work)
    timings["total"] = time.perf_counter() - t0
    return result


__all__ = ["OptimizeConfig", "OptimizeResult", "optimize"]

"""The learning steps of ``optimize``: calibration, then every unit's permutation — per weight, or block by block with
reconstructed weights (:mod:`permsparse.pipeline.blockwise`) — or the permutations a recipe recorded.

    calibrate(source, plan, cfg, weights)                       -> {tensor: ‖X_k‖₂}
    learn(analysis, x_norms, cfg, solver)                       -> Learned
    learn_blockwise(source, analysis, blocks, cfg, solver, work) -> Learned (with the rebuilt weights)
    replay(units, recipe_perms)                                 -> {unit: perm}

Invariant: every returned permutation is a permutation of its unit's K channels that keeps each channel inside its
block of ``u.block`` channels (a recipe's are checked here, learned ones are so by construction), so the fold pass can
apply it to every member of the unit.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from permsparse.errors import PermsparseError
from permsparse.ir.graph import const_index
from permsparse.optimizer.importance import masking_score
from permsparse.passes.analysis import Plan
from permsparse.passes.fold import UnitPlan
from permsparse.pipeline.config import CALIBRATED_IMPORTANCES, ResolvedConfig
from permsparse.pipeline.problems import Solver, UnitReport
from permsparse.pipeline.read import Analysis, Source, partition_of

if TYPE_CHECKING:
    from permsparse.passes.blocks import BlockPlan
    from permsparse.pipeline.blockwise.engine import BlockwiseResult

log = logging.getLogger(__name__)


@dataclass
class Learned:
    """Every unit's permutation, the solver's reports, the calibration norms used, and (block-wise runs) the
    engine's result with the rebuilt weights and each block's output error."""

    perms: dict[str, np.ndarray]
    reports: list[UnitReport] = field(default_factory=list)
    x_norms: dict[str, np.ndarray] = field(default_factory=dict)
    blockwise: BlockwiseResult | None = None


def calibration_feeds(src: Path, cfg: ResolvedConfig):
    """The calibration batches of ``cfg`` for model ``src`` (one definition for every calibration path)."""
    from permsparse.data.feeds import make_feeds

    c = cfg.calibration
    return make_feeds(src, c.source, samples=c.samples, batch_size=8, seq_len=c.seq_len, tokenizer_dir=c.tokenizer,
                      seed=cfg.seed)


def input_norms(src: Path, names: list[str], cfg: ResolvedConfig, progress: bool | None = None
                ) -> dict[str, np.ndarray]:
    """‖X_k‖₂ of the tensors ``names`` of model ``src`` over the calibration data of ``cfg`` (onnxruntime)."""
    from permsparse.data.calibration import CalibrationConfig, collect_activation_stats

    stats = collect_activation_stats(src, names, calibration_feeds(src, cfg), CalibrationConfig(
        samples=cfg.calibration.samples, seed=cfg.seed, max_rows=0,
        progress=cfg.progress if progress is None else progress))
    return {name: np.asarray(s.norm, dtype=np.float64) for name, s in stats.items()}


def calibrate(source: Source, plan: Plan, cfg: ResolvedConfig, weights: list[str] | None = None
              ) -> dict[str, np.ndarray]:
    """‖X_k‖₂ over calibration tokens for the input of every (given) prunable weight: the whole model on
    onnxruntime, or block by block in PyTorch when the model is too big to run whole (as for the fold check)."""
    names = sorted({plan.weights[w].input for w in (weights or plan.prunable)})
    if source.whole_check(cfg.check):
        return input_norms(source.path, names, cfg)
    from permsparse.pipeline.blockwise.norms import block_input_norms

    bp = partition_of(source, plan)
    if bp is None and cfg.check.mode == "auto":
        log.info("calibration runs the whole model on onnxruntime (no residual-stream blocks to run one at a time)")
        return input_norms(source.path, names, cfg)
    if bp is None:
        raise PermsparseError(
            "this model is too big to run whole for calibration, and it has no residual-stream blocks to run one at "
            "a time; use --importance magnitude (no calibration), or --check whole on a machine with more memory"
        )
    return block_input_norms(source.model, source.base_dir, bp, names, calibration_feeds(source.path, cfg),
                             cfg.calibration.samples, cfg.progress, device=cfg.torch_device)


def learn(analysis: Analysis, x_norms: dict[str, np.ndarray], cfg: ResolvedConfig, solver: Solver | None,
          units: UnitPlan | None = None) -> Learned:
    """Every unit's permutation on the importance objective (or the recipe's permutations)."""
    from permsparse.pipeline.problems import learned_config, solve_units

    plan, units = analysis.plan, units or analysis.units
    p = cfg.permutation
    if p.recipe_perms is not None:
        return Learned(replay(units, p.recipe_perms), x_norms=x_norms)

    def imp(name: str, wk: np.ndarray) -> np.ndarray:
        return masking_score(cfg.mask.importance, wk, x_norm=x_norms.get(plan.weights[name].input))

    perms, reports = solve_units(plan, units.units, const_index(analysis.graph), imp, method=p.method, seed=cfg.seed,
                                 budget_s=p.budget_s, workers=p.workers, learned_config=learned_config(cfg),
                                 progress=cfg.progress, solver=solver)
    return Learned(perms, reports, x_norms)


def replay(units: UnitPlan, recipe_perms) -> dict[str, np.ndarray]:
    """The recipe's permutations, checked against this model's units."""
    perms: dict[str, np.ndarray] = {}
    given = recipe_perms or {}
    for u in units.units:
        p = given.get(u.name)
        if p is None:
            raise PermsparseError(f"the recipe has no permutation for unit {u.name!r}: it was made for another model "
                                  "or policy; run without --recipe")
        p = np.asarray(p, dtype=np.int64)
        if p.shape != (u.k,) or not np.array_equal(np.sort(p), np.arange(u.k)) or \
                not np.array_equal(p // u.block, np.arange(u.k) // u.block):
            raise PermsparseError(f"the recipe's permutation of unit {u.name!r} does not fit this model (K={u.k}, "
                                  f"block {u.block})")
        perms[u.name] = p
    return perms


def learn_blockwise(source: Source, analysis: Analysis, blocks: BlockPlan | None, cfg: ResolvedConfig,
                    solver: Solver | None, work: Path) -> Learned:
    """Calibration, permutations and reconstructed weights block by block (:mod:`permsparse.pipeline.blockwise`)."""
    from permsparse.pipeline.blockwise.engine import Engine, split_units
    from permsparse.pipeline.blockwise.store import WeightStore

    plan = analysis.plan
    if blocks is None:
        raise PermsparseError(
            "no Transformer blocks found (no residual-stream tensor cuts the graph), so block-wise calibration "
            "cannot run; use --reconstruct none --objective importance --finetune-epochs 0 --no-sequential"
        )
    _, outside = split_units(plan, analysis.units.units, blocks)
    pre = Learned({})
    if cfg.permutation.recipe_perms is not None:
        pre = Learned(replay(analysis.units, cfg.permutation.recipe_perms))
    elif outside:
        x_norms = calibrate(source, plan, cfg, [w for u in outside for w in u.weights]) \
            if cfg.mask.importance in CALIBRATED_IMPORTANCES else {}
        pre = learn(analysis, x_norms, cfg, solver, UnitPlan(analysis.units.policy, outside, {}, 0))
    dtypes = {w.name: np.dtype(np.float16) if w.dtype == "float16" else np.dtype(np.float32)
              for w in plan.weights.values()}
    store = WeightStore(work / "weights", dtypes)
    feeds = calibration_feeds(source.path, cfg)
    # every unit: those spanning blocks (global's residual closure) come with their permutations in ``pre``, and the
    # block's masks must be chosen in their permuted order too, or the fold would scatter them (issue 17, point 0)
    engine = Engine(source.model, source.base_dir, plan, analysis.units.units, blocks, const_index(analysis.graph),
                    cfg, store)
    engine.solver = solver
    if cfg.permutation.work_dir is not None:  # block-wise state committed after every block: a killed run resumes
        from permsparse.pipeline.blockwise.resume import BlockCheckpoint, run_key

        engine.checkpoint = BlockCheckpoint(cfg.permutation.work_dir,
                                            run_key(source.digest, cfg, pre.perms, blocks.blocks, feeds))
    result = engine.run(feeds, pre.perms, cfg.progress)
    return Learned(result.perms, pre.reports + result.unit_reports, pre.x_norms, result)

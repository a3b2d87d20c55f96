"""``optimize``: the whole job as a plain list of passes.

    load → probe → analyze → (calibrate) → importance → learn permutations → fold → verify (dense) → mask → check N:M
    → save

Each pass lives in :mod:`permsparse.passes` (graph) or :mod:`permsparse.optimizer` (numbers); this module only wires
them and keeps the promises: the input file is never modified, the output is written atomically, and a model whose
permuted dense graph is not equal to the input is never written.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from permsparse.errors import PermsparseError
from permsparse.onnxio import check_float32, load_model, save_model
from permsparse.optimizer.base import PermutationProblem
from permsparse.passes.analysis import Plan, analyze
from permsparse.passes.fold import FoldResult, Unit, UnitPlan, apply_fold, block_perm, plan_units
from permsparse.passes.probe import probe, random_feeds, resolve_shapes
from permsparse.passes.sparsify import MaskStats, apply_masks, nm_report
from permsparse.passes.verify import DEFAULT_RTOL, Equivalence, compare, run_outputs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OptimizeConfig:
    """Settings of ``permsparse optimize``. ``None`` means the default."""

    method: str = "learned"
    policy: str = "local"
    n: int = 2
    m: int = 4
    importance: str = "magnitude"
    mask: bool = True
    prune_head: bool = False
    exclude: tuple[str, ...] = ()
    input_shapes: Mapping[str, tuple[int, ...]] | None = None
    calib: str | None = None  # calibration source (file/folder); None: built-in real text for text models
    calib_samples: int = 32
    calib_seq_len: int = 128
    tokenizer_dir: str | None = None
    seed: int = 0
    rtol: float = DEFAULT_RTOL
    budget_s: float | None = None
    workers: int | None = None
    learned: object | None = None  # permsparse.optimizer.learned.LearnedConfig
    progress: bool = True


@dataclass
class UnitReport:
    unit: Unit
    retained_identity: float
    retained: float
    bound: float
    efficacy: float
    seconds: float


@dataclass
class OptimizeResult:
    """Everything ``optimize`` did, for the summary table, the report and tests."""

    plan: Plan
    units: UnitPlan
    unit_reports: list[UnitReport]
    fold: FoldResult
    equivalence: Equivalence
    masks: list[MaskStats]
    nm_valid: dict[str, bool]
    selected: list[str]
    importances: dict[str, np.ndarray] = field(default_factory=dict)  # per weight, [K, N], input channel order
    x_norms: dict[str, np.ndarray] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    output: Path | None = None
    model: onnx.ModelProto | None = None  # the written model


def _check_paths(src: Path, dst: Path | None) -> None:
    if dst is None:
        return
    if dst.exists() and src.exists() and os.path.samefile(src, dst):
        raise PermsparseError(f"output {dst} is the input file; permsparse never overwrites its input: choose another -o")
    if dst.suffix != ".onnx":
        raise PermsparseError(f"output {dst} must end in .onnx")


def _check_inference_mode(model: onnx.ModelProto, path: Path) -> None:
    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Dropout" and len(node.input) > 2 and node.input[2] in inits:
            if bool(onnx.numpy_helper.to_array(inits[node.input[2]])):
                raise PermsparseError(
                    f"{path}: Dropout node {node.name!r} runs in training mode, so the model is not deterministic. "
                    "Export it after calling model.eval()."
                )


def load_checked(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """Load an input model and refuse what permsparse cannot optimize, with a message saying what to do."""
    model = load_model(path)
    check_float32(model, path)
    _check_inference_mode(model, Path(path))
    return model


def optimize(src: str | os.PathLike[str], dst: str | os.PathLike[str] | None, config: OptimizeConfig | None = None) -> OptimizeResult:
    """Run the whole pipeline on ``src`` and (unless ``dst`` is None) write the result to ``dst``."""
    cfg = config or OptimizeConfig()
    src_p, dst_p = Path(src), (Path(dst) if dst is not None else None)
    _check_paths(src_p, dst_p)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    model = load_checked(src_p)
    shapes = resolve_shapes(model, cfg.input_shapes)
    pr = probe(model, random_feeds(model, shapes, seed=cfg.seed))
    verify_feeds = _verify_feeds(model, cfg)
    reference = run_outputs(model, verify_feeds)
    timings["load+probe"] = time.perf_counter() - t0

    t = time.perf_counter()
    graph = gs.import_onnx(model)
    plan = analyze(graph, pr, n=cfg.n, m=cfg.m, prune_head=cfg.prune_head, exclude=cfg.exclude)
    selected = [w.name for w in plan.weights.values() if w.prunable]
    if not selected:
        reasons = sorted({w.reason or "" for w in plan.weights.values()})
        hint = "; ".join(reasons) if reasons else "no MatMul/Gemm reads a constant 2-D weight"
        raise PermsparseError(f"{src_p}: no prunable weights ({hint}).")
    units = plan_units(plan, cfg.policy)
    timings["analyze"] = time.perf_counter() - t

    t = time.perf_counter()
    x_norms = _calibrate(model, plan, selected, cfg) if cfg.importance != "magnitude" else {}
    importances = {name: _importance(plan, name, graph, cfg.importance, x_norms) for name in selected}
    timings["calibrate"] = time.perf_counter() - t

    t = time.perf_counter()
    problems = [_problem(plan, u, importances, cfg) for u in units.units]
    perms, reports = _solve(problems, units.units, cfg)
    timings["learn"] = time.perf_counter() - t

    t = time.perf_counter()
    fold = apply_fold(graph, plan, units.units, perms)
    dense = gs.export_onnx(graph)
    eq = compare(reference, run_outputs(dense, verify_feeds), cfg.rtol)
    timings["fold+verify"] = time.perf_counter() - t
    if not eq.ok:
        raise PermsparseError(
            f"the permuted model differs from the input (max relative error {eq.max_rel_error:.3g} on output "
            f"{eq.worst_output!r} > {cfg.rtol:g}); nothing was written. This is a bug in permsparse: please report it "
            "with the model, or run with --policy fold to avoid Gathers."
        )
    del dense

    masks: list[MaskStats] = []
    if cfg.mask:
        masks = apply_masks(graph, plan, selected, lambda w, wk: _permuted_importance(w.name, fold, plan, importances))
    out_model = gs.export_onnx(graph)
    nm_valid = nm_report(gs.import_onnx(out_model), plan) if cfg.mask else {}
    if cfg.mask:
        bad = [w for w in selected if not nm_valid.get(w)]
        if bad:
            raise PermsparseError(f"{len(bad)} weights are not {cfg.n}:{cfg.m} after masking (e.g. {bad[0]}); nothing written")
    result = OptimizeResult(plan, units, reports, fold, eq, masks, nm_valid, selected, importances, x_norms, timings)
    if dst_p is not None:
        t = time.perf_counter()
        save_model(out_model, dst_p)
        timings["save"] = time.perf_counter() - t
        result.output = dst_p
    result.model = out_model
    timings["total"] = time.perf_counter() - t0
    return result


def _verify_feeds(model: onnx.ModelProto, cfg: OptimizeConfig) -> list[dict[str, np.ndarray]]:
    """Random inputs at two sizes (batch 2, two sequence lengths) unless the user fixed the shapes."""
    if cfg.input_shapes:
        return [random_feeds(model, resolve_shapes(model, cfg.input_shapes), seed=cfg.seed + i) for i in (1, 2)]
    feeds = []
    for i, seq in enumerate((5, 13)):
        try:
            feeds.append(random_feeds(model, resolve_shapes(model, batch=2, seq=seq), seed=cfg.seed + i + 1))
        except PermsparseError:
            raise
    return feeds


def _calibrate(model: onnx.ModelProto, plan: Plan, selected: list[str], cfg: OptimizeConfig) -> dict[str, np.ndarray]:
    """‖X_k‖₂ over calibration tokens for the input of every selected weight."""
    from permsparse.optimizer.calibration import CalibrationConfig, collect_activation_stats
    from permsparse.optimizer.data import make_feeds

    names = sorted({plan.weights[w].input for w in selected})
    feeds = make_feeds(
        model,
        cfg.calib,
        samples=cfg.calib_samples,
        batch_size=8,
        seq_len=cfg.calib_seq_len,
        tokenizer_dir=cfg.tokenizer_dir,
        seed=cfg.seed,
    )
    stats = collect_activation_stats(model, names, feeds, CalibrationConfig(samples=cfg.calib_samples, seed=cfg.seed))
    return {name: np.asarray(s.norm, dtype=np.float64) for name, s in stats.items()}


def _importance(plan: Plan, name: str, graph: gs.Graph, kind: str, x_norms: Mapping[str, np.ndarray]) -> np.ndarray:
    from permsparse.optimizer.importance import compute_importance
    from permsparse.passes.sparsify import k_major

    w = plan.weights[name]
    tensor = next(t for t in graph.tensors().values() if t.name == w.const)
    values = np.asarray(tensor.values) if isinstance(tensor, gs.Constant) else np.asarray(
        tensor.inputs[0].attrs["value"].values)
    wk = k_major(w, values).astype(np.float64)
    return np.asarray(compute_importance(kind, wk, x_norms.get(w.input)), dtype=np.float64)


def _problem(plan: Plan, unit: Unit, importances: Mapping[str, np.ndarray], cfg: OptimizeConfig) -> PermutationProblem:
    """The unit's importances in its canonical channel space (tied head blocks become extra columns)."""
    mats = []
    if unit.group is not None:
        mats = [importances[w] for w in unit.weights]
    else:
        closure = plan.closures[unit.closure]
        b = closure.block
        for wname in unit.weights:
            w = plan.weights[wname]
            bm = next(mb.block_map for mb in closure.members if mb.const == w.const and mb.axis == w.k_axis)
            imp = importances[wname]
            per_class: list[list[np.ndarray]] = [[] for _ in range(closure.n_classes)]
            for t, c in enumerate(bm):
                per_class[c].append(imp[t * b:(t + 1) * b])
            width = max(len(x) for x in per_class) * imp.shape[1]
            canon = np.zeros((closure.k, width))
            for c, blocks in enumerate(per_class):
                if blocks:
                    row = np.concatenate(blocks, axis=1)
                    canon[c * b:(c + 1) * b, : row.shape[1]] = row
            mats.append(canon)
    return PermutationProblem(name=unit.name, importances=tuple(mats), block=unit.block, n=cfg.n, m=cfg.m)


def _solve(problems: list[PermutationProblem], units: list[Unit], cfg: OptimizeConfig):
    from permsparse.optimizer.solve import solve_all

    results = solve_all(
        problems,
        cfg.method,
        workers=cfg.workers,
        seed=cfg.seed,
        budget_s=cfg.budget_s,
        learned_config=cfg.learned,
        progress=cfg.progress,
    )
    perms = {u.name: np.asarray(r.perm) for u, r in zip(units, results)}
    reports = [
        UnitReport(u, r.retained_identity, r.retained, r.bound, r.efficacy, r.seconds) for u, r in zip(units, results)
    ]
    return perms, reports


def _permuted_importance(name: str, fold: FoldResult, plan: Plan, importances: Mapping[str, np.ndarray]) -> np.ndarray:
    """A weight's importance with its rows in the folded order."""
    w = plan.weights[name]
    idx = fold.indices.get((w.const, w.k_axis))
    imp = importances[name]
    return imp if idx is None else imp[idx]


__all__ = ["OptimizeConfig", "OptimizeResult", "optimize", "load_checked", "block_perm"]

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
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from permsparse.errors import PermsparseError
from permsparse.onnxio import check_float32, load_model, save_model, spill_constants
from permsparse.optimizer.base import PermutationProblem
from permsparse.passes.analysis import Plan, analyze
from permsparse.passes.fold import FoldResult, Unit, UnitPlan, apply_fold, plan_units
from permsparse.passes.graph import ConstRef, const_index, import_graph, uses_external_data
from permsparse.passes.probe import probe, probe_runner, random_feeds, resolve_shapes
from permsparse.passes.sparsify import MaskStats, apply_masks, k_major, mask_weight
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


def load_checked(path: str | os.PathLike[str], *, lazy: bool = True) -> onnx.ModelProto:
    """Load an input model and refuse what permsparse cannot optimize, with a message saying what to do.

    ``lazy``: leave external data on disk (read per weight, on demand).
    """
    model = load_model(path, lazy=lazy)
    check_float32(model, path)
    _check_inference_mode(model, Path(path))
    return model


def optimize(src: str | os.PathLike[str], dst: str | os.PathLike[str] | None, config: OptimizeConfig | None = None) -> OptimizeResult:
    """Run the whole pipeline on ``src`` and (unless ``dst`` is None) write the result to ``dst``.

    Big models (weights in an external data file) are never held twice: weights are read from disk when a pass needs
    them, permuted weights are spilled to a temporary data file, and masks are applied while the output is streamed
    to disk one tensor at a time.
    """
    cfg = config or OptimizeConfig()
    src_p, dst_p = Path(src), (Path(dst) if dst is not None else None)
    _check_paths(src_p, dst_p)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    # load -> probe (shapes) and reference outputs, in one onnxruntime session that is closed before the graph work
    model = load_checked(src_p)
    base_dir = src_p.parent
    external = uses_external_data(model)
    shapes = resolve_shapes(model, cfg.input_shapes)
    verify_feeds = _verify_feeds(model, cfg)
    runner = probe_runner(model, base_dir=base_dir)
    try:
        pr = probe(model, random_feeds(model, shapes, seed=cfg.seed), runner=runner)
        outputs = [o.name for o in model.graph.output]
        reference = [runner.run(f, outputs) for f in verify_feeds]
    finally:
        runner.close()
        del runner
    timings["load+probe"] = time.perf_counter() - t0

    # analyze
    t = time.perf_counter()
    graph = import_graph(model, base_dir)
    plan = analyze(graph, pr, n=cfg.n, m=cfg.m, prune_head=cfg.prune_head, exclude=cfg.exclude)
    selected = [w.name for w in plan.weights.values() if w.prunable]
    if not selected:
        reasons = sorted({w.reason or "" for w in plan.weights.values()})
        hint = "; ".join(reasons) if reasons else "no MatMul/Gemm reads a constant 2-D weight"
        raise PermsparseError(f"{src_p}: no prunable weights ({hint}).")
    units = plan_units(plan, cfg.policy)
    timings["analyze"] = time.perf_counter() - t

    # calibrate -> importance -> learn, one chunk of units at a time (bounded memory)
    t = time.perf_counter()
    x_norms: dict[str, np.ndarray] = {}
    x_samples: dict[str, np.ndarray] = {}
    if cfg.importance != "magnitude" or _wants_output_objective(cfg):
        x_norms, x_samples = _calibrate(src_p if external else model, plan, selected, cfg)
    consts = const_index(graph)
    timings["calibrate"] = time.perf_counter() - t
    t = time.perf_counter()
    perms, reports = _solve(plan, units.units, consts, x_norms, x_samples, cfg)
    timings["learn"] = time.perf_counter() - t

    # fold -> verify the permuted dense model against the input (refuse to go on if it differs)
    t = time.perf_counter()
    fold = apply_fold(graph, plan, units.units, perms)
    row_orders = {n: fold.indices[(plan.weights[n].const, plan.weights[n].k_axis)] for n in selected
                  if (plan.weights[n].const, plan.weights[n].k_axis) in fold.indices}
    work_parent = dst_p.parent if dst_p is not None else None
    if work_parent is not None:
        work_parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".permsparse-", dir=work_parent) as work:
        if external:
            spill_constants(graph, {c for c, _ in fold.indices}, work)
            dense_path = save_model(gs.export_onnx(graph), Path(work) / "dense.onnx", external_data=True)
            candidate = run_outputs(dense_path, verify_feeds)
        else:
            candidate = run_outputs(gs.export_onnx(graph), verify_feeds)
        eq = compare(reference, candidate, cfg.rtol)
        timings["fold+verify"] = time.perf_counter() - t
        if not eq.ok:
            raise PermsparseError(
                f"the permuted model differs from the input (max relative error {eq.max_rel_error:.3g} on output "
                f"{eq.worst_output!r} > {cfg.rtol:g}); nothing was written. This is a bug in permsparse: please "
                "report it with the model, or run with --policy fold to avoid Gathers."
            )

        # mask (while streaming to disk for big models) -> check N:M -> write
        t = time.perf_counter()
        importance = _masking_importance(plan, cfg.importance, x_norms, fold)
        masks: list[MaskStats] = []
        out_model: onnx.ModelProto | None = None
        if external and dst_p is not None:
            transforms = {} if not cfg.mask else {
                plan.weights[n].const: _streaming_mask(plan, n, importance, row_orders.get(n), masks) for n in selected
            }
            out_model = gs.export_onnx(graph)
            save_model(out_model, dst_p, external_data=True, transform=transforms)
        else:
            if cfg.mask:
                masks = apply_masks(graph, plan, selected, importance, row_orders)
            out_model = gs.export_onnx(graph)
            if dst_p is not None:
                save_model(out_model, dst_p)
        timings["mask+save"] = time.perf_counter() - t
    nm_valid = {st.weight: st.valid for st in masks}
    bad = [w for w in selected if cfg.mask and not nm_valid.get(w)]
    if bad:
        if dst_p is not None:
            dst_p.unlink(missing_ok=True)
        raise PermsparseError(f"{len(bad)} weights are not {cfg.n}:{cfg.m} after masking (e.g. {bad[0]}); nothing written")
    result = OptimizeResult(plan, units, reports, fold, eq, masks, nm_valid, selected, x_norms, timings)
    result.output = dst_p
    result.model = None if external else out_model
    timings["total"] = time.perf_counter() - t0
    return result


def _verify_feeds(model: onnx.ModelProto, cfg: OptimizeConfig) -> list[dict[str, np.ndarray]]:
    """Random inputs at two sizes (batch 2, two sequence lengths) unless the user fixed the shapes."""
    if cfg.input_shapes:
        return [random_feeds(model, resolve_shapes(model, cfg.input_shapes), seed=cfg.seed + i) for i in (1, 2)]
    return [
        random_feeds(model, resolve_shapes(model, batch=2, seq=seq), seed=cfg.seed + i + 1)
        for i, seq in enumerate((5, 13))
    ]


def _wants_output_objective(cfg: OptimizeConfig) -> bool:
    return cfg.method == "learned" and getattr(cfg.learned, "objective", "importance") == "output"


def _calibrate(
    model: onnx.ModelProto | Path, plan: Plan, selected: list[str], cfg: OptimizeConfig
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """‖X_k‖₂ over calibration tokens for the input of every selected weight, and (for the output objective) a
    reservoir sample of activation rows."""
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
    rows = 512 if _wants_output_objective(cfg) else 0
    stats = collect_activation_stats(
        model, names, feeds, CalibrationConfig(samples=cfg.calib_samples, seed=cfg.seed, max_rows=rows,
                                               progress=cfg.progress)
    )
    norms = {name: np.asarray(s.norm, dtype=np.float64) for name, s in stats.items()}
    samples = {name: s.sample for name, s in stats.items() if s.sample is not None}
    return norms, samples


def _weight_values(consts: Mapping[str, ConstRef], plan: Plan, name: str) -> np.ndarray:
    w = plan.weights[name]
    return k_major(w, consts[w.const].values)


def _importance(kind: str, wk: np.ndarray, x_norm: np.ndarray | None) -> np.ndarray:
    from permsparse.optimizer.importance import compute_importance

    return np.asarray(compute_importance(kind, wk, x_norm), dtype=np.float32)


def _problem(
    plan: Plan, unit: Unit, importances: Mapping[str, np.ndarray], cfg: OptimizeConfig,
    consts: Mapping[str, ConstRef] | None = None, x_samples: Mapping[str, np.ndarray] | None = None,
) -> PermutationProblem:
    """The unit's importances in its canonical channel space (tied head blocks become extra columns).

    For the output objective, the calibration activations and dense weights are attached when every sibling reads
    the same tensor in canonical order (a sibling group); other units fall back to the importance objective.
    """
    mats = []
    inputs = {plan.weights[w].input for w in unit.weights}
    if x_samples and consts is not None and len(inputs) == 1 and next(iter(inputs)) in x_samples:
        if unit.group is not None or _trivial_rows(plan, unit):
            x = x_samples[next(iter(inputs))]
            ws = tuple(_weight_values(consts, plan, w).astype(np.float32) for w in unit.weights)
            mats = [importances[w] for w in unit.weights]
            return PermutationProblem(name=unit.name, importances=tuple(mats), block=unit.block, n=cfg.n, m=cfg.m,
                                      activations=x, weights=ws)
    if unit.group is not None:
        mats = [importances[w] for w in unit.weights]
    else:
        closure = plan.closures[unit.closure]
        b = closure.block
        for wname in unit.weights:
            w = plan.weights[wname]
            bm = _row_classes(closure, w)
            imp = importances[wname]
            if _is_canonical(bm, closure):
                mats.append(imp)  # rows already in canonical order: no copy
                continue
            per_class: list[list[np.ndarray]] = [[] for _ in range(closure.n_classes)]
            for t, c in enumerate(bm):
                per_class[c].append(imp[t * b:(t + 1) * b])
            width = max(len(x) for x in per_class) * imp.shape[1]
            canon = np.zeros((closure.k, width), dtype=imp.dtype)
            for c, blocks in enumerate(per_class):
                if blocks:
                    row = np.concatenate(blocks, axis=1)
                    canon[c * b:(c + 1) * b, : row.shape[1]] = row
            mats.append(canon)
    return PermutationProblem(name=unit.name, importances=tuple(mats), block=unit.block, n=cfg.n, m=cfg.m)


def _row_classes(closure, w) -> np.ndarray:
    """Canonical class of each block of ``w``'s rows."""
    return next(mb.block_map for mb in closure.members if mb.const == w.const and mb.axis == w.k_axis)


def _is_canonical(block_map: np.ndarray, closure) -> bool:
    return len(block_map) == closure.n_classes and np.array_equal(block_map, np.arange(len(block_map)))


def _trivial_rows(plan: Plan, unit: Unit) -> bool:
    """True if every sibling's rows are already in canonical order (no head ties or reordering)."""
    closure = plan.closures[unit.closure]
    return all(_is_canonical(_row_classes(closure, plan.weights[w]), closure) for w in unit.weights)


def _solve(plan: Plan, units: list[Unit], consts, x_norms, x_samples, cfg: OptimizeConfig):
    """Learn every unit's permutation, a chunk of units at a time so importances of a big model are never all held."""
    from permsparse.optimizer.solve import solve_all

    if cfg.method == "identity":  # nothing to learn: no importances needed (masks report what plain N:M keeps)
        return {u.name: np.arange(u.k) for u in units}, []
    workers = cfg.workers or os.cpu_count() or 1
    chunk = max(4, 2 * workers)
    perms: dict[str, np.ndarray] = {}
    reports: list[UnitReport] = []
    budget = None if cfg.budget_s is None else cfg.budget_s / max(1, len(units))
    for start in range(0, len(units), chunk):
        part = units[start:start + chunk]
        names = {w for u in part for w in u.weights}
        imps = {n: _importance(cfg.importance, _weight_values(consts, plan, n), x_norms.get(plan.weights[n].input))
                for n in names}
        problems = [_problem(plan, u, imps, cfg, consts, x_samples) for u in part]
        del imps
        results = solve_all(
            problems, cfg.method, workers=cfg.workers, seed=cfg.seed,
            budget_s=None if budget is None else budget * len(part),
            learned_config=cfg.learned, progress=cfg.progress,
        )
        for u, r in zip(part, results):
            perms[u.name] = np.asarray(r.perm)
            reports.append(UnitReport(u, r.retained_identity, r.retained, r.bound, r.efficacy, r.seconds))
    return perms, reports


def _masking_importance(plan: Plan, kind: str, x_norms: Mapping[str, np.ndarray], fold: FoldResult):
    """``importance(w, W[K, N])`` for folded weights: the input norms follow the weight's rows."""

    def fn(w, wk: np.ndarray) -> np.ndarray:
        x = x_norms.get(w.input)
        idx = fold.indices.get((w.const, w.k_axis))
        if x is not None and idx is not None:
            x = x[idx]
        return _importance(kind, wk, x)

    return fn


def _streaming_mask(plan: Plan, name: str, importance, row_order, sink: list[MaskStats]):
    w = plan.weights[name]

    def transform(stored: np.ndarray) -> np.ndarray:
        masked, st = mask_weight(w, stored, importance(w, k_major(w, stored)), plan.n, plan.m, row_order)
        sink.append(st)
        return masked

    return transform


__all__ = ["OptimizeConfig", "OptimizeResult", "optimize", "load_checked"]

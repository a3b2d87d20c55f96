"""``optimize``: the whole job as a plain list of passes.

    check paths → load → name nodes → probe → analyze → plan units → calibrate → learn permutations → fold
    → verify (dense) → mask (N:M, reconstructed values) → check N:M → save (+ provenance, recipe) → (evaluate)

Each pass lives in :mod:`permsparse.passes` (graph) or :mod:`permsparse.optimizer` (numbers); this module only wires
them and keeps the promises: the input's files are never written (the output may not be one of them), the output
location is checked before any work, the output is written atomically, and a model whose permuted dense graph is not
equal to the input, or whose masks are not N:M, is never written.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from permsparse.config import OptimizeConfig
from permsparse.errors import PermsparseError, VerificationError
from permsparse.ir.compare import Equivalence, compare
from permsparse.ir.graph import const_index, import_graph
from permsparse.ir.weights import node_scopes
from permsparse.ir.inputs import concrete_shapes, random_feeds
from permsparse.ir.model import check_input, load_model, model_files, uses_external_data
from permsparse.ir.save import check_output, save_model, spill_constants, work_dir
from permsparse.ir.session import run_outputs
from permsparse.ir.upcast import is_half_model, upcast_feeds, upcast_model
from permsparse.learn import UnitReport, solve_units
from permsparse.passes.analysis import Plan, analyze
from permsparse.passes.fold import FoldResult, UnitPlan, apply_fold, plan_units
from permsparse.passes.names import name_nodes
from permsparse.passes.probe import probe, probe_session
from permsparse.passes.sparsify import MaskStats, apply_masks, fold_values, mask_weight, place_weight

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


class _Stages:
    """Stage timer: ``with stages("fold"): ...`` records seconds and logs a line per stage."""

    def __init__(self, progress: bool):
        self.timings: dict[str, float] = {}
        self.progress = progress

    def __call__(self, name: str):
        stages = self

        class _Ctx:
            def __enter__(self):
                self.t = time.perf_counter()
                log.info("%s ...", name)

            def __exit__(self, *exc):
                stages.timings[name] = stages.timings.get(name, 0.0) + time.perf_counter() - self.t
                if exc[0] is None:
                    log.info("%s done in %.1f s", name, stages.timings[name])

        return _Ctx()


def optimize(src: str | Path, dst: str | Path | None, config: OptimizeConfig | None = None) -> OptimizeResult:
    """Run the whole pipeline on ``src`` and (unless ``dst`` is None) write the result to ``dst``.

    Big models (weights in an external data file) are never held twice: weights are read memory-mapped when a pass
    needs them, permuted weights are spilled to a temporary data file, and masks are applied while the output is
    streamed to disk one tensor at a time.
    """
    cfg = (config or OptimizeConfig()).resolved()
    src_p, dst_p = Path(src), (Path(dst) if dst is not None else None)
    t0 = time.perf_counter()
    stages = _Stages(cfg.progress)

    with stages("load"):
        model = load_model(src_p)  # external data stays on disk
        inputs = model_files(src_p, model)
        if dst_p is not None:
            check_output(dst_p, frozenset(inputs))  # before any work: never an input file, writable
        check_input(model, src_p)
        digest = _sha256(src_p)
        base_dir = src_p.parent
        external = uses_external_data(model)
        shapes = concrete_shapes(model, cfg.shapes)
        verify_feeds = _verify_feeds(model, cfg)

    half = is_half_model(model)
    with stages("probe"):
        session = probe_session(model, base_dir=base_dir)
        try:
            pr = probe(model, random_feeds(model, shapes, seed=cfg.seed), session=session)
            if not half:
                reference = [session.run(f, [o.name for o in model.graph.output]) for f in verify_feeds]
        finally:
            session.close()
        if half:  # the fold check compares fp32 copies: exact folds must not drown in fp16 rounding
            reference = run_outputs(upcast_model(model, base_dir), [upcast_feeds(f) for f in verify_feeds])

    with stages("analyze"):
        graph = import_graph(model, base_dir)
        name_nodes(graph)
        plan = analyze(graph, pr, pattern=cfg.pattern, prune_head=cfg.prune_head, exclude=cfg.exclude,
                       scopes=node_scopes(model))
        selected = plan.prunable
        if not selected:
            reasons = sorted({w.reason or "" for w in plan.weights.values()})
            hint = "; ".join(reasons) if reasons else "no MatMul/Gemm reads a constant 2-D weight"
            raise PermsparseError(f"{src_p}: no prunable weights ({hint}).")
        units = plan_units(plan, cfg.policy)

    x_norms: dict[str, np.ndarray] = {}
    consts = const_index(graph)
    blockwise = None
    with work_dir(dst_p.parent if dst_p is not None else None, "optimize") as work:
        if cfg.blockwise:
            with stages("block-wise"):
                blockwise = _blockwise(src_p, model, graph, plan, units, consts, cfg, work, stages)
            perms, reports = blockwise.perms, blockwise.unit_reports
        else:
            if cfg.importance in ("wanda", "ria"):
                with stages("calibrate"):
                    x_norms = _calibrate(src_p, plan, selected, cfg)
            with stages("learn"):
                perms, reports = _learn(plan, units, consts, x_norms, cfg)
        return _finish(src_p, dst_p, model, graph, plan, units, perms, reports, x_norms, blockwise, reference,
                       verify_feeds, external, digest, cfg, stages, work, t0)


def _finish(src_p, dst_p, model, graph, plan, units, perms, reports, x_norms, blockwise, reference, verify_feeds,
            external, digest, cfg, stages, work, t0) -> OptimizeResult:
    """fold → verify → place masked / reconstructed weights → check N:M → save → recipe → (evaluate)."""
    selected = plan.prunable
    with stages("fold"):
        fold = apply_fold(graph, plan, units.units, perms)
    row_orders = {n: fold.indices[(plan.weights[n].const, plan.weights[n].k_axis)] for n in selected
                  if (plan.weights[n].const, plan.weights[n].k_axis) in fold.indices}

    with stages("verify"):
        half = is_half_model(model)
        if external:
            spill_constants(graph, {c for c, _ in fold.indices}, work)
            dense_path = save_model(gs.export_onnx(graph), work / "dense.onnx", external_data=True)
            if half:
                candidate = run_outputs(upcast_model(onnx.load(str(dense_path), load_external_data=False), work),
                                        [upcast_feeds(f) for f in verify_feeds])
            else:
                candidate = run_outputs(dense_path, verify_feeds)
        elif half:
            candidate = run_outputs(upcast_model(gs.export_onnx(graph)), [upcast_feeds(f) for f in verify_feeds])
        else:
            candidate = run_outputs(gs.export_onnx(graph), verify_feeds)
        method = "whole model on onnxruntime" + (", 16-bit weights compared as fp32" if half else "")
        eq = compare(reference, candidate, cfg.rtol, method)
    if not eq.ok:
        raise VerificationError(
            f"the permuted model differs from the input (max relative error {eq.max_rel_error:.3g} on output "
            f"{eq.worst_output!r} > {cfg.rtol:g}); nothing was written. This is a bug in permsparse: please "
            "report it with the model, or run with --policy fold to avoid Gathers."
        )

    with stages("mask+save"):
        importance = _masking_importance(plan, cfg.importance, x_norms, fold)
        masks: list[MaskStats] = []
        out_model: onnx.ModelProto | None = None
        store = blockwise.store if blockwise is not None else None
        if external and dst_p is not None:
            transforms = {} if not cfg.mask else {
                plan.weights[n].const: _streaming_mask(plan, n, importance, row_orders.get(n), masks, store, fold)
                for n in selected
            }
            out_model = gs.export_onnx(graph)
            _provenance(out_model, src_p, digest, cfg, plan, units)
            save_model(out_model, dst_p, external_data=True, transform=transforms)
        else:
            if cfg.mask:
                consts = const_index(graph)
                rebuilt = [n for n in selected if store is not None and n in store]
                for n in rebuilt:
                    ref = consts[plan.weights[n].const]
                    final, st = place_weight(plan.weights[n], ref.values, fold_values(plan, fold, n, store.get(n)),
                                             plan.pattern, row_orders.get(n))
                    ref.set_values(final)
                    masks.append(st)
                masks += apply_masks(graph, plan, [n for n in selected if n not in rebuilt], importance, row_orders)
            out_model = gs.export_onnx(graph)
            _provenance(out_model, src_p, digest, cfg, plan, units)
            if dst_p is not None:
                save_model(out_model, dst_p)
    nm_valid = {st.weight: st.valid for st in masks}
    bad = [w for w in selected if cfg.mask and not nm_valid.get(w)]
    if bad:
        if dst_p is not None:
            dst_p.unlink(missing_ok=True)
        raise VerificationError(f"{len(bad)} weights are not {cfg.pattern} after masking (e.g. {bad[0]}); nothing written")
    result = OptimizeResult(cfg, plan, units, reports, fold, eq, masks, nm_valid, selected, perms, x_norms,
                            stages.timings, dst_p, None if external else out_model, input_sha256=digest)
    if dst_p is not None:
        from permsparse.recipe import write_recipe

        write_recipe(result, src_p, dst_p)
        if cfg.evaluate and cfg.mask:
            from permsparse.evaluate import evaluate_quality

            with stages("evaluate"), work_dir(dst_p.parent, "evaluate") as work:
                result.quality = evaluate_quality(src_p, dst_p, result, work)
    result.timings["total"] = time.perf_counter() - t0
    return result


def _blockwise(src: Path, model, graph, plan: Plan, units: UnitPlan, consts, cfg: OptimizeConfig, work: Path,
               stages) -> object:
    """Calibration, permutations and reconstructed weights block by block (:mod:`permsparse.blockwise`)."""
    from permsparse.blockwise.engine import Engine, split_units
    from permsparse.blockwise.store import WeightStore
    from permsparse.data.feeds import make_feeds
    from permsparse.passes.blocks import partition

    bp = partition(graph, plan)
    if bp is None:
        raise PermsparseError(
            "no Transformer blocks found (no residual-stream tensor cuts the graph), so block-wise calibration "
            "cannot run; use --reconstruct none --objective importance --finetune-epochs 0 --no-sequential"
        )
    inside, outside = split_units(plan, units.units, bp)
    pre: dict[str, np.ndarray] = {}
    if cfg.recipe_perms is not None:
        pre = _replay(units, cfg)
    elif outside:
        x_norms = _calibrate(src, plan, [w for u in outside for w in u.weights], cfg) \
            if cfg.importance in ("wanda", "ria") else {}
        sub = UnitPlan(units.policy, outside, {}, 0)
        pre, _ = _learn(plan, sub, consts, x_norms, cfg)
    dtypes = {w.name: np.dtype(np.float16) if w.dtype == "float16" else np.dtype(np.float32)
              for w in plan.weights.values()}
    store = WeightStore(work / "weights", dtypes)
    feeds = make_feeds(src, cfg.calib, samples=cfg.calib_samples, batch_size=8, seq_len=cfg.calib_seq_len,
                       tokenizer_dir=cfg.tokenizer, seed=cfg.seed)
    engine = Engine(model, src.parent, plan, inside, bp, consts, cfg, store)
    return engine.run(feeds, pre, cfg.progress)


def _verify_feeds(model: onnx.ModelProto, cfg: OptimizeConfig) -> list[dict[str, np.ndarray]]:
    """Random inputs at two sizes (batch 2, two sequence lengths) unless the user fixed the shapes."""
    if cfg.shapes:
        shapes = concrete_shapes(model, cfg.shapes)
        return [random_feeds(model, shapes, seed=cfg.seed + i) for i in (1, 2)]
    return [
        random_feeds(model, concrete_shapes(model, batch=2, seq=seq), seed=cfg.seed + i + 1)
        for i, seq in enumerate((5, 13))
    ]


def _calibrate(src: Path, plan: Plan, selected: list[str], cfg: OptimizeConfig) -> dict[str, np.ndarray]:
    """‖X_k‖₂ over calibration tokens for the input of every selected weight."""
    from permsparse.data.calibration import CalibrationConfig, collect_activation_stats
    from permsparse.data.feeds import make_feeds

    names = sorted({plan.weights[w].input for w in selected})
    feeds = make_feeds(src, cfg.calib, samples=cfg.calib_samples, batch_size=8, seq_len=cfg.calib_seq_len,
                       tokenizer_dir=cfg.tokenizer, seed=cfg.seed)
    stats = collect_activation_stats(
        src, names, feeds, CalibrationConfig(samples=cfg.calib_samples, seed=cfg.seed, max_rows=0,
                                             progress=cfg.progress)
    )
    return {name: np.asarray(s.norm, dtype=np.float64) for name, s in stats.items()}


def _importance(kind: str, wk: np.ndarray, x_norm: np.ndarray | None) -> np.ndarray:
    from permsparse.optimizer.importance import compute_importance

    return np.asarray(compute_importance(kind, np.asarray(wk, dtype=np.float32), x_norm), dtype=np.float32)


def _learn(plan: Plan, units: UnitPlan, consts, x_norms, cfg: OptimizeConfig):
    if cfg.recipe_perms is not None:
        return _replay(units, cfg), []

    def importance(name: str, wk: np.ndarray) -> np.ndarray:
        return _importance(cfg.importance, wk, x_norms.get(plan.weights[name].input))

    return solve_units(plan, units.units, consts, importance, method=cfg.method, seed=cfg.seed,
                       budget_s=cfg.budget_s, workers=cfg.workers, learned_config=cfg.learned,
                       progress=cfg.progress)


def _replay(units: UnitPlan, cfg: OptimizeConfig) -> dict[str, np.ndarray]:
    perms: dict[str, np.ndarray] = {}
    given = cfg.recipe_perms or {}
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


def _masking_importance(plan: Plan, kind: str, x_norms, fold: FoldResult):
    """``importance(w, W[K, N])`` for folded weights: the input norms follow the weight's rows."""

    def fn(w, wk: np.ndarray) -> np.ndarray:
        x = x_norms.get(w.input)
        idx = fold.indices.get((w.const, w.k_axis))
        if x is not None and idx is not None:
            x = x[idx]
        return _importance(kind, wk, x)

    return fn


def _streaming_mask(plan: Plan, name: str, importance, row_order, sink: list[MaskStats], store, fold):
    w = plan.weights[name]

    def transform(stored: np.ndarray) -> np.ndarray:
        if store is not None and name in store:
            masked, st = place_weight(w, stored, fold_values(plan, fold, name, store.get(name)), plan.pattern,
                                      row_order)
        else:
            masked, st = mask_weight(w, stored, importance(w, w.k_major(stored)), plan.pattern, row_order)
        if not st.valid:
            raise VerificationError(f"weight {name} is not {plan.pattern} after masking; nothing written")
        sink.append(st)
        return masked

    return transform


def _sha256(path: Path) -> str:
    """Hash of the input's .onnx file (graph and inline weights; external data files are named, not hashed)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _provenance(model: onnx.ModelProto, src: Path, digest: str, cfg: OptimizeConfig, plan: Plan,
                units: UnitPlan) -> None:
    """Record in the output's ``metadata_props`` how it was made."""
    from permsparse import __version__

    props = {
        "permsparse.version": __version__,
        "permsparse.input": src.name,
        "permsparse.input_sha256": digest,
        "permsparse.pattern": str(cfg.pattern),
        "permsparse.method": cfg.method,
        "permsparse.policy": cfg.policy,
        "permsparse.importance": cfg.importance,
        "permsparse.seed": str(cfg.seed),
        "permsparse.pruned_weights": str(len(plan.prunable)),
        "permsparse.permutations": str(len(units.units)),
        "permsparse.masked": str(cfg.mask).lower(),
    }
    keep = [p for p in model.metadata_props if not p.key.startswith("permsparse.")]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for k, v in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = k, v


__all__ = ["OptimizeConfig", "OptimizeResult", "optimize", "replace"]

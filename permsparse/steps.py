"""The steps of ``optimize``, each reading and extending one :class:`Run` (the list is in :mod:`permsparse.pipeline`).

Each step is small and states what it adds to the run; the promises (never write on the input, refuse a model that
failed its checks, write atomically) are kept by :func:`load` (paths checked first), :func:`verify` and
:func:`save`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from permsparse.config import CALIBRATED_IMPORTANCES, OptimizeConfig
from permsparse.errors import PermsparseError, VerificationError
from permsparse.ir.compare import Equivalence, compare
from permsparse.ir.graph import const_index, export_graph, import_graph
from permsparse.ir.inputs import concrete_shapes, random_feeds
from permsparse.ir.model import (
    check_input,
    file_sha256,
    load_model,
    model_files,
    model_size_bytes,
    uses_external_data,
)
from permsparse.ir.save import check_output, save_model, spill_constants
from permsparse.ir.session import run_outputs
from permsparse.ir.upcast import is_half_model, upcast_feeds, upcast_model
from permsparse.ir.weights import node_scopes
from permsparse.passes.analysis import Plan, analyze
from permsparse.passes.fold import FoldResult, UnitPlan, apply_fold, plan_units
from permsparse.passes.names import name_nodes
from permsparse.passes.probe import Probe, probe, probe_session, static_probe
from permsparse.passes.sparsify import (
    MaskStats,
    apply_masks,
    fold_values,
    mask_weight,
    place_weight,
)

log = logging.getLogger(__name__)

#: Above this many bytes of (fp32-widened) weights the fold check runs block by block instead of holding two models.
WHOLE_CHECK_MAX_BYTES = 4_000_000_000


@dataclass
class Run:
    """Everything one ``optimize`` run knows so far."""

    src: Path
    dst: Path | None
    cfg: OptimizeConfig
    model: onnx.ModelProto | None = None
    digest: str = ""
    external: bool = False
    half: bool = False
    verify_feeds: list[dict[str, np.ndarray]] = field(default_factory=list)
    probe: Probe | None = None
    graph: gs.Graph | None = None
    plan: Plan | None = None
    units: UnitPlan | None = None
    x_norms: dict[str, np.ndarray] = field(default_factory=dict)
    perms: dict[str, np.ndarray] = field(default_factory=dict)
    reports: list = field(default_factory=list)
    blockwise: Any = None
    fold: FoldResult | None = None
    equivalence: Equivalence | None = None
    masks: list[MaskStats] = field(default_factory=list)
    out_model: onnx.ModelProto | None = None
    work: Path | None = None
    blocks: Any = None  # permsparse.passes.blocks.BlockPlan, once found
    solver: Any = None  # permsparse.learn.Solver: executor and checkpoint store of this run

    @property
    def base_dir(self) -> Path:
        return self.src.parent

    @property
    def whole_check(self) -> bool:
        """Fold check on the whole model (onnxruntime) — unless it cannot be held twice."""
        size = model_size_bytes(self.model) * (2 if self.half else 1)
        return self.cfg.check == "whole" or (self.cfg.check == "auto" and size <= WHOLE_CHECK_MAX_BYTES)


def load(run: Run) -> None:
    """Check the paths before any work, load the graph (weights stay on disk), refuse bad input."""
    run.model = load_model(run.src)
    if run.dst is not None:
        check_output(run.dst, frozenset(model_files(run.src, run.model)))
    check_input(run.model, run.src)
    run.digest = file_sha256(run.src)
    run.external = uses_external_data(run.model)
    run.half = is_half_model(run.model)
    run.verify_feeds = _verify_feeds(run.model, run.cfg)


def probe_shapes(run: Run) -> None:
    """Shapes and small integer values: static inference when it resolves everything, else one onnxruntime run."""
    feeds = random_feeds(run.model, concrete_shapes(run.model, run.cfg.shapes), seed=run.cfg.seed)
    run.probe = static_probe(run.model, feeds)
    if run.probe is None:
        session = probe_session(run.model, base_dir=run.base_dir)
        try:
            run.probe = probe(run.model, feeds, session=session)
        finally:
            session.close()


def analyze_graph(run: Run) -> None:
    """Name nodes, find weights and closures, and decide the permutation units of the policy."""
    cfg = run.cfg
    run.graph = import_graph(run.model, run.base_dir)
    name_nodes(run.graph)
    run.plan = analyze(run.graph, run.probe, pattern=cfg.pattern, prune_head=cfg.prune_head, exclude=cfg.exclude,
                       scopes=node_scopes(run.model))
    if not run.plan.prunable:
        reasons = sorted({w.reason or "" for w in run.plan.weights.values()})
        hint = "; ".join(reasons) if reasons else "no MatMul/Gemm reads a constant 2-D weight"
        raise PermsparseError(f"{run.src}: no prunable weights ({hint}).")
    run.units = plan_units(run.plan, cfg.policy)


def calibrate(run: Run, weights: list[str] | None = None) -> None:
    """‖X_k‖₂ over calibration tokens for the input of every (given) prunable weight: the whole model on
    onnxruntime, or block by block in PyTorch when the model is too big to run whole (as for the fold check)."""
    names = sorted({run.plan.weights[w].input for w in (weights or run.plan.prunable)})
    if run.whole_check:
        run.x_norms.update(input_norms(run.src, names, run.cfg))
        return
    from permsparse.blockwise.norms import block_input_norms

    bp = _partition_of(run)
    if bp is None:
        raise PermsparseError(
            "this model is too big to run whole for calibration, and it has no residual-stream blocks to run one at "
            "a time; use --importance magnitude (no calibration), or --check whole on a machine with more memory"
        )
    cfg = run.cfg
    run.x_norms.update(block_input_norms(run.model, run.base_dir, bp, names, calibration_feeds(run.src, cfg),
                                         cfg.calib_samples, cfg.progress))


def calibration_feeds(src: Path, cfg: OptimizeConfig):
    """The calibration batches of ``cfg`` for model ``src`` (one definition for every calibration path)."""
    from permsparse.data.feeds import make_feeds

    return make_feeds(src, cfg.calib, samples=cfg.calib_samples, batch_size=8, seq_len=cfg.calib_seq_len,
                      tokenizer_dir=cfg.tokenizer, seed=cfg.seed)


def input_norms(src: Path, names: list[str], cfg: OptimizeConfig, progress: bool | None = None
                ) -> dict[str, np.ndarray]:
    """‖X_k‖₂ of the tensors ``names`` of model ``src`` over the calibration data of ``cfg`` (onnxruntime)."""
    from permsparse.data.calibration import CalibrationConfig, collect_activation_stats

    stats = collect_activation_stats(src, names, calibration_feeds(src, cfg), CalibrationConfig(
        samples=cfg.calib_samples, seed=cfg.seed, max_rows=0, progress=cfg.progress if progress is None else progress))
    return {name: np.asarray(s.norm, dtype=np.float64) for name, s in stats.items()}


def importance(kind: str, wk: np.ndarray, x_norm: np.ndarray | None) -> np.ndarray:
    from permsparse.optimizer.importance import masking_score

    return masking_score(kind, wk, x_norm=x_norm)


def learn(run: Run, units: UnitPlan | None = None) -> dict[str, np.ndarray]:
    """Every unit's permutation on the importance objective (or the recipe's permutations)."""
    from permsparse.learn import solve_units

    cfg, plan = run.cfg, run.plan
    units = units or run.units
    if cfg.recipe_perms is not None:
        return replay(units, cfg)

    def imp(name: str, wk: np.ndarray) -> np.ndarray:
        return importance(cfg.importance, wk, run.x_norms.get(plan.weights[name].input))

    perms, reports = solve_units(plan, units.units, const_index(run.graph), imp, method=cfg.method, seed=cfg.seed,
                                 budget_s=cfg.budget_s, workers=cfg.workers, learned_config=cfg.learned,
                                 progress=cfg.progress, solver=run.solver)
    run.reports += reports
    return perms


def replay(units: UnitPlan, cfg: OptimizeConfig) -> dict[str, np.ndarray]:
    """The recipe's permutations, checked against this model's units."""
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


#: Defaults for text encoders (see :func:`fit_defaults`).
ENCODER_CALIB_SAMPLES = 128
ENCODER_FINETUNE_EPOCHS = 4
ENCODER_FINETUNE_LR = 3e-4
_CALIBRATION_OPTIONS = ("importance", "reconstruct", "objective", "finetune_epochs", "sequential", "calib")


def fit_defaults(run: Run, given: OptimizeConfig) -> None:
    """Defaults that need calibration data (Wanda, SparseGPT) fall back to magnitude masking, with a warning, on a
    model whose inputs are neither token ids nor images; options the user gave are never changed (they fail later
    with an error that says what to do)."""
    from permsparse.data.kinds import model_kind

    if not run.cfg.needs_calibration or any(getattr(given, k) is not None for k in _CALIBRATION_OPTIONS):
        return
    try:
        kind = model_kind(run.model)
    except PermsparseError as exc:
        log.warning("%s. Falling back to --importance magnitude --reconstruct none.", str(exc).split(", so ")[0])
        run.cfg = replace(run.cfg, importance="magnitude", reconstruct="none", sequential=False)
        return
    if kind == "text" and run.cfg.blockwise and given.calib is None:
        # Encoders read short texts (a few dozen tokens each): 32 of them under-determine H = XᵀX of a 1536-wide
        # input. MiniLM (bench/quality.py): 128 texts and 4 epochs of tuning lift the pooled cosine 0.859 -> 0.905.
        run.cfg = replace(run.cfg, calib_samples=given.calib_samples or ENCODER_CALIB_SAMPLES,
                          finetune_epochs=ENCODER_FINETUNE_EPOCHS,
                          finetune_lr=given.finetune_lr or ENCODER_FINETUNE_LR)
        log.info("text encoder: %d calibration texts, %d epochs of block tuning (defaults for encoders)",
                 run.cfg.calib_samples, run.cfg.finetune_epochs)


def use_blockwise(run: Run, given: OptimizeConfig) -> bool:
    """Whether this run goes block by block. A block-wise option the user gave on a model without Transformer blocks
    is an error (in :func:`blockwise`); the defaults (reconstruction) fall back to per-weight learning with a warning."""
    from permsparse.passes.blocks import partition
    from permsparse.torchgraph import unsupported_ops

    if not run.cfg.blockwise:
        return False
    run.blocks = partition(run.graph, run.plan)
    asked = any(getattr(given, k) is not None for k in _CALIBRATION_OPTIONS[1:5])
    # blocks run in PyTorch: the defaults fall back to the per-weight path where it lacks an op
    missing = sorted(unsupported_ops(run.graph)) if run.blocks is not None and not asked else []
    if (run.blocks is None or missing) and not asked:
        log.warning("%s: weights are masked without reconstruction (the default --reconstruct sparsegpt needs blocks "
                    "run in PyTorch)", f"the torch evaluator lacks op(s) {', '.join(missing)}" if missing else
                    "no Transformer blocks found (no residual-stream tensor cuts the graph)")
        run.blocks = None
        run.cfg = replace(run.cfg, reconstruct="none", sequential=False, finetune_epochs=0)
        return run.cfg.blockwise
    return True


def blockwise(run: Run) -> None:
    """Calibration, permutations and reconstructed weights block by block (:mod:`permsparse.blockwise`)."""
    from permsparse.blockwise.engine import Engine, split_units
    from permsparse.blockwise.store import WeightStore
    from permsparse.passes.blocks import partition

    cfg, plan = run.cfg, run.plan
    bp = run.blocks if run.blocks is not None else partition(run.graph, plan)
    if bp is None:
        raise PermsparseError(
            "no Transformer blocks found (no residual-stream tensor cuts the graph), so block-wise calibration "
            "cannot run; use --reconstruct none --objective importance --finetune-epochs 0 --no-sequential"
        )
    _, outside = split_units(plan, run.units.units, bp)
    pre: dict[str, np.ndarray] = {}
    if cfg.recipe_perms is not None:
        pre = replay(run.units, cfg)
    elif outside:
        if cfg.importance in CALIBRATED_IMPORTANCES:
            calibrate(run, [w for u in outside for w in u.weights])
        pre = learn(run, UnitPlan(run.units.policy, outside, {}, 0))
    dtypes = {w.name: np.dtype(np.float16) if w.dtype == "float16" else np.dtype(np.float32)
              for w in plan.weights.values()}
    store = WeightStore(run.work / "weights", dtypes)
    feeds = calibration_feeds(run.src, cfg)
    # every unit: those spanning blocks (global's residual closure) come with their permutations in ``pre``, and the
    # block's masks must be chosen in their permuted order too, or the fold would scatter them (issue 17, point 0)
    engine = Engine(run.model, run.base_dir, plan, run.units.units, bp, const_index(run.graph), cfg, store)
    engine.solver = run.solver
    if cfg.work_dir is not None:  # block-wise state committed after every block: a killed run resumes after it
        from permsparse.blockwise.resume import BlockCheckpoint, run_key

        engine.checkpoint = BlockCheckpoint(cfg.work_dir, run_key(run.digest, cfg, pre, bp.blocks, feeds))
    run.blockwise = engine.run(feeds, pre, cfg.progress)
    run.perms = run.blockwise.perms
    run.reports += run.blockwise.unit_reports


def fold(run: Run) -> None:
    run.fold = apply_fold(run.graph, run.plan, run.units.units, run.perms)


def verify(run: Run) -> None:
    """The permuted dense model must equal the input; refuse to go on otherwise (nothing is written)."""
    cfg, feeds = run.cfg, run.verify_feeds
    if run.external:
        spill_constants(run.graph, {c for c, _ in run.fold.indices}, run.work)
        # weights referenced where they lie, by absolute path
        folded, folded_dir = export_graph(run.graph, run.model), run.work
        if run.whole_check:  # onnxruntime wants the data beside the model
            folded = onnx.load(str(save_model(folded, run.work / "dense.onnx", external_data=True)),
                               load_external_data=False)
    else:
        folded, folded_dir = export_graph(run.graph, run.model), None
    if run.whole_check:
        if run.half:
            reference = run_outputs(upcast_model(run.model, run.base_dir), [upcast_feeds(f) for f in feeds])
            candidate = run_outputs(upcast_model(folded, folded_dir), [upcast_feeds(f) for f in feeds])
        else:
            reference = run_outputs(run.src, feeds)
            candidate = run_outputs(folded, feeds, base_dir=folded_dir)
        method = "whole model on onnxruntime" + (", 16-bit weights compared as fp32" if run.half else "")
        eq = compare(reference, candidate, cfg.rtol, method)
    else:
        eq = _verify_blockwise(run, folded, folded_dir or run.base_dir)
    run.equivalence = eq
    if not eq.ok:
        raise VerificationError(
            f"the permuted model differs from the input (max relative error {eq.max_rel_error:.3g} on output "
            f"{eq.worst_output!r} > {cfg.rtol:g}); nothing was written. This is a bug in permsparse: please "
            "report it with the model, or run with --policy fold to avoid Gathers."
        )


def _verify_blockwise(run: Run, folded: onnx.ModelProto, folded_dir: Path) -> Equivalence:
    from permsparse.blockwise.check import applicable, check_blockwise

    bp = _partition_of(run)
    if bp is None or not applicable(run.cfg.policy, run.fold.gathers):
        raise PermsparseError(
            "this model is too big to hold twice for the fold check, and it cannot be checked block by block "
            "(no residual-stream blocks, or policy global); use --policy local (or fold), or --check whole on a "
            "machine with more memory"
        )
    feeds = [random_feeds(run.model, concrete_shapes(run.model, batch=1, seq=7), seed=run.cfg.seed + 1)]
    return check_blockwise(run.model, run.base_dir, folded, folded_dir, bp, feeds, run.cfg.rtol)


def _partition_of(run: Run):
    from permsparse.passes.blocks import partition

    graph = import_graph(run.model, run.base_dir)
    name_nodes(graph)
    return partition(graph, run.plan)


def save(run: Run) -> None:
    """Masks (or reconstructed weights) in the folded order, the independent N:M check, provenance, atomic write."""
    cfg, plan, fold_result, dst = run.cfg, run.plan, run.fold, run.dst
    selected = plan.prunable
    row_orders = {n: fold_result.indices[(plan.weights[n].const, plan.weights[n].k_axis)] for n in selected
                  if (plan.weights[n].const, plan.weights[n].k_axis) in fold_result.indices}
    imp = _masking_importance(run)
    store = run.blockwise.store if run.blockwise is not None else None
    masks: list[MaskStats] = []
    if run.external and dst is not None:
        transforms = {} if not cfg.mask else {
            plan.weights[n].const: _streaming_mask(run, n, imp, row_orders.get(n), masks, store) for n in selected}
        run.out_model = export_graph(run.graph, run.model)
        provenance(run)
        save_model(run.out_model, dst, external_data=True, transform=transforms)
    else:
        if cfg.mask:
            consts = const_index(run.graph)
            rebuilt = [n for n in selected if store is not None and n in store]
            for n in rebuilt:
                ref = consts[plan.weights[n].const]
                final, st = place_weight(plan.weights[n], ref.values, fold_values(plan, fold_result, n, store.get(n)),
                                         plan.pattern, row_orders.get(n))
                ref.set_values(final)
                masks.append(st)
            masks += apply_masks(run.graph, plan, [n for n in selected if n not in rebuilt], imp, row_orders)
        run.out_model = export_graph(run.graph, run.model)
        provenance(run)
        if dst is not None:
            save_model(run.out_model, dst)
    run.masks = masks
    bad = [w for w in selected if cfg.mask and not {st.weight: st.valid for st in masks}.get(w)]
    if bad:
        if dst is not None:
            dst.unlink(missing_ok=True)
        raise VerificationError(f"{len(bad)} weights are not {cfg.pattern} after masking (e.g. {bad[0]}); "
                                "nothing written")


def _masking_importance(run: Run):
    """``importance(w, W[K, N])`` for folded weights (the input norms follow the weight's rows); None for magnitude."""

    if run.cfg.importance == "magnitude":
        return None  # mask_weight's default: |W|

    def fn(w, wk: np.ndarray) -> np.ndarray:
        x = run.x_norms.get(w.input)
        idx = run.fold.indices.get((w.const, w.k_axis))
        if x is not None and idx is not None:
            x = x[idx]
        return importance(run.cfg.importance, wk, x)

    return fn


def _streaming_mask(run: Run, name: str, imp, row_order, sink: list[MaskStats], store):
    plan = run.plan
    w = plan.weights[name]

    def transform(stored: np.ndarray) -> np.ndarray:
        if store is not None and name in store:
            masked, st = place_weight(w, stored, fold_values(plan, run.fold, name, store.get(name)), plan.pattern,
                                      row_order)
        else:
            masked, st = mask_weight(w, stored, imp(w, w.k_major(stored)) if imp else None, plan.pattern, row_order)
        if not st.valid:
            raise VerificationError(f"weight {name} is not {plan.pattern} after masking; nothing written")
        sink.append(st)
        return masked

    return transform


def provenance(run: Run) -> None:
    """Record in the output's ``metadata_props`` how it was made."""
    from permsparse import __version__

    cfg = run.cfg
    props = {
        "permsparse.version": __version__,
        "permsparse.input": run.src.name,
        "permsparse.input_sha256": run.digest,
        "permsparse.pattern": str(cfg.pattern),
        "permsparse.method": cfg.method,
        "permsparse.policy": cfg.policy,
        "permsparse.importance": cfg.importance,
        "permsparse.objective": cfg.objective,
        "permsparse.reconstruct": cfg.reconstruct,
        "permsparse.sequential": str(cfg.sequential).lower(),
        "permsparse.finetune_epochs": str(cfg.finetune_epochs),
        "permsparse.seed": str(cfg.seed),
        "permsparse.pruned_weights": str(len(run.plan.prunable)),
        "permsparse.permutations": str(len(run.units.units)),
        "permsparse.masked": str(cfg.mask).lower(),
    }
    model = run.out_model
    keep = [p for p in model.metadata_props if not p.key.startswith("permsparse.")]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for k, v in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = k, v


def _verify_feeds(model: onnx.ModelProto, cfg: OptimizeConfig) -> list[dict[str, np.ndarray]]:
    """Random inputs at two sizes (batch 2, two sequence lengths) unless the user fixed the shapes."""
    if cfg.shapes:
        shapes = concrete_shapes(model, cfg.shapes)
        return [random_feeds(model, shapes, seed=cfg.seed + i) for i in (1, 2)]
    return [random_feeds(model, concrete_shapes(model, batch=2, seq=seq), seed=cfg.seed + i + 1)
            for i, seq in enumerate((5, 13))]

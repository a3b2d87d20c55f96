"""The mask-and-write step of ``optimize`` and its postcondition.

    mask_and_save(source, analysis, folded, learned, cfg, dst) -> Saved

Rewrite: each pruned weight gets its N:M mask in the folded row order (the importance's input norms follow the fold),
or — block-wise runs — its rebuilt weight re-indexed by the fold; provenance goes into ``metadata_props``; the output
is written atomically (streamed one tensor at a time for external-data models, so a big model is never held twice).
Postcondition (checked here, on the stored values, by :func:`permsparse.pattern.check_nm` inside the masking
functions): every pruned weight is N:M along its reduction axis. A weight that is not raises
:class:`VerificationError` and the output is removed: nothing half-checked stays on disk.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from permsparse.errors import VerificationError
from permsparse.ir.graph import const_index, export_graph
from permsparse.ir.save import save_model
from permsparse.optimizer.importance import masking_score
from permsparse.passes.sparsify import (
    MaskStats,
    apply_masks,
    fold_values,
    mask_weight,
    place_weight,
)
from permsparse.pipeline.config import ResolvedConfig
from permsparse.pipeline.fold import Folded
from permsparse.pipeline.learn import Learned
from permsparse.pipeline.read import Analysis, Source

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Saved:
    """The written model (None for external-data models streamed to disk) and each pruned weight's mask report."""

    model: onnx.ModelProto | None
    masks: list[MaskStats]


def mask_and_save(source: Source, analysis: Analysis, folded: Folded, learned: Learned, cfg: ResolvedConfig,
                  dst: Path | None) -> Saved:
    """Masks (or reconstructed weights) in the folded order, provenance, atomic write; then the N:M postcondition."""
    plan, fold_result = analysis.plan, folded.fold
    selected = plan.prunable
    row_orders = {n: fold_result.indices[(plan.weights[n].const, plan.weights[n].k_axis)] for n in selected
                  if (plan.weights[n].const, plan.weights[n].k_axis) in fold_result.indices}
    imp = _masking_importance(cfg, learned.x_norms, folded)
    store = learned.blockwise.store if learned.blockwise is not None else None
    masks: list[MaskStats] = []
    if source.external and dst is not None:
        transforms = {} if not cfg.mask.apply else {
            plan.weights[n].const: _streaming_mask(analysis, folded, n, imp, row_orders.get(n), masks, store)
            for n in selected}
        out = export_graph(analysis.graph, source.model)
        provenance(out, source, analysis, cfg)
        save_model(out, dst, external_data=not source.inline, transform=transforms)
    else:
        if cfg.mask.apply:
            consts = const_index(analysis.graph)
            rebuilt = [n for n in selected if store is not None and n in store]
            for n in rebuilt:
                ref = consts[plan.weights[n].const]
                final, st = place_weight(plan.weights[n], ref.values,
                                         fold_values(plan, fold_result, n, store.get(n)), plan.pattern,
                                         row_orders.get(n))
                ref.set_values(final)
                masks.append(st)
            masks += apply_masks(analysis.graph, plan, [n for n in selected if n not in rebuilt], imp, row_orders)
        out = export_graph(analysis.graph, source.model)
        provenance(out, source, analysis, cfg)
        if dst is not None:
            save_model(out, dst)
    valid = {st.weight: st.valid for st in masks}
    bad = [w for w in selected if cfg.mask.apply and not valid.get(w)]
    if bad:
        if dst is not None:
            dst.unlink(missing_ok=True)
        raise VerificationError(f"{len(bad)} weights are not {cfg.pattern} after masking (e.g. {bad[0]}); "
                                "nothing written")
    return Saved(None if source.external else out, masks)


def _masking_importance(cfg: ResolvedConfig, x_norms: dict[str, np.ndarray], folded: Folded):
    """``importance(w, W[K, N])`` for folded weights (the input norms follow the weight's rows); None for magnitude."""
    kind = cfg.mask.importance
    if kind == "magnitude":
        return None  # mask_weight's default: |W|

    def fn(w, wk: np.ndarray) -> np.ndarray:
        x = x_norms.get(w.input)
        idx = folded.fold.indices.get((w.const, w.k_axis))
        if x is not None and idx is not None:
            x = x[idx]
        return masking_score(kind, wk, x_norm=x)

    return fn


def _streaming_mask(analysis: Analysis, folded: Folded, name: str, imp, row_order, sink: list[MaskStats], store):
    plan = analysis.plan
    w = plan.weights[name]

    def transform(stored: np.ndarray) -> np.ndarray:
        if store is not None and name in store:
            masked, st = place_weight(w, stored, fold_values(plan, folded.fold, name, store.get(name)), plan.pattern,
                                      row_order)
        else:
            masked, st = mask_weight(w, stored, imp(w, w.k_major(stored)) if imp else None, plan.pattern, row_order)
        if not st.valid:
            raise VerificationError(f"weight {name} is not {plan.pattern} after masking; nothing written")
        sink.append(st)
        return masked

    return transform


def provenance(model: onnx.ModelProto, source: Source, analysis: Analysis, cfg: ResolvedConfig) -> None:
    """Record in ``model``'s ``metadata_props`` how it was made."""
    from permsparse import __version__

    r = cfg.reconstruction
    props = {
        "permsparse.version": __version__,
        "permsparse.input": source.path.name,
        "permsparse.input_sha256": source.digest,
        "permsparse.pattern": str(cfg.pattern),
        "permsparse.method": cfg.permutation.method,
        "permsparse.policy": cfg.permutation.policy,
        "permsparse.importance": cfg.mask.importance,
        "permsparse.objective": cfg.permutation.objective,
        "permsparse.reconstruct": r.method,
        "permsparse.sequential": str(r.sequential).lower(),
        "permsparse.finetune_epochs": str(r.finetune_epochs),
        "permsparse.seed": str(cfg.seed),
        "permsparse.pruned_weights": str(len(analysis.plan.prunable)),
        "permsparse.permutations": str(len(analysis.units.units)),
        "permsparse.masked": str(cfg.mask.apply).lower(),
    }
    keep = [p for p in model.metadata_props if not p.key.startswith("permsparse.")]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for k, v in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = k, v

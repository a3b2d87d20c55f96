"""Sparsify pass: N:M masks along each weight's reduction axis K, stored densely (zeros in the ONNX weight).

Rewrite. For every selected weight ``W`` (stored as ``[K, N]``, or ``[N, K]`` for Gemm ``transB=1`` or a transposed
constant), in every column and every group of ``m`` consecutive rows along K, keep the ``n`` entries of largest
importance and set the others to zero (or, with reconstruction, store the reconstructed values, which already have
the N:M zeros). Importance is any non-negative array of the weight's ``[K, N]`` shape (magnitude by default; Wanda,
RIA and OBS scores come from calibration). Values keep the stored dtype (fp32, fp16, bf16).

Postcondition (checked on every weight): every column has at most ``n`` non-zeros in each aligned group of ``m``
along K, which is what sparse tensor cores need; :func:`permsparse.pattern.check_nm` verifies it independently of
the mask code.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from permsparse.ir.graph import const_index
from permsparse.ir.weights import WeightInfo
from permsparse.passes.analysis import Plan
from permsparse.pattern import NMPattern, check_nm, nm_group_counts, nm_keep_mask

log = logging.getLogger(__name__)

ImportanceFn = Callable[[WeightInfo, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class MaskStats:
    """Per-weight result of masking."""

    weight: str
    kept_share: float  # share of the importance kept (channels in their folded order)
    kept_share_identity: float  # share N:M would keep with the original channel order (plain N:M)
    kept_magnitude: float  # share of sum |W| kept
    density: float  # non-zeros / size after masking
    valid: bool  # independent N:M check of the masked weight


def k_major(w: WeightInfo, stored: np.ndarray) -> np.ndarray:
    """View of a stored weight as ``[K, N]``."""
    return w.k_major(stored)


def mask_weight(
    w: WeightInfo, stored: np.ndarray, importance: np.ndarray | None, pattern: NMPattern,
    row_order: np.ndarray | None = None, replacement: np.ndarray | None = None,
) -> tuple[np.ndarray, MaskStats]:
    """N:M-mask one stored weight by ``importance`` (``[K, N]``, default |W|); returns (masked stored, stats).

    ``row_order`` (``new[i] = old[row_order[i]]``, from the fold) lets the stats also say what plain N:M would keep.
    ``replacement`` (``[K, N]``, same order as ``stored``): reconstructed values; they are stored where the mask keeps.
    """
    n, m = pattern.n, pattern.m
    wk = k_major(w, stored)
    mag = np.abs(np.asarray(wk, dtype=np.float32))
    imp = mag if importance is None else np.asarray(importance)
    keep = nm_keep_mask(imp, n, m)
    source = wk if replacement is None else np.asarray(replacement).astype(wk.dtype)
    masked = np.where(keep, source, np.zeros((), dtype=wk.dtype))
    total_imp = _total(imp) or 1.0
    kept_imp = _total(imp, keep)
    if row_order is None:
        ident = kept_imp / total_imp
    else:
        orig = imp[np.argsort(row_order)]
        ident = _total(orig, nm_keep_mask(orig, n, m)) / total_imp
    stored_masked = w.stored(masked)
    counts = nm_group_counts(stored_masked, w.k_axis, m)  # read back from the stored values: the independent check
    stats = MaskStats(
        weight=w.name,
        kept_share=kept_imp / total_imp,
        kept_share_identity=ident,
        kept_magnitude=(kept_imp / total_imp if importance is None else _total(mag, keep) / (_total(mag) or 1.0)),
        density=float(counts.sum(dtype=np.int64)) / masked.size if counts is not None else 0.0,
        valid=counts is not None and bool((counts <= n).all()),
    )
    return stored_masked, stats


def _total(values: np.ndarray, keep: np.ndarray | None = None) -> float:
    """Sum of ``values`` (where ``keep``), one row-block at a time (no full-size temporaries); the blocks' sums are
    pairwise float32 sums added in float64, plenty for the shares the stats report."""
    total = 0.0
    step = max(1, (1 << 20) // max(values.shape[1], 1))
    buf = None
    for i in range(0, values.shape[0], step):
        block = values[i:i + step]
        if keep is not None:
            if buf is None or buf.shape != block.shape:
                buf = np.empty(block.shape, dtype=np.result_type(block.dtype, np.float32))
            np.multiply(block, keep[i:i + step], out=buf)
            block = buf
        total += float(block.sum())
    return total


def fold_values(plan: Plan, fold, name: str, eff_stored: np.ndarray) -> np.ndarray:
    """A weight's effective values (original order, stored layout) re-indexed as the fold pass re-indexed the graph."""
    w = plan.weights[name]
    arr = np.asarray(eff_stored)
    for axis in range(arr.ndim):
        idx = fold.indices.get((w.const, axis))
        if idx is not None:
            arr = np.take(arr, idx, axis=axis)
    return arr


def place_weight(
    w: WeightInfo, dense_stored: np.ndarray, final_stored: np.ndarray, pattern: NMPattern,
    row_order: np.ndarray | None = None,
) -> tuple[np.ndarray, MaskStats]:
    """Store reconstructed N:M values (already in the folded order) in place of the dense weight, with stats:
    the share of ``|W|`` at the kept positions, and what plain N:M would keep in the original order."""
    dense = np.abs(np.asarray(w.k_major(dense_stored), dtype=np.float64))
    final = np.asarray(final_stored).astype(np.asarray(dense_stored).dtype)
    keep = w.k_major(final) != 0
    total = float(dense.sum()) or 1.0
    orig = dense if row_order is None else dense[np.argsort(row_order)]
    ident = float(orig[nm_keep_mask(orig, pattern.n, pattern.m)].sum()) / total
    kept = float(dense[keep].sum()) / total
    stats = MaskStats(w.name, kept, ident, kept, float(np.count_nonzero(final)) / max(final.size, 1),
                      check_nm(final, w.k_axis, pattern.n, pattern.m))
    return final, stats


def apply_masks(
    graph: gs.Graph,
    plan: Plan,
    weights: list[str],
    importance: ImportanceFn | None = None,
    row_orders: Mapping[str, np.ndarray] | None = None,
    replacements: Mapping[str, np.ndarray] | None = None,
) -> list[MaskStats]:
    """Mask ``weights`` (names from ``plan``) in place with N:M along K. ``importance(w, W[K, N]) -> [K, N]``."""
    consts = const_index(graph)
    stats = []
    for name in weights:
        w = plan.weights[name]
        ref = consts[w.const]
        stored = ref.values
        imp = None if importance is None else importance(w, k_major(w, stored))
        masked, st = mask_weight(w, stored, imp, plan.pattern, (row_orders or {}).get(name),
                                 (replacements or {}).get(name))
        ref.set_values(masked)
        stats.append(st)
    bad = [st.weight for st in stats if not st.valid]
    if bad:
        raise AssertionError(f"sparsify: {len(bad)} weights are not {plan.pattern} after masking (e.g. {bad[0]})")
    return stats


def nm_report(graph: gs.Graph, plan: Plan) -> Mapping[str, bool]:
    """N:M validity of every weight in ``plan``, read from ``graph``."""
    consts = const_index(graph)
    return {name: check_nm(consts[w.const].values, w.k_axis, plan.n, plan.m) for name, w in plan.weights.items()}


__all__ = ["MaskStats", "apply_masks", "check_nm", "k_major", "mask_weight", "nm_report"]

"""Plain-text tables for the CLI: the optimize summary and the inspect listing."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from permsparse.optimizer.base import nm_keep_mask
from permsparse.passes.analysis import Closure, Plan
from permsparse.passes.graph import const_index
from permsparse.passes.sparsify import check_nm


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Left-aligned text table with a rule under the header."""
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.4f}"
    return str(x)


def closure_label(plan: Plan, c: Closure) -> str:
    """Short human name: the first sibling weight and how many share the permutation."""
    if not c.siblings:
        return f"#{c.id}"
    first = c.siblings[0]
    more = f" +{len(c.siblings) - 1}" if len(c.siblings) > 1 else ""
    return f"#{c.id} {first}{more}"


def optimize_summary(result) -> str:
    """Per-unit table and totals for ``permsparse optimize``."""
    plan: Plan = result.plan
    rows = []
    for rep in result.unit_reports:
        u = rep.unit
        c = plan.closures[u.closure]
        where = "Gather" if u.group is not None else ("fold" if c.foldable else "fold+Gather")
        rows.append(
            [
                u.name,
                len(u.weights),
                u.k,
                "free" if u.block == u.k else u.block,
                where,
                rep.retained_identity,
                rep.retained,
                rep.efficacy,
                f"{rep.seconds:.2f}",
            ]
        )
    out = [
        table(
            ["unit", "weights", "K", "block", "realized by", "kept id", "kept perm", "efficacy", "s"],
            rows,
        )
    ]
    for cid, why in sorted(result.units.identity.items()):
        out.append(f"closure {closure_label(plan, plan.closures[cid])}: identity ({why})")
    n_valid = sum(result.nm_valid.get(w, False) for w in result.selected)
    if result.masks:
        ident = float(np.mean([st.kept_share_identity for st in result.masks]))
        perm = float(np.mean([st.kept_share for st in result.masks]))
        out.append(f"importance kept per weight (mean): plain {plan.n}:{plan.m} {ident:.4f} -> permuted {perm:.4f}")
    if result.unit_reports:
        ident = float(np.mean([r.retained_identity for r in result.unit_reports]))
        perm = float(np.mean([r.retained for r in result.unit_reports]))
        eff = float(np.mean([r.efficacy for r in result.unit_reports]))
        out.append(f"importance kept (mean over units): identity {ident:.4f} -> permuted {perm:.4f}, efficacy {eff:.3f}")
    foldable = sum(c.foldable for c in plan.closures)
    out.append(
        f"weights: {len(plan.weights)} found, {len(result.selected)} pruned"
        + (f", {n_valid}/{len(result.selected)} valid {plan.n}:{plan.m}" if result.masks else " (masks off)")
        + f"; closures: {len(plan.closures)} ({foldable} fold for free); policy {result.units.policy}: "
        f"{len(result.units.units)} permutations, {len(result.fold.gathers)} Gather(s) added"
    )
    out.append("time: " + ", ".join(f"{k} {v:.1f} s" for k, v in result.timings.items() if k != "total"))
    eq = result.equivalence
    out.append(f"fold check: permuted dense model equals the input (max rel. error {eq.max_rel_error:.2e} <= {eq.rtol:g})")
    return "\n".join(out)


def inspect_rows(graph: gs.Graph, plan: Plan) -> list[dict[str, Any]]:
    """One record per weight: shape, K axis, closure, fold status, N:M validity, density, |W| kept by plain N:M."""
    consts = const_index(graph)
    records = []
    for name, w in plan.weights.items():
        values = consts[w.const].values
        c = plan.closure_of(name)
        wk = np.abs(values if w.k_axis == 0 else values.T).astype(np.float64)
        valid_k = w.k % plan.m == 0
        kept = float(wk[nm_keep_mask(wk, plan.n, plan.m)].sum() / max(wk.sum(), 1e-30)) if valid_k else None
        records.append(
            {
                "weight": name,
                "constant": w.const,
                "shape": list(w.stored_shape),
                "k_axis": w.k_axis,
                "closure": None if c is None else c.id,
                "closure_siblings": 0 if c is None else len(c.siblings),
                "block": None if c is None else c.block,
                "fold": "n/a" if c is None else c.describe(),
                "prunable": w.prunable,
                "reason": w.reason,
                f"valid_{plan.n}_{plan.m}": bool(valid_k and check_nm(values, w.k_axis, plan.n, plan.m)),
                "density": float(np.count_nonzero(values) / values.size),
                f"kept_abs_by_{plan.n}_{plan.m}": kept,
            }
        )
    return records

"""Plain-text views for the CLI: the optimize summary and the inspect listing (views of results, no computation)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

#: One sentence each, printed under the optimize table.
DEFINITIONS = (
    "kept: share of a weight's importance that survives N:M masking (1.0 = nothing lost); "
    "'plain' is with the original channel order, 'perm' after the learned permutation.",
    "bound: what each output column would keep if it could drop its least important half anywhere "
    "(unstructured 50%), the most any permutation can reach.",
    "efficacy: share of the gap between plain N:M and the bound that the permutation closes (0 = none, 1 = all).",
)


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


def unit_label(plan, unit) -> str:
    """A unit's name in the words of the graph: its first weight's layer name and how many share it."""
    labels = [plan.weights[w].label for w in unit.weights]
    first = labels[0] if labels else unit.name
    more = f" +{len(labels) - 1}" if len(labels) > 1 else ""
    return first + more


def optimize_summary(result) -> str:
    """Per-unit table and totals for ``permsparse optimize``."""
    plan = result.plan
    pattern = plan.pattern
    rows = []
    for rep in result.unit_reports:
        u = rep.unit
        c = plan.closures[u.closure]
        where = "Gather" if u.group is not None else ("fold" if c.foldable else "fold+Gather")
        rows.append([unit_label(plan, u), len(u.weights), u.k, "free" if u.block == u.k else u.block, where,
                     rep.retained_identity, rep.retained, rep.bound, rep.efficacy, f"{rep.seconds:.2f}"])
    out = []
    if rows:
        out.append(table(["unit (first weight)", "weights", "K", "block", "realized by", "kept plain", "kept perm",
                          "bound", "efficacy", "s"], rows))
        out.extend(DEFINITIONS)
    for cid, why in sorted(result.units.identity.items()):
        c = plan.closures[cid]
        first = plan.weights[c.siblings[0]].label if c.siblings else f"#{cid}"
        out.append(f"closure #{cid} ({first}): no permutation ({why})")
    n_valid = sum(result.nm_valid.get(w, False) for w in result.selected)
    if result.masks:
        ident = float(np.mean([st.kept_share_identity for st in result.masks]))
        perm = float(np.mean([st.kept_share for st in result.masks]))
        out.append(f"importance kept per weight (mean): plain {pattern} {ident:.4f} -> permuted {perm:.4f}")
    foldable = sum(c.foldable for c in plan.closures)
    out.append(
        f"weights: {len(plan.weights)} found, {len(result.selected)} pruned"
        + (f", {n_valid}/{len(result.selected)} valid {pattern}" if result.masks else " (masks off)")
        + f"; closures in the input: {len(plan.closures)} ({foldable} fold for free); policy {result.units.policy}: "
        f"{len(result.units.units)} permutations, {len(result.fold.gathers)} Gather(s) added"
        + (" (each Gather cuts its closure, so `inspect` of the output counts more)" if result.fold.gathers else "")
    )
    out.append("time: " + ", ".join(f"{k} {v:.1f} s" for k, v in result.timings.items() if k != "total"))
    eq = result.equivalence
    out.append(f"fold check ({eq.method}): permuted dense model equals the input "
               f"(max rel. error {eq.max_rel_error:.2e} <= {eq.rtol:g})")
    return "\n".join(out)


def inspect_table(result) -> str:
    """The inspect listing: one row per weight, then totals."""
    pattern = result.pattern
    rows = [
        [
            r["layer"], "x".join(map(str, r["shape"])), r["dtype"], r["k_axis"], r["closure"],
            r["fold"] if len(r["fold"]) < 60 else r["fold"][:57] + "...",
            "yes" if r["nm_valid"] else "no", f"{r['density']:.3f}",
            "-" if r["kept_abs_by_nm"] is None else f"{r['kept_abs_by_nm']:.4f}",
        ]
        for r in result.weights
    ]
    d = result.to_dict()["summary"]
    return "\n".join([
        table(["weight", "shape", "dtype", "K axis", "closure", "fold", str(pattern), "density",
               f"|W| kept by {pattern}"], rows),
        f"{d['weights']} weights, {d['nm_valid']} valid {pattern}; {d['closures']} closures, "
        f"{d['fold_for_free']} fold for free",
    ])

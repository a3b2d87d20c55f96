"""Plain-text views for the CLI: the optimize summary and the inspect listing (views of results, no computation)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

#: One sentence each, printed under the optimize table.
DEFINITIONS = (
    "kept: share of a unit's importance scores that survives N:M masking (1.0 = nothing lost), on the score its "
    "permutation maximizes (the --importance, or SparseGPT's OBS saliency w²/[H⁻¹]ₖₖ² when reconstructing); "
    "'plain' is with the original channel order, 'perm' after the learned permutation.",
    "bound: what each output column would keep if it could drop its least important half anywhere "
    "(unstructured 50%), the most any permutation can reach.",
    "efficacy: share of the gap between plain N:M and the bound that the permutation closes (0 = none, 1 = all).",
)


def reconstructed(result) -> bool:
    """True when the weights were rebuilt block by block (SparseGPT and/or tuning): the kept values are no longer the
    dense ones, so the share of a weight's importance at the kept positions is not what the run optimized."""
    return bool(getattr(result, "block_reports", None))


def unit_means(result) -> tuple[float, float] | None:
    """(plain, permuted) importance kept, mean over units weighted by their weights: the permutations' objective."""
    reps = result.unit_reports
    if not reps:
        return None
    n = np.array([len(r.unit.weights) for r in reps], dtype=np.float64)
    return (float(np.average([r.retained_identity for r in reps], weights=n)),
            float(np.average([r.retained for r in reps], weights=n)))


def measure_lines(result) -> list[str]:
    """The run's quality figures, each on the measure the step optimized (one source for the CLI and the report).

    Per-weight runs: importance kept per weight, plain N:M vs the permuted order (the same scores the permutations
    maximize). Block-wise runs: the permutations' objective per unit, then each block's output error, which is what
    reconstruction and tuning minimize; the rewritten weights' |W| at the kept positions is not an objective there.
    """
    pattern = result.plan.pattern
    out = []
    means = unit_means(result)
    if not reconstructed(result):
        if result.masks:
            ident = float(np.mean([st.kept_share_identity for st in result.masks]))
            perm = float(np.mean([st.kept_share for st in result.masks]))
            out.append(f"importance kept per weight (mean of the {result.config.mask.importance} scores the permutations "
                       f"maximize): plain {pattern} {ident:.4f} -> permuted {perm:.4f}")
        return out
    if means is not None:
        out.append(f"permutation objective, importance kept (mean over {len(result.unit_reports)} units): "
                   f"plain {pattern} {means[0]:.4f} -> permuted {means[1]:.4f}")
    reps = result.block_reports
    pruned = float(np.mean([b.err_pruned for b in reps]))
    final = float(np.mean([b.err_final for b in reps]))
    cfg = result.config
    first = "SparseGPT" if cfg.reconstruction.method == "sparsegpt" else "masking"
    ep = cfg.reconstruction.finetune_epochs
    tuned = f" -> {final:.4g} after {ep} epoch{'s' if ep != 1 else ''} of tuning" if ep else ""
    target = "the dense model's block output" if cfg.reconstruction.teacher == "dense" else "the dense block on the pruned input"
    out.append(f"block output error ||y - y_target||²/||y_target||² against {target}, on calibration data (what "
               f"reconstruction and tuning reduce; mean over {len(reps)} blocks): {pruned:.4g} after {first}{tuned}")
    return out


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
    out.extend(measure_lines(result))
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


def inspect_table(result, verbose: bool = False) -> str:
    """The inspect listing: one row per weight, then totals. The fold column is never cut: a long status names its
    first blocked boundary and the count of the others; ``verbose`` adds each weight's constant and the reason it is
    not prunable, and a listing of the closures with every boundary."""
    pattern = result.pattern
    rows = []
    for r in result.weights:
        row = [
            r["layer"], "x".join(map(str, r["shape"])), r["dtype"], r["k_axis"],
            "-" if r["closure"] is None else r["closure"], r["fold"],
            "yes" if r["nm_valid"] else "no", f"{r['density']:.3f}",
            "-" if r["kept_abs_by_nm"] is None else f"{r['kept_abs_by_nm']:.4f}",
        ]
        if verbose:
            row += [r["constant"], "yes" if r["prunable"] else f"no: {r['reason'] or '-'}"]
        rows.append(row)
    headers = ["weight", "shape", "dtype", "K axis", "closure", "fold", str(pattern), "density",
               f"|W| kept by {pattern}"]
    if verbose:
        headers += ["constant", "prunable"]
    d = result.to_dict()["summary"]
    out = [
        table(headers, rows),
        f"{d['weights']} weights, {d['nm_valid']} valid {pattern}; {d['closures']} closures, "
        f"{d['fold_for_free']} fold for free",
    ]
    if verbose and result.closures:
        crow = [[c["id"], c["k"], "free" if c["block"] == c["k"] else c["block"], len(c["siblings"]),
                 len(c["members"]), "yes" if c["foldable"] else "no",
                 "; ".join(c["boundaries"]) if c["boundaries"] else c["status"]] for c in result.closures]
        out += ["", "closures:", table(["closure", "K", "block", "siblings", "members", "folds free",
                                        "blocked boundaries (or status)"], crow)]
    return "\n".join(out)

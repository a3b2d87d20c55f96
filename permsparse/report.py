"""Quality report for ``permsparse optimize --report DIR``: Markdown plus matplotlib plots — a view of the result.

It shows what the run measured (it computes nothing new and never re-runs the pipeline):

- per weight, the share of importance kept by N:M masking with the identity order vs the learned order;
- per permutation unit, the efficacy: the share of the gap between plain N:M and the unstructured bound (each column
  keeping its best n/m of rows anywhere) that the permutation recovers;
- model level (when the run evaluated it, :mod:`permsparse.evaluate`), the drift of plain N:M and of the result from
  the dense input on held-out inputs: output cosine, mean-pooled sentence cosine (encoders), perplexity (decoders).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from permsparse.errors import PermsparseError
from permsparse.summary import DEFINITIONS, unit_label

log = logging.getLogger(__name__)


def weight_retention(result) -> list[tuple[str, float, float]]:
    """(layer, importance kept by plain N:M, kept after the learned permutation) for every masked weight."""
    return [(result.plan.weights[st.weight].label, st.kept_share_identity, st.kept_share) for st in result.masks]


def _plots(result, out_dir: Path, retention: list[tuple[str, float, float]]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    fig, ax = plt.subplots(figsize=(max(6, 0.22 * len(retention)), 3.6))
    x = np.arange(len(retention))
    ax.bar(x - 0.2, [r[1] for r in retention], 0.4, label="plain N:M")
    ax.bar(x + 0.2, [r[2] for r in retention], 0.4, label="permuted")
    values = [v for r in retention for v in r[1:]]
    ax.set_ylim(max(0.0, min(values) - 0.02), min(1.0, max(values) + 0.02))
    ax.set_xlabel("weight (graph order)")
    ax.set_ylabel("importance kept by N:M")
    ax.legend()
    ax.set_title("Retained importance per weight")
    fig.tight_layout()
    fig.savefig(out_dir / "retained.png", dpi=120)
    plt.close(fig)
    files.append("retained.png")
    reps = result.unit_reports
    if reps:
        fig, ax = plt.subplots(figsize=(max(6, 0.3 * len(reps)), 3.2))
        ax.bar(np.arange(len(reps)), [r.efficacy for r in reps])
        ax.axhline(0.0, color="black", linewidth=0.6)
        ax.set_xlabel("permutation unit")
        ax.set_ylabel("efficacy")
        ax.set_title("Share of the N:M-to-unstructured gap recovered")
        fig.tight_layout()
        fig.savefig(out_dir / "efficacy.png", dpi=120)
        plt.close(fig)
        files.append("efficacy.png")
    return files


def _drift_cells(name: str, d: dict[str, Any]) -> list[str]:
    cells = [name, f"{d['cosine']:.4f}", f"{d['rel_error']:.4f}"]
    cells.append(f"{d['pooled_cosine']:.4f}" if "pooled_cosine" in d else "-")
    cells.append(f"{d['ppl_sparse']:.2f} (dense {d['ppl_dense']:.2f})" if "ppl_sparse" in d else "-")
    return cells


def quality_lines(result) -> list[str]:
    """The plain-N:M-vs-result lines (also printed by the CLI when the run evaluated quality)."""
    q = result.quality
    if not q:
        return []
    cfg = result.config
    how = cfg.method + (" + SparseGPT" if cfg.reconstruct == "sparsegpt" else "") + \
        (f" + tuning ({cfg.finetune_epochs} ep.)" if cfg.finetune_epochs else "")
    rows = [_drift_cells(f"plain {cfg.pattern} (no permutation, {cfg.importance} mask)", q["plain"]),
            _drift_cells(f"{cfg.pattern}, permsparse ({how})", q["result"])]
    return [
        "| model | output cosine | relative error | pooled cosine | perplexity |",
        "|---|---|---|---|---|",
        *("| " + " | ".join(r) + " |" for r in rows),
        f"(held-out data: {q['heldout']['examples']} examples, {q['heldout']['source']})",
    ]


def write_report(result, report_dir: str | Path) -> Path:
    """Write ``report.md`` and its plots into ``report_dir``; returns the Markdown path."""
    from permsparse.ir.save import atomic_write_text

    out_dir = Path(report_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = result.config
    retention = weight_retention(result)
    if not retention:
        raise PermsparseError("--report needs masks: it compares plain and permuted N:M (drop --no-mask)")
    plots = _plots(result, out_dir, retention)
    ident = np.mean([r[1] for r in retention])
    perm = np.mean([r[2] for r in retention])
    eff = [r.efficacy for r in result.unit_reports]
    lines = [
        f"# permsparse report: {result.output.name if result.output else 'model'}",
        "",
        f"method `{cfg.method}`, importance `{cfg.importance}`, policy `{cfg.policy}`, pattern {cfg.pattern}, "
        f"seed {cfg.seed}",
        "",
        "## Summary",
        "",
        f"- weights pruned: {len(result.selected)} of {len(result.plan.weights)}; permutation units: "
        f"{len(result.unit_reports)}; Gathers added: {len(result.fold.gathers)}",
        f"- mean importance kept by {cfg.pattern}: plain {ident:.4f} -> permuted {perm:.4f}",
        f"- mean efficacy over units: {np.mean(eff):.3f}" if eff else "- no permutation units",
        f"- fold check ({result.equivalence.method}): max relative error {result.equivalence.max_rel_error:.2e} "
        f"(tolerance {result.equivalence.rtol:g})",
        "- time: " + ", ".join(f"{k} {v:.1f} s" for k, v in result.timings.items()),
        "",
        *(f"_{d}_" for d in DEFINITIONS),
        "",
    ]
    if result.quality:
        lines += ["## Model-level drift from the dense input (held-out inputs)", "", *quality_lines(result), ""]
    lines += ["## Retained importance per weight", "", f"![retained]({plots[0]})", ""]
    lines += ["| weight | plain | permuted |", "|---|---|---|"]
    lines += [f"| `{n}` | {a:.4f} | {b:.4f} |" for n, a, b in retention]
    lines.append("")
    if len(plots) > 1:
        lines += ["## Efficacy per permutation unit", "", f"![efficacy]({plots[1]})", ""]
        lines += ["| unit | weights | K | block | plain | permuted | bound | efficacy | s |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in result.unit_reports:
            u = r.unit
            lines.append(
                f"| `{unit_label(result.plan, u)}` | {len(u.weights)} | {u.k} | {u.block} | {r.retained_identity:.4f} "
                f"| {r.retained:.4f} | {r.bound:.4f} | {r.efficacy:.3f} | {r.seconds:.2f} |"
            )
    return atomic_write_text(out_dir / "report.md", "\n".join(lines) + "\n")

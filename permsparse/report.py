"""Quality report for ``permsparse optimize --report DIR``: Markdown plus matplotlib plots — a view of the result.

It shows what the run measured (it computes nothing new and never re-runs the pipeline), each figure on the measure
its step optimized (:func:`permsparse.summary.measure_lines`, shared with the CLI):

- per permutation unit, the importance kept by N:M with the original vs the learned order (the score the permutation
  maximizes) and the efficacy: the share of the gap between plain N:M and the unstructured bound (each column
  keeping its best n/m of rows anywhere) that the permutation recovers;
- per weight (per-weight runs), the share of importance kept, plain vs permuted; per block (block-wise runs, where
  SparseGPT and tuning rewrite the kept weights, so kept |W| is no objective), the block's output error after
  reconstruction and after tuning — what those steps reduce;
- model level (when the run evaluated it, :mod:`permsparse.pipeline.evaluate`), the drift of plain N:M and of the result from
  the dense input on held-out inputs: output cosine, mean-pooled sentence cosine (encoders), perplexity (decoders).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from permsparse.errors import PermsparseError
from permsparse.summary import DEFINITIONS, measure_lines, reconstructed, unit_label

log = logging.getLogger(__name__)


def weight_retention(result) -> list[tuple[str, float, float]]:
    """(layer, importance kept by plain N:M, kept after the learned permutation) for every masked weight."""
    return [(result.plan.weights[st.weight].label, st.kept_share_identity, st.kept_share) for st in result.masks]


def _plots(result, out_dir: Path, retention: list[tuple[str, float, float]]) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files: dict[str, str] = {}
    if reconstructed(result):
        reps = result.block_reports
        fig, ax = plt.subplots(figsize=(max(6, 0.4 * len(reps)), 3.6))
        x = np.arange(len(reps))
        ax.bar(x - 0.2, [b.err_pruned for b in reps], 0.4,
               label="after SparseGPT" if result.config.reconstruction.method == "sparsegpt" else "after masking")
        ax.bar(x + 0.2, [b.err_final for b in reps], 0.4, label="final (after tuning, if any)")
        ax.set_xticks(x, [str(b.index) for b in reps])
        ax.set_xlabel("block")
        ax.set_ylabel("relative output error")
        ax.legend()
        ax.set_title("Block output error on calibration data (lower is better)")
        fig.tight_layout()
        fig.savefig(out_dir / "blocks.png", dpi=120)
        plt.close(fig)
        files["blocks"] = "blocks.png"
    else:
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
        files["retained"] = "retained.png"
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
        files["efficacy"] = "efficacy.png"
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
    how = cfg.permutation.method + (" + SparseGPT" if cfg.reconstruction.method == "sparsegpt" else "") + \
        (f" + tuning ({cfg.reconstruction.finetune_epochs} ep.)" if cfg.reconstruction.finetune_epochs else "")
    rows = [_drift_cells(f"plain {cfg.pattern} (no permutation, {cfg.mask.importance} mask)", q["plain"]),
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
    eff = [r.efficacy for r in result.unit_reports]
    lines = [
        f"# permsparse report: {result.output.name if result.output else 'model'}",
        "",
        f"method `{cfg.permutation.method}`, importance `{cfg.mask.importance}`, policy `{cfg.permutation.policy}`, pattern {cfg.pattern}, "
        f"reconstruction `{cfg.reconstruction.method}`, seed {cfg.seed}",
        "",
        "## Summary",
        "",
        f"- weights pruned: {len(result.selected)} of {len(result.plan.weights)}; permutation units: "
        f"{len(result.unit_reports)}; Gathers added: {len(result.fold.gathers)}",
        *(f"- {line}" for line in measure_lines(result)),
        f"- mean efficacy over units: {np.mean(eff):.3f}" if eff else "- no permutation units",
        f"- fold check ({result.equivalence.method}): max relative error {result.equivalence.max_rel_error:.2e} "
        f"(tolerance {result.equivalence.rtol:g})",
        "- time: " + ", ".join(f"{k} {v:.1f} s" for k, v in result.timings.items()),
        "",
        *(f"_{d}_" for d in DEFINITIONS),
        "",
    ]
    if reconstructed(result):
        lines.append("_The weights were rebuilt block by block (SparseGPT's update of the kept weights"
                     + (", then tuning" if cfg.reconstruction.finetune_epochs else "") + "), so how much of a weight's dense |W| or "
                     "importance sits at the kept positions is not what the run optimized and is not reported: the "
                     "permutations are judged on the score they maximize (per unit, below), the reconstruction on "
                     "each block's output error, and the model on held-out data._")
        lines.append("")
    if result.quality:
        lines += ["## Model-level drift from the dense input (held-out inputs)", "", *quality_lines(result), ""]
    if "blocks" in plots:
        first = "after SparseGPT" if cfg.reconstruction.method == "sparsegpt" else "after masking"
        lines += ["## Output error per block (calibration data)", "", f"![blocks]({plots['blocks']})", ""]
        lines += [f"| block | weights | {first} | final |", "|---|---|---|---|"]
        lines += [f"| {b.index} | {b.weights} | {b.err_pruned:.4g} | {b.err_final:.4g} |" for b in result.block_reports]
        lines.append("")
    else:
        lines += ["## Retained importance per weight", "", f"![retained]({plots['retained']})", ""]
        lines += ["| weight | plain | permuted |", "|---|---|---|"]
        lines += [f"| `{n}` | {a:.4f} | {b:.4f} |" for n, a, b in retention]
        lines.append("")
    if "efficacy" in plots:
        lines += ["## Permutation units: importance kept and efficacy", "", f"![efficacy]({plots['efficacy']})", ""]
        lines += ["| unit | weights | K | block | plain | permuted | bound | efficacy | s |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in result.unit_reports:
            u = r.unit
            lines.append(
                f"| `{unit_label(result.plan, u)}` | {len(u.weights)} | {u.k} | {u.block} | {r.retained_identity:.4f} "
                f"| {r.retained:.4f} | {r.bound:.4f} | {r.efficacy:.3f} | {r.seconds:.2f} |"
            )
    return atomic_write_text(out_dir / "report.md", "\n".join(lines) + "\n")

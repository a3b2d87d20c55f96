"""Quality report for ``permsparse optimize --report DIR``: Markdown plus matplotlib plots.

What it shows, all measured in the run that writes it:

- per weight, the share of importance kept by N:M masking with the identity order vs the learned order;
- per permutation unit, the efficacy: the share of the gap between plain N:M and the unstructured bound (each column
  keeping its best n/m of rows anywhere) that the permutation recovers;
- model level, the drift of the sparse model from the dense input on held-out inputs (cosine of outputs, mean-pooled
  sentence cosine for encoders with an attention mask, cross-entropy/perplexity for decoders), for the chosen method
  and for plain N:M without permutation, so the gain is visible.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from permsparse.errors import PermsparseError

log = logging.getLogger(__name__)


def weight_retention(result) -> list[tuple[str, float, float]]:
    """(weight, importance kept by plain N:M, kept after the learned permutation) for every masked weight."""
    return [(st.weight, st.kept_share_identity, st.kept_share) for st in result.masks]


def _plots(result, out_dir: Path, retention: list[tuple[str, float, float]]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    fig, ax = plt.subplots(figsize=(max(6, 0.22 * len(retention)), 3.6))
    x = np.arange(len(retention))
    ax.bar(x - 0.2, [r[1] for r in retention], 0.4, label="identity")
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


def _drift(src: Path, sparse: Path, cfg) -> dict[str, Any]:
    from permsparse.optimizer.data import make_feeds
    from permsparse.optimizer.metrics import evaluate_drift

    feeds = make_feeds(
        str(src), cfg.calib, samples=64, batch_size=8, seq_len=cfg.calib_seq_len,
        tokenizer_dir=cfg.tokenizer_dir, seed=cfg.seed + 1, split="heldout",
    )
    return evaluate_drift(str(src), str(sparse), feeds, progress=False)


def _drift_rows(name: str, d: dict[str, Any]) -> list[str]:
    cells = [name, f"{d['cosine']:.4f}", f"{d['rel_error']:.4f}"]
    cells.append(f"{d['pooled_cosine']:.4f}" if "pooled_cosine" in d else "-")
    cells.append(f"{d['ppl_sparse']:.2f} (dense {d['ppl_dense']:.2f})" if "ppl_sparse" in d else "-")
    return cells


def write_report(result, src: str | Path, report_dir: str | Path, cfg) -> Path:
    """Write ``report.md`` and its plots into ``report_dir``; returns the Markdown path."""
    from permsparse.pipeline import optimize

    out_dir = Path(report_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    src = Path(src)
    retention = weight_retention(result)
    if not retention:
        raise PermsparseError("--report needs masks: it compares plain and permuted N:M (drop --no-mask)")
    plots = _plots(result, out_dir, retention)

    drift_rows = []
    if cfg.mask:
        with tempfile.TemporaryDirectory(prefix="permsparse-report-") as tmp:
            sparse = result.output
            if sparse is None:
                sparse = Path(tmp) / "sparse.onnx"
                from permsparse.onnxio import save_model

                save_model(result.model, sparse)
            method = _drift(src, sparse, cfg)
            base_cfg = dataclasses.replace(cfg, method="identity", policy="fold", progress=False)
            baseline = optimize(src, Path(tmp) / "identity.onnx", base_cfg)
            plain = _drift(src, baseline.output, cfg)
        drift_rows = [_drift_rows(f"{cfg.n}:{cfg.m}, identity order", plain), _drift_rows(f"{cfg.n}:{cfg.m}, {cfg.method}", method)]

    ident = np.mean([r[1] for r in retention])
    perm = np.mean([r[2] for r in retention])
    eff = [r.efficacy for r in result.unit_reports]
    lines = [
        f"# permsparse report: {src.name}",
        "",
        f"method `{cfg.method}`, importance `{cfg.importance}`, policy `{cfg.policy}`, pattern {cfg.n}:{cfg.m}, "
        f"seed {cfg.seed}",
        "",
        "## Summary",
        "",
        f"- weights pruned: {len(result.selected)} of {len(result.plan.weights)}; permutation units: "
        f"{len(result.unit_reports)}; Gathers added: {len(result.fold.gathers)}",
        f"- mean importance kept by {cfg.n}:{cfg.m}: identity {ident:.4f} -> permuted {perm:.4f}",
        f"- mean efficacy over units: {np.mean(eff):.3f}" if eff else "- no permutation units",
        f"- fold check: max relative error {result.equivalence.max_rel_error:.2e} (tolerance {result.equivalence.rtol:g})",
        "- time: " + ", ".join(f"{k} {v:.1f} s" for k, v in result.timings.items()),
        "",
    ]
    if drift_rows:
        lines += [
            "## Model-level drift from the dense input (held-out inputs)",
            "",
            "| model | output cosine | relative error | pooled cosine | perplexity |",
            "|---|---|---|---|---|",
            *("| " + " | ".join(r) + " |" for r in drift_rows),
            "",
        ]
    lines += ["## Retained importance per weight", "", f"![retained]({plots[0]})", ""]
    lines += ["| weight | identity | permuted |", "|---|---|---|"]
    lines += [f"| `{n}` | {a:.4f} | {b:.4f} |" for n, a, b in retention]
    lines.append("")
    if len(plots) > 1:
        lines += ["## Efficacy per permutation unit", "", f"![efficacy]({plots[1]})", ""]
        lines += ["| unit | weights | K | block | identity | permuted | bound | efficacy | s |", "|---|---|---|---|---|---|---|---|---|"]
        for r in result.unit_reports:
            u = r.unit
            lines.append(
                f"| `{u.name}` | {len(u.weights)} | {u.k} | {u.block} | {r.retained_identity:.4f} | {r.retained:.4f} "
                f"| {r.bound:.4f} | {r.efficacy:.3f} | {r.seconds:.2f} |"
            )
    path = out_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path

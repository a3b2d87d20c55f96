#!/usr/bin/env python
"""Recovery curve: held-out perplexity (in-domain and out-of-domain) of a one-shot 2:4 model before and after
``permsparse recover``, at several recovery budgets; a Markdown table, a JSON log and a PNG curve.

    python bench/recovery.py --dense out/smollm2/dense.onnx --sparse out/smollm2/sparse.onnx \
        --minutes 5,10 --params all --out bench/results/recovery-smollm2.md

The budgets are chained: the second run starts from the first run's output (each with its own warm-up and cosine
decay), so ``--minutes 5,10`` gives points at 0, 5 and 15 minutes of recovery. In-domain: the Wikipedia held-out
split (``permsparse.data.corpus.texts("wiki", "heldout")``, the split ``bench/quality.py`` uses); out-of-domain: the
``parliament`` held-out split (UK House of Commons speeches), a domain that neither calibration nor recovery reads.
Recovery trains on the corpus's ``train`` split (disjoint from both). Perplexity is scored by onnxruntime on the
written ONNX models (:func:`permsparse.data.metrics.perplexity`), independently of the recovery's own evaluator.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from permsparse.data import corpus
from permsparse.data.feeds import lm_token_windows, token_feeds
from permsparse.data.metrics import perplexity
from permsparse.data.text import find_tokenizer


def eval_feeds(model: Path, domain: str, samples: int, seq: int):
    tok = find_tokenizer(model)
    ids = lm_token_windows(corpus.texts(domain, "heldout"), tok, seq, samples, what=f"{domain} held-out")
    return token_feeds(str(model), ids, batch_size=8, seq_len=seq)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dense", type=Path, required=True)
    ap.add_argument("--sparse", type=Path, required=True)
    ap.add_argument("--minutes", default="5,10", help="chained recovery budgets in minutes")
    ap.add_argument("--steps", default=None, help="chained recovery budgets in steps instead of minutes")
    ap.add_argument("--params", default="all", choices=("all", "norms"))
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--samples", type=int, default=16, help="held-out windows per domain")
    ap.add_argument("--seq", type=int, default=256, help="tokens per held-out window")
    ap.add_argument("--train-seq", type=int, default=None, help="tokens per training sequence (default 128)")
    ap.add_argument("--batch-size", type=int, default=None, help="training sequences per step (default 4)")
    ap.add_argument("--hidden-weight", type=float, default=None, help="weight of the per-block term (default 1)")
    ap.add_argument("--work", type=Path, default=Path("out/recovery"))
    ap.add_argument("--out", type=Path, default=None, help="append the rows to this Markdown file")
    ap.add_argument("--skip-base", action="store_true", help="do not evaluate dense and the one-shot model again")
    args = ap.parse_args()

    from permsparse.recover import RecoverConfig, recover

    args.work.mkdir(parents=True, exist_ok=True)
    feeds = {d: eval_feeds(args.dense, d, args.samples, args.seq) for d in ("wiki", corpus.OUT_OF_DOMAIN)}
    log = args.work / f"recovery-{args.params}.jsonl"

    def score(path: Path) -> dict:
        return {d: perplexity(str(path), f, progress=False)["ppl"] for d, f in feeds.items()}

    rows = []
    if not args.skip_base:
        dense = score(args.dense)
        rows.append({"row": "dense", "minutes": None, **dense})
        rows.append({"row": "one-shot (input)", "minutes": 0.0, **score(args.sparse)})
        for r in rows:
            print(json.dumps(r), flush=True)
            with open(log, "a") as f:
                f.write(json.dumps(r) + "\n")
    student, total = args.sparse, 0.0
    budgets = [("steps", int(x)) for x in args.steps.split(",")] if args.steps else \
        [("minutes", float(x)) for x in args.minutes.split(",")]
    for i, (unit, b) in enumerate(budgets):
        out = args.work / f"recovered-{args.params}-{i}.onnx"
        t0 = time.perf_counter()
        res = recover(student, args.dense, out, RecoverConfig(**{unit: b}, params=args.params, lr=args.lr,
                                                                 seq_len=args.train_seq, batch_size=args.batch_size,
                                                                 hidden_weight=args.hidden_weight))
        total += (time.perf_counter() - t0) / 60.0 if unit == "steps" else b
        r = {"row": f"recovery {args.params}", "minutes": total, "wall_s": time.perf_counter() - t0,
             "steps": res.steps, "tokens": res.tokens, "lr": res.lr,
             "train_seq": args.train_seq or 128, "batch_size": args.batch_size or 4,
             "hidden_weight": args.hidden_weight, "improved": res.improved,
             "best_step": res.best_step, "stop_ppl_before": res.heldout_before, "stop_ppl_best": res.heldout_best,
             "peak_rss_mb": res.peak_rss_mb, "data": res.data_source, "data_sha256": res.data_sha256,
             "curve": res.curve, **score(out)}
        print(json.dumps(r), flush=True)
        with open(log, "a") as f:
            f.write(json.dumps(r) + "\n")
        rows.append(r)
        student = out
    if args.out is not None:
        with open(args.out, "a") as f:
            for r in rows:
                f.write(f"| {r['row']} | {'' if r['minutes'] is None else r['minutes']} | {r['wiki']:.2f} | "
                        f"{r[corpus.OUT_OF_DOMAIN]:.2f} | {r.get('steps', '')} | {r.get('tokens', '')} | "
                        f"{r.get('peak_rss_mb', 0):.0f} |\n")


def plot(log: Path, png: Path) -> Path:
    """Held-out perplexity vs recovery minutes (in-domain and out-of-domain), dense as dashed lines."""
    rows = _rows(log)
    dense = next((r for r in rows if r["row"] == "dense"), None)
    pts = sorted((r for r in rows if r["minutes"] is not None), key=lambda r: r["minutes"])
    fig, ax = _axes((6, 4))
    for d, c in DOMAIN_COLORS:
        ax.plot([r["minutes"] for r in pts], [r[d] for r in pts], "o-", color=c, label=f"recovered, {d} held-out")
        if dense is not None:
            ax.axhline(dense[d], color=c, ls="--", lw=1, label=f"dense, {d}")
    return _save(fig, ax, "recovery minutes (wall clock, 2-core CPU)",
                 "SmolLM2-135M 2:4: recovery from the one-shot defaults", png)


def plot_steps(png: Path, logs: list[Path]) -> Path:
    """Held-out perplexity (both domains) vs cumulative recovery steps, one line pair per log (its learning rate in
    the label): compares runs whose wall clocks are not comparable (a shared machine). A log's rows are its chained
    runs; a run's point is at the cumulative steps it ended with, the one-shot input at 0."""
    fig, ax = _axes((6.5, 4))
    dense = None
    for log, ls in zip(logs, ("o-", "s--", "^-.", "d:")):
        rows = _rows(log)
        dense = next((r for r in rows if r["row"] == "dense"), dense)
        base = next((r for r in rows if r.get("minutes") == 0.0), None)
        runs = [r for r in rows if r.get("steps") and r["row"] not in ("dense",)]
        pts, total = ([(0, base)] if base else []), 0
        for r in runs:
            total = r.get("total_steps") or r.get("cumulative_steps") or total + r["steps"]
            pts.append((total, r))
        lr = next((r["lr"] for r in runs if r.get("lr")), None)
        for d, c in DOMAIN_COLORS:
            ax.plot([x for x, _ in pts], [r[d] for _, r in pts], ls, color=c, label=f"lr {lr:g}, {d}")
    if dense is not None:
        for d, c in DOMAIN_COLORS:
            ax.axhline(dense[d], color=c, ls=":", lw=1, label=f"dense, {d}")
    return _save(fig, ax, "recovery steps (4 x 128 tokens each)", "SmolLM2-135M 2:4: recovery by learning rate", png)


#: the held-out sets and their colours in every plot
DOMAIN_COLORS = (("wiki", "tab:blue"), (corpus.OUT_OF_DOMAIN, "tab:red"))


def _rows(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def _axes(size: tuple[float, float]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=size)


def _save(fig, ax, xlabel: str, title: str, png: Path) -> Path:
    """The plots' common finish: perplexity on a log axis, legend, written to ``png``."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel("perplexity")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    return png


if __name__ == "__main__":
    import sys

    if len(sys.argv) == 4 and sys.argv[1] == "plot":  # python bench/recovery.py plot LOG.jsonl OUT.png
        print(plot(Path(sys.argv[2]), Path(sys.argv[3])))
    elif len(sys.argv) >= 4 and sys.argv[1] == "plot-steps":  # ... plot-steps OUT.png LOG.jsonl [LOG.jsonl ...]
        print(plot_steps(Path(sys.argv[2]), [Path(a) for a in sys.argv[3:]]))
    else:
        main()

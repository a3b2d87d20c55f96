#!/usr/bin/env python
"""Permutation methods side by side, end to end: one table per model, all numbers from this run.

For each model and method: `permsparse optimize` (policy local, 2:4) → mean efficacy over permutation units (share of
the gap between plain 2:4 and the unstructured bound recovered), mean importance kept per weight, learning seconds, and
the drift of the sparse model from the dense input on held-out inputs: output cosine, mean-pooled sentence cosine
(MiniLM) or perplexity (decoder). MiniLM uses its real weights, Wanda importance calibrated on real Wikipedia text, and
held-out Wikipedia text; the ViT/LLaMA builders have seeded weights (random images; byte-level token ids), so their
drift numbers show structure, not task quality.

    python bench/permutation_quality.py [--models minilm,vit,llama] [--methods identity,lsa,channel_swap,learned]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from permsparse.data.feeds import make_feeds
from permsparse.data.metrics import evaluate_drift
from permsparse.models import export_model
from permsparse.pipeline import OptimizeConfig, optimize
from permsparse.summary import table

SETUPS = {
    "minilm": dict(size="tiny", importance="wanda"),
    "vit": dict(size="small", importance="magnitude"),
    "llama": dict(size="tiny", importance="wanda"),
}


def run_model(name: str, methods: list[str], work: Path, samples: int, budget: float | None) -> list[list]:
    setup = SETUPS[name]
    src = export_model(name, work / f"{name}.onnx", exporter="dynamo", size=setup["size"])
    feeds = make_feeds(str(src), None, samples=samples, batch_size=8, seq_len=128, seed=1, split="heldout")
    rows = []
    for method in methods:
        cfg = OptimizeConfig(method=method, importance=setup["importance"], policy="local", reconstruct="none",
                             progress=False, budget_s=budget)  # permutations alone, no reconstruction
        out = work / f"{name}.{method}.onnx"
        t = time.perf_counter()
        res = optimize(src, out, cfg)
        total = time.perf_counter() - t
        eff = float(np.mean([r.efficacy for r in res.unit_reports])) if res.unit_reports else 0.0
        kept = float(np.mean([m.kept_share for m in res.masks]))
        drift = evaluate_drift(str(src), str(out), feeds, progress=False)
        extra = f"{drift['pooled_cosine']:.4f}" if "pooled_cosine" in drift else "-"
        ppl = f"{drift['ppl_sparse']:.2f}/{drift['ppl_dense']:.2f}" if "ppl_sparse" in drift else "-"
        rows.append([name, method, f"{eff:.4f}", f"{kept:.4f}", f"{drift['cosine']:.4f}", extra, ppl,
                     f"{res.timings['learn']:.1f}", f"{total:.1f}"])
        print(" ".join(map(str, rows[-1])), flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="minilm,vit,llama")
    ap.add_argument("--methods", default="identity,lsa,channel_swap,learned")
    ap.add_argument("--samples", type=int, default=64, help="held-out examples for drift")
    ap.add_argument("--budget-s", type=float, default=None, help="learning budget per model run")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="permsparse-quality-") as tmp:
        for name in args.models.split(","):
            rows += run_model(name, args.methods.split(","), Path(tmp), args.samples, args.budget_s)
    print()
    print(table(["model", "method", "efficacy", "kept imp.", "out cosine", "pooled cos", "ppl sparse/dense",
                 "learn s", "total s"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

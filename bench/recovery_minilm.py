#!/usr/bin/env python
"""MiniLM recovery: mean-pooled sentence cosine to the dense model on held-out text, before and after recovery.

    python bench/recovery_minilm.py --dense minilm.onnx --sparse minilm.sparse.onnx --minutes 8

In-domain: 64 texts of the Wikipedia held-out split (as ``bench/quality.py``) and, for short inputs, 64 of the
``film`` held-out split (review snippets and plot sentences, ~31 tokens); out-of-domain: 64 texts of the
``parliament`` held-out split (long speeches, nearly all cut at 128 tokens). Recovery trains on the corpus's
``train`` split. Cosines are computed on onnxruntime (:func:`permsparse.data.metrics.evaluate_drift`) from the
written models.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from permsparse.data import corpus
from permsparse.data.feeds import text_feeds
from permsparse.data.metrics import evaluate_drift


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dense", type=Path, required=True)
    ap.add_argument("--sparse", type=Path, required=True)
    ap.add_argument("--minutes", type=float, default=8.0)
    ap.add_argument("--params", default="all")
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--hidden-weight", type=float, default=None, help="weight of the per-block term (default 1)")
    ap.add_argument("--batch-size", type=int, default=None, help="texts per step (default 4)")
    ap.add_argument("--max-windows", type=int, default=None, help="training texts read at most (default 4096)")
    ap.add_argument("--calib", default=None, help="training text (default: the corpus's train split)")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps (with --minutes: whichever ends first)")
    ap.add_argument("--out", type=Path, default=Path("out/recovery/minilm.onnx"))
    args = ap.parse_args()
    from permsparse.recover import RecoverConfig, recover

    feeds = {d: text_feeds(str(args.dense), corpus.texts(d, "heldout", n=64), None, 8, 128)
             for d in ("wiki", "film", corpus.OUT_OF_DOMAIN)}

    def cos(path: Path) -> dict:
        return {d: evaluate_drift(str(args.dense), str(path), f, progress=False)["pooled_cosine"]
                for d, f in feeds.items()}

    print(json.dumps({"row": "one-shot defaults (input)", **cos(args.sparse)}), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    res = recover(args.sparse, args.dense, args.out, RecoverConfig(minutes=args.minutes, steps=args.steps,
                                                                   params=args.params, lr=args.lr,
                                                                   hidden_weight=args.hidden_weight,
                                                                   batch_size=args.batch_size,
                                                                   max_windows=args.max_windows, calib=args.calib,
                                                                   progress=False))
    print(json.dumps({"row": f"recovery {args.params} {args.minutes} min",
                      "lr": res.lr, "hidden_weight": args.hidden_weight, "batch_size": args.batch_size,
                      "max_windows": args.max_windows, "calib": args.calib, "wall_s": time.perf_counter() - t0,
                      "steps": res.steps, "tokens": res.tokens, "improved": res.improved, "precision": res.precision,
                      "stop_cos_before": res.heldout_before, "stop_cos_best": res.heldout_best,
                      "peak_rss_mb": res.peak_rss_mb, "curve": res.curve, **cos(args.out)}), flush=True)


if __name__ == "__main__":
    main()

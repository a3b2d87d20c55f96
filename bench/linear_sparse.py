#!/usr/bin/env python3
"""Dense vs 2:4 semi-structured linear layers in PyTorch, shapes from the command line (no ONNX, no models).

    python bench/linear_sparse.py --shape qkv=197x768x768*36 --shape fc1=197x768x3072*12 \
        --dtype fp16 bf16 --methods semi cslt --label "ViT-B/16 batch 1" --md out.md

Each shape is TOKENSxKxN[*COUNT] (x[T,K] @ W[K,N], COUNT layers per forward). Prints one Markdown table per dtype:
dense and sparse median/p90 per call, speed-up per shape, and the COUNT-weighted sum over all shapes (the model's
linear-layer speed-up). Methods: semi (torch.sparse.to_sparse_semi_structured, torch's default backend), cutlass,
cusparselt (forced backends), cslt (torch._cslt_compress + torch._cslt_sparse_mm with cuSPARSELt's algorithm search).
Records torch/CUDA/cuSPARSELt versions and the GPU. Needs a CUDA GPU (exit code 2 otherwise), except with
``--device cpu``: a dense-only rehearsal of the harness (what ``bench/gpu.sh --dry-run`` runs).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from permsparse.runtime.timing import TimingStats
from permsparse.runtime.torch_sparse import (
    DTYPES,
    SPARSE_METHODS,
    LinearShape,
    LinearTiming,
    cuda_available,
    env_info,
    time_linear,
)


def _ms(s: TimingStats | None) -> str:
    return "fail" if s is None else f"{s.median_ms:.4f} / {s.p90_ms:.4f}"


def table(label: str, dtype: str, methods: list[str], timings: list[LinearTiming]) -> str:
    head = ["shape (TxKxN ×count)", "dense ms (med/p90)"]
    for m in methods:
        head += [f"{m} ms (med/p90)", f"{m} speed-up", f"{m} rel.err"]
    lines = [f"### {label} — {dtype}", "", "| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    tot_d = 0.0
    tot_s = {m: 0.0 for m in methods}
    ok = {m: True for m in methods}
    for t in timings:
        row = [str(t.shape), _ms(t.dense)]
        tot_d += t.dense.median_ms * t.shape.count
        for m in methods:
            s = t.sparse.get(m)
            sp = t.speedup(m)
            row += [_ms(s), "—" if sp is None else f"{sp:.2f}×", f"{t.rel_error[m]:.1e}" if m in t.rel_error else "—"]
            if s is None:
                ok[m] = False
            else:
                tot_s[m] += s.median_ms * t.shape.count
        lines.append("| " + " | ".join(row) + " |")
    row = ["**all linear layers (sum of medians × count)**", f"{tot_d:.4f}"]
    for m in methods:
        row += [f"{tot_s[m]:.4f}" if ok[m] else "incomplete", f"**{tot_d / tot_s[m]:.2f}×**" if ok[m] and tot_s[m] else "—", ""]
    lines.append("| " + " | ".join(row) + " |")
    errors = {(str(t.shape), m): e for t in timings for m, e in t.errors.items()}
    lines += [""] + [f"- {shape} {m}: {e}" for (shape, m), e in errors.items()]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", action="append", required=True, metavar="[NAME=]TxKxN[*COUNT]")
    ap.add_argument("--dtype", nargs="+", choices=[*DTYPES, "fp32"], default=["fp16"],
                    help="fp16 / bf16 (2:4 kernels); fp32 only for the --device cpu rehearsal")
    ap.add_argument("--methods", nargs="+", choices=SPARSE_METHODS, default=["semi", "cslt"])
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--label", default="linear layers")
    ap.add_argument("--md", type=Path, default=None, help="append the Markdown table to this file")
    ap.add_argument("--json", type=Path, default=None, help="append one JSON line per dtype to this file")
    ap.add_argument("--env", action="store_true", help="print the environment (versions, GPU) as Markdown first")
    ap.add_argument("--cuda-graph", action="store_true",
                    help="time replays of a CUDA graph (no per-call host work, as the whole-model evaluator runs)")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                    help="cpu: a dense-only rehearsal (2:4 methods are recorded as not run)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        shapes = [LinearShape.parse(s) for s in args.shape]
    except ValueError as exc:
        ap.error(str(exc))
    if args.device == "cuda" and not cuda_available():
        print("linear_sparse.py needs a CUDA GPU (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    env = env_info()
    out = []
    if args.env:
        out.append("| key | value |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in env.items()))
    for dtype in args.dtype:
        timings = [time_linear(s, dtype, args.methods, iters=args.iters, warmup=args.warmup, device=args.device,
                               graph=args.cuda_graph)
                   for s in shapes]
        out.append(table(args.label + (" (CUDA graph)" if args.cuda_graph else ""), dtype, args.methods, timings))
        if args.json:
            rec = {
                "date": _dt.datetime.now().isoformat(timespec="seconds"),
                "label": args.label,
                "dtype": dtype,
                "env": env,
                "shapes": [
                    {
                        "shape": str(t.shape),
                        "dense_ms": t.dense.median_ms,
                        "dense_p90_ms": t.dense.p90_ms,
                        "sparse_ms": {m: (s.median_ms if s else None) for m, s in t.sparse.items()},
                        "sparse_p90_ms": {m: (s.p90_ms if s else None) for m, s in t.sparse.items()},
                        "rel_error": t.rel_error,
                        "errors": t.errors,
                        "cslt_alg_id": t.alg_id,
                    }
                    for t in timings
                ],
            }
            with args.json.open("a", encoding="utf-8") as f:
                f.write(json.dumps(rec) + "\n")
    text = "\n".join(out)
    print(text)
    if args.md:
        with args.md.open("a", encoding="utf-8") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

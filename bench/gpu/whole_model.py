#!/usr/bin/env python3
"""Whole-model latency rows: each sparse ONNX on the torch evaluator (2:4 kernels) vs the dense ONNX on the same
evaluator, and (``--compile``) vs the dense model through ``torch.compile`` — ``permsparse bench --backend torch``
through the Python API, all rows in one process (one CUDA start-up).

    python bench/gpu/whole_model.py --models-json models.jsonl --md OUT.md [--device cuda] [--precision fp16]
        [--iters 30] [--tiny] [--compile vit-b64 ...]

Rows (full sizes; ``--tiny`` uses small batches/sequences for the CPU rehearsal): ViT-B/16 batch 1/8/64;
SmolLM2-135M and the 1B LLaMA prefill 2048 tokens and decode batch 1/64 (one token per sequence, no KV cache: the
linear layers see what decode gives them, attention is over one token); BERT-base batch 16/128 at 128 tokens.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

ROWS = {  # row id -> (model, label, shapes (full), shapes (tiny)); cheap models first, so a spent budget cuts the 1B
    "vit-b1": ("vit", "ViT-B/16 batch 1", ["pixel_values:1x3x224x224"], ["pixel_values:1x3x32x32"]),
    "vit-b8": ("vit", "ViT-B/16 batch 8", ["pixel_values:8x3x224x224"], ["pixel_values:2x3x32x32"]),
    "vit-b64": ("vit", "ViT-B/16 batch 64", ["pixel_values:64x3x224x224"], ["pixel_values:4x3x32x32"]),
    "bert-b16": ("bert", "BERT-base batch 16 × 128", ["input_ids:16x128", "attention_mask:16x128"],
                 ["input_ids:2x16", "attention_mask:2x16"]),
    "bert-b128": ("bert", "BERT-base batch 128 × 128", ["input_ids:128x128", "attention_mask:128x128"],
                  ["input_ids:4x16", "attention_mask:4x16"]),
    "smollm2-prefill": ("smollm2", "SmolLM2-135M prefill 2048", ["input_ids:1x2048"], ["input_ids:1x32"]),
    "smollm2-decode1": ("smollm2", "SmolLM2-135M decode batch 1", ["input_ids:1x1"], ["input_ids:1x1"]),
    "smollm2-decode64": ("smollm2", "SmolLM2-135M decode batch 64", ["input_ids:64x1"], ["input_ids:4x1"]),
    "llama1b-prefill": ("llama1b", "LLaMA-1B prefill 2048", ["input_ids:1x2048"], ["input_ids:1x32"]),
    "llama1b-decode1": ("llama1b", "LLaMA-1B decode batch 1", ["input_ids:1x1"], ["input_ids:1x1"]),
    "llama1b-decode64": ("llama1b", "LLaMA-1B decode batch 64", ["input_ids:64x1"], ["input_ids:4x1"]),
}


#: Rows whose sparse model is also run on onnxruntime (CPU) as a reference: the cheap ones (the 1B is 4.4 GB).
REFERENCE = {"vit-b1", "vit-b8", "bert-b16", "smollm2-prefill", "smollm2-decode1", "smollm2-decode64"}


def tokens(shapes: list[str]) -> int:
    """Rows of activations each linear layer sees: batch × sequence (ViT-B/16: batch × 197 patches + CLS)."""
    name, _, dims = shapes[0].partition(":")
    d = [int(v) for v in dims.split("x")]
    if name == "pixel_values":
        return d[0] * ((d[2] // 16) * (d[3] // 16) + 1)
    return d[0] * d[1]


def reading(speedup: float, t: int, notes: list[str]) -> str:
    """Why a row is slower (or not faster): the kernel fallbacks and the token count, stated, not guessed at."""
    why = [n for n in notes if n.startswith("dense fallback") or n.startswith("CUDA graph: not")]
    if speedup < 1.0 and t < 1024:
        why.append(f"{t} tokens per linear layer: too few for 2:4 to pay (weights read once per call, memory-bound)")
    return "; ".join(why) or "—"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models-json", type=Path, required=True, help="make_models.py's output (JSON lines)")
    ap.add_argument("--md", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default=None, help="default: fp16 on CUDA, fp32 on CPU")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--compile", nargs="*", default=[], choices=list(ROWS), help="rows that also time torch.compile")
    ap.add_argument("--budget-s", type=float, default=None, help="skip the remaining rows after this many seconds")
    args = ap.parse_args(argv)
    from permsparse.api import bench
    from permsparse.ir.shapes import parse_shapes
    from permsparse.runtime.backends import BenchConfig

    models = {}
    for line in args.models_json.read_text(encoding="utf-8").splitlines():
        if line.startswith("{"):
            rec = json.loads(line)
            models[rec["model"]] = rec
    lines = ["## Whole models on the torch evaluator", "",
             "Dense = the dense ONNX on the same evaluator (cuBLAS); sparse = the 2:4 ONNX with each 2:4 weight on a "
             "2:4 kernel compressed once at load; both in a CUDA graph where it applies. Median / p90 ms per forward. "
             "Decode rows: one new token per sequence without a KV cache.", "",
             "| row | tokens | dense ms | sparse ms | speed-up | vs torch.compile dense | sparse vs ORT max rel | "
             "why not faster | notes |",
             "|---|---|---|---|---|---|---|---|---|"]
    records = []
    t_start = time.perf_counter()
    # The plain rows first, then the torch.compile baselines (compiling takes long; a spent budget cuts them last).
    for row, with_compile in [*((r, False) for r in args.rows), *((r, True) for r in args.compile)]:
        model, label, full, tiny = ROWS[row]
        label += (" [tiny shapes]" if args.tiny else "") + (", + dense torch.compile" if with_compile else "")
        rec: dict = {"row": row, "label": label}
        if args.budget_s is not None and time.perf_counter() - t_start > args.budget_s:
            rec["error"] = f"skipped: the {args.budget_s:.0f} s budget of this step was spent"
        elif model not in models or "error" in models[model]:
            rec["error"] = f"no model: {models.get(model, {}).get('error', 'not made')}"
        else:
            cfg = BenchConfig(backend="torch", device=args.device, precision=args.precision,
                              shapes=parse_shapes(tiny if args.tiny else full), iters=args.iters, warmup=args.warmup,
                              compile_dense=with_compile, reference=row in REFERENCE and not with_compile)
            t0 = time.perf_counter()
            try:
                res = bench(models[model]["sparse"], models[model]["dense"], cfg)
                rec.update(res.to_dict())
            except Exception as exc:
                rec["error"] = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}"
            rec["seconds"] = round(time.perf_counter() - t0, 1)
        records.append(rec)
        print(json.dumps({k: rec.get(k) for k in ("row", "seconds", "error")}), flush=True)
        if "error" in rec:
            lines.append(f"| {label} | — | — | — | — | — | — | — | {rec['error']} |")
            continue
        r0 = rec["rows"][0]
        comp = next((r for r in rec["rows"][1:] if "compile" in r["label"]), None)
        ck = rec.get("correctness", {})
        ort = ck.get("sparse_vs_ort_max_rel_diff")
        t = tokens(tiny if args.tiny else full)
        notes = list(rec.get("notes", []))
        lines.append(
            f"| {label} ({rec['precision']}) | {t} | {r0['dense']['median_ms']:.3f} / {r0['dense']['p90_ms']:.3f} | "
            f"{r0['sparse']['median_ms']:.3f} / {r0['sparse']['p90_ms']:.3f} | **{r0['speedup']:.2f}×** | "
            + (f"{comp['dense']['median_ms']:.3f} ms → {comp['speedup']:.2f}×" if comp else "—") + " | "
            + (f"{ort:.1e}" if ort is not None else "—") + " | " + reading(r0["speedup"], t, notes).replace("|", "/")
            + " | " + "; ".join(notes).replace("|", "/") + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.md:
        with args.md.open("a", encoding="utf-8") as f:
            f.write(text + "\n")
    if args.json:
        args.json.write_text("".join(json.dumps(r, default=str) + "\n" for r in records), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())

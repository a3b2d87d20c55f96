"""Time and peak memory of ``permsparse optimize`` (defaults) on a seeded Gemma-3-style decoder of ~270M parameters
with a 262k vocabulary (Gemma-3-270M's shapes: hidden 640, 18 layers, 4 heads of 256, 1 KV head, MLP 2048).

    nice -n 5 python bench/family_decoder.py --out out/bench-family   # writes JSON to stdout and a .md row

Random weights: this measures time and memory only (no quality). The export runs in a child process so its memory
does not count in the optimize peak.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

CONFIG = {"hidden_size": 640, "intermediate_size": 2048, "num_attention_heads": 4, "num_key_value_heads": 1,
          "head_dim": 256, "vocab_size": 262144, "max_position_embeddings": 1024, "sliding_window": 512,
          "query_pre_attn_scalar": 256, "tie_word_embeddings": True}


def _export(path: Path, layers: int) -> None:
    code = ("import sys; from permsparse.models.families import build_family; "
            f"build_family('gemma3', 'legacy', sys.argv[1], layers={layers}, config={CONFIG!r})")
    subprocess.run([sys.executable, "-c", code, str(path)], check=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="out/bench-family")
    ap.add_argument("--layers", type=int, default=18)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    src = out / "gemma3-270m.onnx"
    t0 = time.perf_counter()
    if not src.exists():
        _export(src, args.layers)
    export_s = time.perf_counter() - t0
    weights = sum(f.stat().st_size for f in out.glob("gemma3-270m.onnx*"))
    from permsparse.pipeline import optimize
    from permsparse.pipeline.config import OptimizeConfig

    t1 = time.perf_counter()
    r = optimize(src, out / "gemma3-270m.sparse.onnx", OptimizeConfig(progress=False))
    seconds = time.perf_counter() - t1
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    doc = {"model": "seeded Gemma-3-style, 18 layers, vocab 262144", "file_bytes": weights, "export_s": export_s,
           "optimize_s": seconds, "peak_rss_bytes": peak, "peak_over_weights": peak / weights,
           "blocks": len(r.block_reports), "fold_rel_error": r.equivalence.max_rel_error,
           "valid": sum(r.nm_valid.values()), "pruned": len(r.nm_valid), "timings": r.timings}
    print(json.dumps(doc, indent=1, default=str))


if __name__ == "__main__":
    main()

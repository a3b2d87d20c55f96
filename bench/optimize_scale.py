#!/usr/bin/env python
"""Time and peak memory of `permsparse optimize` on a 1B-class LLaMA-style ONNX with external data.

Exports the seeded LLaMA builder at the requested size (default `1b`: TinyLlama-1.1B shapes, 4.4 GB of fp32 weights,
saved with ONNX external data), then runs `permsparse optimize` on it in a fresh process under `/usr/bin/time -v`
and prints wall time, peak resident memory and the ratio of peak memory to the weights' size, from one run.

    python bench/optimize_scale.py --workdir /tmp/perm1b [--size 1b] [--method lsa] [--policy local]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path


def _timed(cmd: list[str]) -> tuple[float, float, str]:
    """Run ``cmd`` under /usr/bin/time -v; return (seconds, peak RSS in GB, combined output)."""
    t = time.perf_counter()
    run = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    seconds = time.perf_counter() - t
    out = run.stdout + run.stderr
    if run.returncode != 0:
        sys.stderr.write(out[-4000:])
        raise SystemExit(f"command failed ({run.returncode}): {' '.join(cmd)}")
    kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", out).group(1))
    return seconds, kb * 1024 / 1e9, out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/permsparse-scale"))
    ap.add_argument("--size", default="1b")
    ap.add_argument("--exporter", default="dynamo", choices=("dynamo", "legacy"))
    ap.add_argument("--method", default="lsa")
    ap.add_argument("--policy", default="local")
    ap.add_argument("--budget-s", type=float, default=None)
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more optimize arguments")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    src = args.workdir / f"llama_{args.size}_{args.exporter}.onnx"
    if not src.exists():
        secs, peak, _ = _timed([sys.executable, "-m", "permsparse.cli", "export", "llama", "--size", args.size,
                                "--exporter", args.exporter, "-o", str(src)])
        print(f"export: {secs:.1f} s, peak RSS {peak:.2f} GB")
    data = src.with_name(src.name + ".data")
    weights_gb = (data.stat().st_size if data.exists() else src.stat().st_size) / 1e9
    out = args.workdir / f"llama_{args.size}_{args.exporter}.sparse.onnx"
    cmd = [sys.executable, "-m", "permsparse.cli", "optimize", str(src), "-o", str(out), "--method", args.method,
           "--policy", args.policy, "-q", *args.extra]
    if args.budget_s:
        cmd += ["--budget-s", str(args.budget_s)]
    secs, peak, log = _timed(cmd)
    summary = [line for line in log.splitlines() if line.startswith(("weights:", "fold check", "importance kept", "wrote"))]
    result = {
        "size": args.size,
        "exporter": args.exporter,
        "method": args.method,
        "policy": args.policy,
        "weights_gb": round(weights_gb, 3),
        "optimize_s": round(secs, 1),
        "peak_rss_gb": round(peak, 2),
        "peak_over_weights": round(peak / weights_gb, 2),
    }
    print("\n".join(summary))
    print(json.dumps(result))
    print(f"optimize: {secs:.1f} s, peak RSS {peak:.2f} GB = {peak / weights_gb:.2f}x the weights ({weights_gb:.2f} GB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

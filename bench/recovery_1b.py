"""Peak memory and step time of ``permsparse recover`` on a seeded 1B-class LLaMA-shaped decoder (issue 13: "a
1B-class model's recovery runs on this 24 GB machine").

    python bench/recovery_1b.py --out out/recovery-1b [--steps 2]

Shapes of Llama-3.2-1B's body (hidden 2048, 16 layers, 32 heads, 8 KV heads, MLP 8192, tied embeddings) with a
32k vocabulary: 1.04 B parameters, 4.2 GB in fp32. Random weights (seeded): this measures memory and time only, not
quality. Each stage runs in its own process under ``/usr/bin/time -v`` so each peak is its own: the export, the plain
2:4 one-shot (``optimize --method identity --reconstruct none --importance magnitude``) and the recovery.
Without a tokenizer the recovery trains on byte ids of the built-in text (the model's vocabulary covers them).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

CONFIG = {"hidden_size": 2048, "intermediate_size": 8192, "num_attention_heads": 32, "num_key_value_heads": 8,
          "vocab_size": 32000, "max_position_embeddings": 2048, "tie_word_embeddings": True}
LAYERS = 16


def _timed(cmd: list[str], log: Path) -> dict:
    """Run ``cmd`` under /usr/bin/time -v; its wall seconds, peak RSS (bytes), return code and stdout."""
    t0 = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, check=False)
    log.write_text(done.stdout + "\n--- stderr ---\n" + done.stderr)
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
    return {"rc": done.returncode, "seconds": time.perf_counter() - t0,
            "peak_rss_bytes": int(peak.group(1)) * 1024 if peak else None, "stdout": done.stdout}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="out/recovery-1b")
    ap.add_argument("--steps", type=int, default=2)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dense, plain, rec = out / "llama-1b.onnx", out / "llama-1b.plain.onnx", out / "llama-1b.recovered.onnx"
    py = sys.executable
    cli = str(Path(sys.executable).with_name("permsparse"))  # the console script beside this interpreter
    doc: dict = {"model": f"seeded LLaMA-shaped, {LAYERS} layers, {CONFIG}"}
    if not dense.exists():
        code = ("import sys; from permsparse.models.families import build_family; "
                f"build_family('llama', 'legacy', sys.argv[1], layers={LAYERS}, config={CONFIG!r})")
        doc["export"] = {k: v for k, v in _timed([py, "-c", code, str(dense)], out / "export.log").items()
                         if k != "stdout"}
    doc["file_bytes"] = sum(f.stat().st_size for f in out.iterdir() if f.name.startswith("llama-1b.onnx"))
    if not plain.exists():
        doc["one_shot"] = {k: v for k, v in _timed(
            [cli, "optimize", str(dense), "-o", str(plain), "--method", "identity",
             "--reconstruct", "none", "--importance", "magnitude", "-q"], out / "optimize.log").items()
            if k != "stdout"}
    r = _timed([cli, "recover", str(plain), "--teacher", str(dense), "-o", str(rec),
                "--recover-steps", str(args.steps), "--json", "-q"], out / "recover.log")
    facts = {}
    try:
        facts = json.loads(r["stdout"])
    except json.JSONDecodeError:
        pass
    doc["recover"] = {"rc": r["rc"], "wall_seconds": r["seconds"], "peak_rss_bytes": r["peak_rss_bytes"],
                      **{k: v for k, v in facts.items() if k not in ("command", "output")}}
    print(json.dumps(doc, indent=1, default=str))


if __name__ == "__main__":
    main()

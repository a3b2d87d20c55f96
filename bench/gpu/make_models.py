#!/usr/bin/env python3
"""Dense and 2:4 sparse ONNX models for the GPU bench, made on the spot (nothing is downloaded; weights are seeded).

    python bench/gpu/make_models.py --out DIR [--tiny] [--models vit smollm2 llama1b bert]

- ``vit``: ViT-B/16 shapes (``permsparse export vit --size b16``), input ``pixel_values``;
- ``smollm2``: SmolLM2-135M shapes with seeded weights (``export llama --size small``: the real weights ship in a
  package the GPU image does not have; speed does not depend on the values), input ``input_ids``;
- ``llama1b``: TinyLlama-1.1B shapes (``export llama --size 1b``), external data;
- ``bert``: BERT-base shapes (transformers ``BertModel`` from a config, random init), inputs ``input_ids``,
  ``attention_mask``.
``--tiny`` makes the same four families at toy sizes (the CPU rehearsal). Each dense model is made 2:4 by
``permsparse optimize --method identity --importance magnitude --reconstruct none`` (the full pipeline: analysis,
fold check, N:M check), which is all a speed measurement needs. Prints one JSON line per model.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing

MODELS = ("vit", "smollm2", "llama1b", "bert")


def export_bert(path: Path, tiny: bool) -> Path:
    import torch
    import transformers

    from permsparse.models.export import export_onnx

    if tiny:
        cfg = transformers.BertConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=256, max_position_embeddings=128)
    else:
        cfg = transformers.BertConfig()  # bert-base-uncased shapes: 768 hidden, 12 layers, 12 heads, 3072 MLP
    torch.manual_seed(0)
    model = transformers.BertModel(cfg, add_pooling_layer=False).eval()

    class Wrap(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = model

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.m(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
            "last_hidden_state": {0: "batch", 1: "seq"}}
    return export_onnx(Wrap(), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, path, dynamo=False,
                       dynamic_axes=axes, output_names=["last_hidden_state"])


def make(name: str, out: Path, tiny: bool) -> dict:
    import permsparse
    from permsparse import ExportConfig, OptimizeConfig

    dense, sparse = out / f"{name}.onnx", out / f"{name}.sparse.onnx"
    t0 = time.perf_counter()
    if not dense.is_file():
        if name == "bert":
            export_bert(dense, tiny)
        else:
            family, size = {"vit": ("vit", "b16"), "smollm2": ("llama", "small"), "llama1b": ("llama", "1b")}[name]
            permsparse.export(family, dense, ExportConfig(exporter="legacy", size="tiny" if tiny else size))
    t1 = time.perf_counter()
    if not sparse.is_file():
        permsparse.optimize(dense, sparse, OptimizeConfig(method="identity", importance="magnitude",
                                                          reconstruct="none"))
    return {"model": name, "dense": str(dense), "sparse": str(sparse), "export_s": round(t1 - t0, 1),
            "optimize_s": round(time.perf_counter() - t1, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tiny", action="store_true", help="toy sizes (CPU rehearsal)")
    ap.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    failed = 0
    for name in args.models:
        try:
            rec = make(name, args.out, args.tiny)
        except Exception as exc:  # one family failing must not cost the others
            failed += 1
            rec = {"model": name, "error": f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}"}
        print(json.dumps(rec), flush=True)
    return 1 if failed == len(args.models) else 0


if __name__ == "__main__":
    sys.exit(main())

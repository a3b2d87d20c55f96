"""permsparse.models: seeded ViT / LLaMA test models, the real all-MiniLM-L6-v2, local Hugging Face checkpoints,
and ONNX export with either torch exporter.

The families ``permsparse export`` offers are registered one module each in :mod:`permsparse.models.zoo`
(:data:`permsparse.models.registry.MODEL_FAMILIES`). Names are loaded lazily (PEP 562), so importing the registry
loads no torch; ``transformers`` is imported only by the functions that need it (``pip install 'permsparse[hf]'``).
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "EXPORTERS": "permsparse.models.registry",
    "MODEL_FAMILIES": "permsparse.models.zoo",
    "LinearMatMul": "permsparse.models.export",
    "count_linear": "permsparse.models.export",
    "export_model": "permsparse.models.zoo",
    "export_onnx": "permsparse.models.export",
    "linear_matmuls": "permsparse.models.export",
    "summarize_onnx": "permsparse.models.export",
    "LoadedModel": "permsparse.models.hf",
    "load_hf_checkpoint": "permsparse.models.hf",
    "LLAMA_PRESETS": "permsparse.models.llama",
    "LlamaConfig": "permsparse.models.llama",
    "build_llama": "permsparse.models.llama",
    "llama_config": "permsparse.models.llama",
    "llama_example_inputs": "permsparse.models.llama",
    "build_minilm": "permsparse.models.minilm",
    "load_minilm": "permsparse.models.minilm",
    "minilm_path": "permsparse.models.minilm",
    "minilm_tokenizer": "permsparse.models.minilm",
    "VIT_PRESETS": "permsparse.models.vit",
    "ViTConfig": "permsparse.models.vit",
    "build_vit": "permsparse.models.vit",
    "vit_config": "permsparse.models.vit",
    "vit_example_inputs": "permsparse.models.vit",
}


def __getattr__(name: str) -> Any:
    if name == "MODEL_NAMES":
        from permsparse.models.zoo import MODEL_FAMILIES

        return tuple(MODEL_FAMILIES)
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'permsparse.models' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = ["MODEL_NAMES", *_LAZY]  # noqa: PLE0604  (the keys of _LAZY are names)

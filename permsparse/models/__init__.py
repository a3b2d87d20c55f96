"""permsparse.models: seeded ViT / LLaMA test models, the real all-MiniLM-L6-v2, local Hugging Face checkpoints,
and ONNX export with either torch exporter.

``transformers`` is imported only by the functions that need it (``pip install 'permsparse[hf]'``).
"""

from permsparse.models.export import (
    EXPORTERS,
    MODEL_NAMES,
    LinearMatMul,
    count_linear,
    export_model,
    export_onnx,
    linear_matmuls,
    summarize_onnx,
)
from permsparse.models.hf import LoadedModel, load_hf_checkpoint
from permsparse.models.llama import (
    LLAMA_PRESETS,
    LlamaConfig,
    build_llama,
    llama_config,
    llama_example_inputs,
)
from permsparse.models.minilm import (
    build_minilm,
    load_minilm,
    minilm_path,
    minilm_tokenizer,
)
from permsparse.models.vit import (
    VIT_PRESETS,
    ViTConfig,
    build_vit,
    vit_config,
    vit_example_inputs,
)

__all__ = [
    "EXPORTERS",
    "LLAMA_PRESETS",
    "MODEL_NAMES",
    "VIT_PRESETS",
    "LinearMatMul",
    "LlamaConfig",
    "LoadedModel",
    "ViTConfig",
    "build_llama",
    "build_minilm",
    "build_vit",
    "count_linear",
    "export_model",
    "export_onnx",
    "linear_matmuls",
    "llama_config",
    "llama_example_inputs",
    "load_hf_checkpoint",
    "load_minilm",
    "minilm_path",
    "minilm_tokenizer",
    "summarize_onnx",
    "vit_config",
    "vit_example_inputs",
]

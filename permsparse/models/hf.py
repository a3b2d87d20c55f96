"""Load a local Hugging Face checkpoint directory offline and wrap it for ONNX export.

Nothing is downloaded: ``local_files_only=True`` and ``HF_HUB_OFFLINE=1``. ``transformers`` is imported lazily
(it is an optional dependency: ``pip install 'permsparse[hf]'``).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from permsparse.errors import PermsparseError

logger = logging.getLogger(__name__)

TASKS = ("auto", "encoder", "causal-lm", "vision")

# model_type values whose AutoModel takes pixel_values.
_VISION_TYPES = {"vit", "deit", "beit", "dinov2", "vit_mae", "vit_msn", "swin", "convnext", "dpt", "siglip_vision_model"}


@contextlib.contextmanager
def offline() -> Iterator[None]:
    """Hugging Face offline mode for the duration of the block only (the process environment is restored)."""
    keys = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update(keys)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def import_transformers() -> Any:
    """Import ``transformers``, or raise a :class:`PermsparseError` saying what to install."""
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise PermsparseError(
            "Hugging Face models need the 'transformers' package: pip install 'permsparse[hf]'"
        ) from exc
    return transformers


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence the weight-loading progress bars of ``transformers`` for the duration of the block."""
    transformers = import_transformers()
    hf_logging = transformers.utils.logging
    was_enabled = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        with offline():
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if was_enabled:
            hf_logging.enable_progress_bar()


class EncoderWrapper(nn.Module):
    """``forward(input_ids, attention_mask) -> last_hidden_state``.

    Calls the wrapped model with keyword arguments (a positional call breaks the legacy exporter) and drops the
    pooler output.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True).last_hidden_state


class VisionEncoderWrapper(nn.Module):
    """``forward(pixel_values) -> last_hidden_state``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values, return_dict=True).last_hidden_state


class CausalLMWrapper(nn.Module):
    """``forward(input_ids) -> logits`` without a KV cache."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # An explicit all-ones mask: without one, transformers 5 looks for packed sequences in the position ids
        # (aten::diff), which the legacy exporter cannot export.
        attention_mask = torch.ones_like(input_ids)
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, return_dict=True).logits


@dataclass(frozen=True)
class LoadedModel:
    """A module ready for :func:`permsparse.models.export.export_onnx`, with what the exporter needs."""

    module: nn.Module
    example_inputs: dict[str, torch.Tensor]
    dynamic_axes: dict[str, dict[int, str]]
    output_names: list[str]
    task: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    def __iter__(self):  # allows ``module, inputs, axes, outputs = load_hf_checkpoint(...)``
        return iter((self.module, self.example_inputs, self.dynamic_axes, self.output_names))


def _text_inputs(vocab_size: int, batch: int, seq: int, seed: int, with_mask: bool) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    # Stay clear of special tokens at the bottom of the vocabulary.
    low = min(1000, max(vocab_size // 4, 1))
    ids = torch.randint(low, vocab_size, (batch, seq), generator=gen)
    inputs = {"input_ids": ids}
    if with_mask:
        inputs["attention_mask"] = torch.ones(batch, seq, dtype=torch.int64)
    return inputs


def _resolve_task(config: Any, task: str) -> str:
    if task != "auto":
        return task
    archs = list(getattr(config, "architectures", None) or [])
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return "causal-lm"
    model_type = getattr(config, "model_type", "")
    if model_type in _VISION_TYPES or hasattr(config, "image_size") and not hasattr(config, "vocab_size"):
        return "vision"
    if getattr(config, "is_decoder", False) and not getattr(config, "is_encoder_decoder", False):
        return "causal-lm"
    return "encoder"


def _check_directory(directory: str | os.PathLike[str]) -> tuple[Path, str | None]:
    path = Path(directory).expanduser()
    if not path.is_dir():
        raise PermsparseError(
            f"Hugging Face checkpoint directory {str(path)!r} does not exist or is not a directory; "
            "pass a local directory holding config.json and the weights (nothing is downloaded)."
        )
    ggufs = sorted(path.glob("*.gguf"))
    if (path / "config.json").is_file():
        return path, None
    if len(ggufs) == 1:
        return path, ggufs[0].name
    if len(ggufs) > 1:
        raise PermsparseError(
            f"{path} holds several .gguf files ({', '.join(g.name for g in ggufs)}) and no config.json; "
            "move the one to use into a directory of its own."
        )
    raise PermsparseError(
        f"{path} is not a Hugging Face checkpoint: no config.json (nor a single .gguf file) in it. "
        "Save one with model.save_pretrained(DIR)."
    )


def load_hf_checkpoint(
    directory: str | os.PathLike[str],
    task: str = "auto",
    *,
    batch: int = 2,
    seq: int = 16,
    seed: int = 0,
    dtype: str = "float32",
) -> LoadedModel:
    """Load a local Hugging Face checkpoint directory offline, in eval mode, wrapped for export.

    ``dtype``: ``float32`` (default), ``float16`` or ``bfloat16`` — the weights' type in the export.

    ``task``: ``"auto"`` (from ``config.architectures``/``model_type``), ``"encoder"`` (``input_ids``,
    ``attention_mask`` → ``last_hidden_state``), ``"causal-lm"`` (``input_ids`` → ``logits``, no KV cache) or
    ``"vision"`` (``pixel_values`` → ``last_hidden_state``). A directory with a single ``.gguf`` file and no
    ``config.json`` is loaded through ``gguf_file=`` (needs the ``gguf`` package).

    Returns a :class:`LoadedModel`, which also unpacks as ``(module, example_inputs, dynamic_axes, output_names)``.
    """
    if task not in TASKS:
        raise PermsparseError(f"unknown task {task!r}; choose one of: {', '.join(TASKS)}")
    path, transformers, kwargs = _pretrained_args(directory)
    gguf_file = kwargs.get("gguf_file")
    try:
        with quiet_transformers():
            config = transformers.AutoConfig.from_pretrained(str(path), **kwargs)
    except Exception as exc:
        raise PermsparseError(f"cannot read the Hugging Face config in {path}: {exc}") from exc
    resolved = _resolve_task(config, task)
    if gguf_file is not None and task == "auto" and resolved == "encoder":
        resolved = "causal-lm"  # a GGUF holds a language model; its config names no architecture
    torch_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}.get(dtype)
    if torch_dtype is None:
        raise PermsparseError(f"unknown dtype {dtype!r}; choose float32, float16 or bfloat16")
    auto = transformers.AutoModelForCausalLM if resolved == "causal-lm" else transformers.AutoModel
    try:
        with quiet_transformers():
            model = auto.from_pretrained(str(path), attn_implementation="eager", dtype=torch_dtype, **kwargs)
    except Exception as exc:
        raise PermsparseError(
            f"cannot load {path} as a {resolved} model ({type(exc).__name__}: {exc}). "
            "Check that the directory is a complete checkpoint, or pass task= explicitly."
        ) from exc
    model.eval()
    logger.info("loaded %s (%s, task %s) from %s", type(model).__name__, config.model_type, resolved, path)

    info = {"model_type": getattr(config, "model_type", ""), "class": type(model).__name__, "path": str(path),
            "gguf_file": gguf_file or ""}
    if resolved == "vision":
        size = getattr(config, "image_size", 224)
        size = size if isinstance(size, int) else int(size[0])
        chans = int(getattr(config, "num_channels", 3))
        gen = torch.Generator().manual_seed(seed)
        inputs = {"pixel_values": torch.randn(batch, chans, size, size, generator=gen)}
        return LoadedModel(
            VisionEncoderWrapper(model).eval(),
            inputs,
            {"pixel_values": {0: "batch"}, "last_hidden_state": {0: "batch"}},
            ["last_hidden_state"],
            resolved,
            info,
        )
    vocab = int(getattr(config, "vocab_size", 0) or getattr(config.get_text_config(), "vocab_size", 0))
    if vocab <= 0:
        raise PermsparseError(f"{path}: the config has no vocab_size; pass task='vision' for an image model.")
    if resolved == "causal-lm":
        return LoadedModel(
            CausalLMWrapper(model).eval(),
            _text_inputs(vocab, batch, seq, seed, with_mask=False),
            {"input_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"}},
            ["logits"],
            resolved,
            info,
        )
    return LoadedModel(
        EncoderWrapper(model).eval(),
        _text_inputs(vocab, batch, seq, seed, with_mask=True),
        {
            "input_ids": {0: "batch", 1: "seq"},
            "attention_mask": {0: "batch", 1: "seq"},
            "last_hidden_state": {0: "batch", 1: "seq"},
        },
        ["last_hidden_state"],
        resolved,
        info,
    )


def _pretrained_args(directory: str | os.PathLike[str]) -> tuple[Path, Any, dict[str, Any]]:
    """The checked folder, the transformers module and the ``from_pretrained`` keyword arguments (offline; the GGUF
    file when the folder holds one)."""
    path, gguf_file = _check_directory(directory)
    kwargs: dict[str, Any] = {"local_files_only": True}
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    return path, import_transformers(), kwargs


def save_tokenizer_beside(hf_dir: str | os.PathLike[str], onnx_path: str | os.PathLike[str]) -> Path | None:
    """Write the checkpoint's tokenizer beside an exported ONNX file (as Optimum does), unless one is there already,
    so ``optimize`` calibrates with the model's own tokenizer. Returns the folder, or None when there is none."""
    out = Path(onnx_path).resolve().parent
    if any((out / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")):
        return None
    path, transformers, kwargs = _pretrained_args(hf_dir)
    try:
        with quiet_transformers():
            tok = transformers.AutoTokenizer.from_pretrained(str(path), **kwargs)
            tok.save_pretrained(str(out))
    except Exception as exc:  # no tokenizer in the checkpoint: calibration will ask for --tokenizer
        logger.info("no tokenizer saved beside %s: %s", onnx_path, exc)
        return None
    return out

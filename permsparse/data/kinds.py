"""What data a model takes: its inputs (token ids, masks, images) and its kind (encoder, decoder, image)."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx

from permsparse.errors import PermsparseError
from permsparse.ir.header import load_structure
from permsparse.ir.inputs import InputSpec, graph_inputs, vocab_hints

logger = logging.getLogger(__name__)

KINDS: tuple[str, ...] = ("auto", "text", "lm", "image")
"""``text``: encoder, one text per example; ``lm``: decoder, token windows; ``image``: pixel input."""




#: Model files of an export folder, in the order they are preferred: Optimum's ``model.onnx`` (encoders, and decoders
#: of recent Optimum), then the decoder without a KV cache of older Optimum decoder exports.
EXPORT_FOLDER_MODELS: tuple[str, ...] = ("model.onnx", "decoder_model.onnx")


def model_file(path: str | os.PathLike) -> Path:
    """The ONNX file of ``path``: the file itself, or for an export folder (Optimum / HF layout: an ``.onnx`` beside
    ``config.json`` and the tokenizer files) its ``model.onnx``, else ``decoder_model.onnx``, else its only ``.onnx``.
    The tokenizer is then found beside that file (:func:`permsparse.data.text.find_tokenizer`)."""
    p = Path(path)
    if not p.is_dir():
        return p
    for name in EXPORT_FOLDER_MODELS:
        if (p / name).is_file():
            return p / name
    found = sorted(q.name for q in p.glob("*.onnx") if q.is_file())
    if len(found) == 1:
        return p / found[0]
    if not found:
        raise PermsparseError(f"{p} is a folder with no .onnx model; give the path of an .onnx file or an export folder")
    raise PermsparseError(
        f"{p} holds several models ({', '.join(found[:6])}) and no model.onnx; give the path of the one to use"
    )


def load_header(model: onnx.ModelProto | str | os.PathLike) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    path = model_file(model)
    if not path.is_file():
        raise PermsparseError(f"model file {str(path)!r} does not exist")
    return load_structure(path)  # the graph without the weights' values: cheap for any file size


def model_inputs(model: onnx.ModelProto | str | os.PathLike) -> list[InputSpec]:
    """The graph inputs that are not initializers, with dtype and dims."""
    return graph_inputs(load_header(model))


def find_input(specs: Sequence[InputSpec], *names: str) -> InputSpec | None:
    for spec in specs:
        if spec.name in names:
            return spec
    return None


def ids_spec(specs: Sequence[InputSpec]) -> InputSpec | None:
    spec = find_input(specs, "input_ids", "input", "tokens", "input_tokens")
    if spec is not None and np.issubdtype(spec.dtype, np.integer):
        return spec
    ints = [s for s in specs if np.issubdtype(s.dtype, np.integer) and len(s.shape) == 2 and "mask" not in s.name]
    return ints[0] if ints else None


def image_spec(specs: Sequence[InputSpec]) -> InputSpec | None:
    spec = find_input(specs, "pixel_values", "images", "image", "input")
    if spec is not None and np.issubdtype(spec.dtype, np.floating) and len(spec.shape) == 4:
        return spec
    floats = [s for s in specs if np.issubdtype(s.dtype, np.floating) and len(s.shape) == 4 and not s.name.startswith("past")]
    return floats[0] if floats else None


def model_kind(model: onnx.ModelProto | str | os.PathLike) -> str:
    """``"text"`` (encoder), ``"lm"`` (decoder) or ``"image"``, guessed from the graph inputs and outputs."""
    m = load_header(model)
    specs = model_inputs(m)
    ids = ids_spec(specs)
    if ids is None:
        if image_spec(specs) is not None:
            return "image"
        raise PermsparseError(
            "cannot tell what data this model takes: no integer input_ids and no 4-D float image input "
            f"(inputs: {[(s.name, str(s.dtype), s.shape) for s in specs]}), so there is no calibration data for it; "
            "use --importance magnitude --reconstruct none (no calibration)"
        )
    names = {s.name for s in specs}
    outputs = [o.name for o in m.graph.output]
    if "token_type_ids" in names:
        return "text"
    if any(n.startswith("past_key_values") for n in names) or "position_ids" in names:
        return "lm"
    if any("logits" in o for o in outputs) and not any("hidden_state" in o for o in outputs):
        return "lm"
    return "text"


def vocab_size(model: onnx.ModelProto | str | os.PathLike) -> int | None:
    """The model's vocabulary size: rows of the embedding table its ``input_ids`` index
    (:func:`permsparse.ir.inputs.vocab_hints`), else the static last dim of a ``logits`` output; else ``None``."""
    m = load_header(model)
    ids = ids_spec(model_inputs(m))
    hints = vocab_hints(m)
    if ids is not None and ids.name in hints:
        return hints[ids.name]
    for out in m.graph.output:
        if "logits" in out.name:
            dims = out.type.tensor_type.shape.dim
            if dims and dims[-1].HasField("dim_value") and dims[-1].dim_value > 0:
                return int(dims[-1].dim_value)
    return None


def batches_static(spec: InputSpec | None, batch_size: int) -> int:
    if batch_size <= 0:
        raise PermsparseError(f"batch_size must be positive, got {batch_size}")
    static_b = spec.static(0) if spec is not None else None
    if static_b is not None and static_b != batch_size:
        logger.warning("model input %s has a static batch of %d; using batch_size=%d", spec.name, static_b, static_b)
        return static_b
    return batch_size

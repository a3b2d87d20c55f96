"""Loading and saving ONNX models safely: clear errors for bad input, atomic writes, external data for big models."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import onnx
from onnx import TensorProto

from permsparse.errors import PermsparseError

log = logging.getLogger(__name__)

#: Protobuf cannot serialize a model over 2 GiB inline; stay well below it.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000

_HALF_TYPES = {TensorProto.FLOAT16, TensorProto.BFLOAT16}


def load_model(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """Load an ONNX model (with its external data) and check it, raising :class:`PermsparseError` on bad input."""
    p = Path(path)
    if not p.is_file():
        raise PermsparseError(f"{p}: no such file. Give the path of an .onnx model.")
    try:
        model = onnx.load(str(p), load_external_data=True)
    except Exception as exc:  # protobuf raises several types
        raise PermsparseError(
            f"{p}: cannot be read as ONNX ({type(exc).__name__}: {exc}). "
            "Is it an .onnx file, and is its external-data file beside it?"
        ) from None
    if not model.graph.node:
        raise PermsparseError(f"{p}: the ONNX graph has no nodes; export the model again.")
    try:
        # Models over 2 GiB cannot be checked in memory; the path variant reads external data itself.
        if model.ByteSize() < EXTERNAL_DATA_THRESHOLD:
            onnx.checker.check_model(model)
        else:
            onnx.checker.check_model(str(p))
    except Exception as exc:
        raise PermsparseError(f"{p}: the ONNX checker rejects this model: {exc}") from None
    return model


def model_size_bytes(model: onnx.ModelProto) -> int:
    """Bytes of all initializers (what decides whether external data is needed)."""
    return sum(len(t.raw_data) or t.ByteSize() for t in model.graph.initializer)


def check_float32(model: onnx.ModelProto, path: str | os.PathLike[str] = "model") -> None:
    """Refuse half-precision weights: permutations and masks are found and verified in fp32."""
    half = [t.name for t in model.graph.initializer if t.data_type in _HALF_TYPES]
    if half:
        raise PermsparseError(
            f"{path}: {len(half)} weights are fp16/bf16 (e.g. {half[0]!r}). permsparse optimizes fp32 models: "
            "export in fp32, run `permsparse optimize`, then `permsparse build --precision fp16` converts the result."
        )


def save_model(model: onnx.ModelProto, path: str | os.PathLike[str], *, external_data: bool | None = None) -> Path:
    """Write ``model`` to ``path`` atomically (write into a temp folder beside it, then rename).

    ``external_data=None`` picks external data (one ``<name>.data`` file beside the model) when the weights exceed
    :data:`EXTERNAL_DATA_THRESHOLD`. Never leaves a half-written file behind; ``model`` is unchanged afterwards.
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    if external_data is None:
        external_data = model_size_bytes(model) > EXTERNAL_DATA_THRESHOLD
    data_name = out.name + ".data"
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp_dir:
        tmp = Path(tmp_dir) / out.name
        if external_data:
            onnx.save_model(
                model,
                str(tmp),
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=data_name,
                size_threshold=1024,
            )
            os.replace(Path(tmp_dir) / data_name, out.parent / data_name)
            os.replace(tmp, out)
            # save_model turned the in-memory tensors into references to the data file; read them back in.
            onnx.external_data_helper.load_external_data_for_model(model, str(out.parent))
        else:
            onnx.save_model(model, str(tmp))
            os.replace(tmp, out)
    return out


def _external_tensors(model: onnx.ModelProto):
    for tensor in model.graph.initializer:
        if tensor.data_location == TensorProto.EXTERNAL:
            yield tensor

"""Loading and saving ONNX models safely: clear errors for bad input, atomic writes, external data for big models."""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from permsparse.errors import PermsparseError

log = logging.getLogger(__name__)

#: Protobuf cannot serialize a model over 2 GiB inline; stay well below it.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000

_HALF_TYPES = {TensorProto.FLOAT16, TensorProto.BFLOAT16}


@dataclass(frozen=True)
class InputSpec:
    """A graph input: name, numpy dtype and dims (``int`` when static, else the symbolic name or ``None``)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...]

    def static(self, axis: int) -> int | None:
        """The static size of ``axis``, or ``None`` when it is dynamic or the rank is smaller."""
        if axis >= len(self.shape) or axis < -len(self.shape):
            return None
        d = self.shape[axis]
        return d if isinstance(d, int) and d > 0 else None


def graph_inputs(model: onnx.ModelProto | str | os.PathLike[str]) -> list[InputSpec]:
    """The graph inputs that are not initializers (a path is read without its weights)."""
    if not isinstance(model, onnx.ModelProto):
        path = Path(model)
        if not path.is_file():
            raise PermsparseError(f"model file {str(path)!r} does not exist")
        model = onnx.load(str(path), load_external_data=False)
    inits = {t.name for t in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)) if tt.elem_type else np.dtype(np.float32)
        dims: list[int | str | None] = []
        for d in tt.shape.dim:
            if d.HasField("dim_value"):
                dims.append(int(d.dim_value))
            elif d.HasField("dim_param") and d.dim_param:
                dims.append(d.dim_param)
            else:
                dims.append(None)
        specs.append(InputSpec(vi.name, dtype, tuple(dims)))
    return specs


def uses_external_data(model: onnx.ModelProto) -> bool:
    """True if some initializer keeps its data in an external file."""
    return any(t.data_location == TensorProto.EXTERNAL for t in model.graph.initializer)


def load_model(path: str | os.PathLike[str], *, lazy: bool = False) -> onnx.ModelProto:
    """Load an ONNX model and check it, raising :class:`PermsparseError` on bad input.

    ``lazy=True`` leaves external data on disk (tensors keep their references); use
    :func:`permsparse.passes.graph.import_graph` with the model's folder to read them on demand.
    """
    p = Path(path)
    if not p.is_file():
        raise PermsparseError(f"{p}: no such file. Give the path of an .onnx model.")
    try:
        model = onnx.load(str(p), load_external_data=False)
        external = uses_external_data(model)
        if external and not lazy:
            onnx.external_data_helper.load_external_data_for_model(model, str(p.parent))
    except Exception as exc:  # protobuf raises several types
        raise PermsparseError(
            f"{p}: cannot be read as ONNX ({type(exc).__name__}: {exc}). "
            "Is it an .onnx file, and is its external-data file beside it?"
        ) from None
    if not model.graph.node:
        raise PermsparseError(f"{p}: the ONNX graph has no nodes; export the model again.")
    try:
        # With external data the checker reads the file itself (and checks that the data file is there).
        onnx.checker.check_model(str(p) if external else model)
    except Exception as exc:
        raise PermsparseError(f"{p}: the ONNX checker rejects this model: {exc}") from None
    return model


def model_size_bytes(model: onnx.ModelProto) -> int:
    """Bytes of all initializers, stored inline or externally (what decides whether external data is needed)."""
    total = 0
    for t in model.graph.initializer:
        if t.data_location == TensorProto.EXTERNAL:
            total += int(np.prod(t.dims)) * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
        else:
            total += len(t.raw_data) or t.ByteSize()
    return total


def check_float32(model: onnx.ModelProto, path: str | os.PathLike[str] = "model") -> None:
    """Refuse half-precision weights: permutations and masks are found and verified in fp32."""
    half = [t.name for t in model.graph.initializer if t.data_type in _HALF_TYPES]
    if half:
        raise PermsparseError(
            f"{path}: {len(half)} weights are fp16/bf16 (e.g. {half[0]!r}). permsparse optimizes fp32 models: "
            "export in fp32, run `permsparse optimize`, then `permsparse build --precision fp16` converts the result."
        )


Transform = Callable[[np.ndarray], np.ndarray]


def save_model(
    model: onnx.ModelProto,
    path: str | os.PathLike[str],
    *,
    external_data: bool | None = None,
    base_dir: str | os.PathLike[str] | None = None,
    transform: Mapping[str, Transform] | None = None,
) -> Path:
    """Write ``model`` to ``path`` atomically (write into a temp folder beside it, then rename).

    ``external_data=None`` picks external data (one ``<name>.data`` file beside the model) when the model already
    keeps weights externally or they exceed :data:`EXTERNAL_DATA_THRESHOLD`. External data is written by streaming one
    tensor at a time: tensors already on disk (relative to ``base_dir``, or by absolute path) are copied without being
    held in memory, and ``transform[name]`` (e.g. a mask) is applied to a tensor on its way out. In that mode the
    initializers of ``model`` are rewritten to reference the new data file. Never leaves a half-written file behind.
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    transform = dict(transform or {})
    if external_data is None:
        external_data = uses_external_data(model) or model_size_bytes(model) > EXTERNAL_DATA_THRESHOLD or bool(transform)
    data_name = out.name + ".data"
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp_dir:
        tmp = Path(tmp_dir) / out.name
        if external_data:
            _write_streaming(model, Path(tmp_dir) / data_name, data_name, base_dir, transform)
            onnx.save_model(model, str(tmp))
            os.replace(Path(tmp_dir) / data_name, out.parent / data_name)
        else:
            onnx.save_model(model, str(tmp))
        os.replace(tmp, out)
    return out


_CHUNK = 64 << 20
_ALIGN = 4096


def _write_streaming(model, data_path: Path, data_name: str, base_dir, transform: Mapping[str, Transform]) -> None:
    from permsparse.passes.graph import external_info, read_external

    offset = 0
    with open(data_path, "wb") as f:
        for t in model.graph.initializer:
            external = t.data_location == TensorProto.EXTERNAL
            fn = transform.get(t.name)
            if fn is not None:
                arr = read_external(t, base_dir or "") if external else numpy_helper.to_array(t)
                new = numpy_helper.from_array(np.ascontiguousarray(fn(arr)), t.name)
                payload: bytes | None = new.raw_data
                t.ClearField("dims")
                t.dims.extend(new.dims)
                t.data_type = new.data_type
            elif external:
                payload = None
            elif t.ByteSize() < 1024:
                continue  # small constants stay inline
            else:
                payload = t.raw_data or numpy_helper.to_array(t).tobytes()
            pad = (-offset) % _ALIGN
            f.write(b"\0" * pad)
            offset += pad
            if payload is None:
                location, src_offset, length = external_info(t)
                src = location if os.path.isabs(location) else os.path.join(base_dir or "", location)
                if length is None:
                    length = int(np.prod(t.dims)) * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
                with open(src, "rb") as g:
                    g.seek(src_offset)
                    left = length
                    while left:
                        chunk = g.read(min(_CHUNK, left))
                        if not chunk:
                            raise PermsparseError(f"external data of {t.name!r} is truncated in {src}")
                        f.write(chunk)
                        left -= len(chunk)
            else:
                length = len(payload)
                f.write(payload)
            for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
                t.ClearField(field)
            del t.external_data[:]
            t.data_location = TensorProto.EXTERNAL
            for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(length))):
                entry = t.external_data.add()
                entry.key, entry.value = key, value
            offset += length


def spill_constants(graph, names: set[str], folder: str | os.PathLike[str]) -> None:
    """Move the in-memory values of constants ``names`` of a gs graph to a data file in ``folder``.

    Each constant then reads its values from that file on demand (:class:`permsparse.passes.graph.ExternalValues`), so
    the permuted weights of a big model are not held in memory while it is verified and written.
    """
    import onnx_graphsurgeon as gs

    from permsparse.passes.graph import ExternalValues

    path = Path(folder) / f"spill-{len(list(Path(folder).glob('spill-*')))}.data"
    offset = 0
    with open(path, "wb") as f:
        for t in graph.tensors().values():
            if not isinstance(t, gs.Constant) or t.name not in names or not isinstance(t._values, np.ndarray):
                continue
            arr = np.ascontiguousarray(t._values)
            proto = TensorProto()
            proto.name = t.name
            proto.data_type = onnx.helper.np_dtype_to_tensor_dtype(arr.dtype)
            proto.dims.extend(arr.shape)
            proto.data_location = TensorProto.EXTERNAL
            for key, value in (("location", str(path.resolve())), ("offset", str(offset)), ("length", str(arr.nbytes))):
                entry = proto.external_data.add()
                entry.key, entry.value = key, value
            f.write(arr.tobytes())
            offset += arr.nbytes
            t._values = ExternalValues(proto, folder)


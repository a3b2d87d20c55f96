"""ONNX external data: where a tensor's bytes live, reading them memory-mapped, and the files a model consists of.

A tensor stored externally names a ``location`` (relative to the model's folder, or absolute for permsparse's own
temporary spill files), an ``offset`` and a ``length``. Reading maps the file read-only (``np.memmap``), so a 7B model's
weights are paged in by the OS only when a pass touches them and never held twice.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

from permsparse.errors import PermsparseError


def tensor_dtype(tensor: TensorProto) -> np.dtype:
    """numpy dtype of a TensorProto (bfloat16 and float8 types come from ``ml_dtypes``, as in onnx itself)."""
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))


def external_info(tensor: TensorProto) -> tuple[str, int, int | None]:
    """(location, offset, length) of an externally stored tensor."""
    entries = {e.key: e.value for e in tensor.external_data}
    length = entries.get("length")
    return entries["location"], int(entries.get("offset", 0) or 0), (int(length) if length else None)


def is_external(tensor: TensorProto) -> bool:
    return tensor.data_location == TensorProto.EXTERNAL


def external_path(tensor: TensorProto, base_dir: str | os.PathLike[str] | None) -> Path:
    location = external_info(tensor)[0]
    return Path(location) if os.path.isabs(location) else Path(base_dir or ".") / location


def read_external(tensor: TensorProto, base_dir: str | os.PathLike[str] | None, *, mmap: bool = True) -> np.ndarray:
    """The values of an externally stored tensor, memory-mapped read-only (``mmap=False``: read into memory)."""
    path = external_path(tensor, base_dir)
    _, offset, _ = external_info(tensor)
    dtype = tensor_dtype(tensor)
    shape = tuple(int(d) for d in tensor.dims)
    count = int(np.prod(shape)) if shape else 1
    if not path.is_file():
        raise PermsparseError(f"external data file {path} of tensor {tensor.name!r} is missing; keep it beside the model")
    if path.stat().st_size < offset + count * dtype.itemsize:
        raise PermsparseError(f"external data of tensor {tensor.name!r} is truncated in {path}")
    if count == 0:
        return np.zeros(shape, dtype=dtype)
    if mmap:
        return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)
    with open(path, "rb") as f:
        f.seek(offset)
        return np.fromfile(f, dtype=dtype, count=count).reshape(shape)


def nbytes(tensor: TensorProto) -> int:
    return int(np.prod(tensor.dims)) * tensor_dtype(tensor).itemsize


def iter_tensors(model: onnx.ModelProto) -> Iterator[TensorProto]:
    """Every tensor of the main graph that can hold weights: initializers and Constant nodes' values."""
    yield from model.graph.initializer
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t


def uses_external_data(model: onnx.ModelProto) -> bool:
    """True if some tensor keeps its data in an external file."""
    return any(is_external(t) for t in iter_tensors(model))


def data_files(model: onnx.ModelProto, base_dir: str | os.PathLike[str] | None) -> set[Path]:
    """The external data files ``model`` reads (resolved paths)."""
    return {external_path(t, base_dir).resolve() for t in iter_tensors(model) if is_external(t)}

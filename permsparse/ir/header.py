"""Read an ONNX model's structure without its tensor data.

    load_structure(path) -> onnx.ModelProto   # the graph, initializers without values
    load_lazy(path)      -> onnx.ModelProto   # the same model, big inline weights read from the file on demand

Questions such as "what are the inputs", "is this a decoder", "which data files does it read" need the graph, not the
weights. ``onnx.load`` of a model whose weights lie inside the .onnx file (every export under 2 GB) reads the whole file
and parses every weight: a 1.7 GB model costs ~3.5 GB of memory for a moment, just to learn its input names. This
module walks the protobuf wire format of the file, memory-mapped, and copies only the structure: tensor payloads are
skipped by their length prefix, so their pages are never touched.

Invariant: the result equals ``onnx.load(path, load_external_data=False)`` except that every initializer (and the
values/indices of every sparse initializer) keeps its name, dims, data type, segment, doc string and external-data
fields but has no values (``float_data``, ``int32_data``, ``string_data``, ``int64_data``, ``raw_data``,
``double_data``, ``uint64_data`` are empty). Constant nodes keep their values (they are part of the nodes). Do not
read an initializer's values from it.

:func:`load_lazy` keeps the values reachable instead: every initializer whose values are stored as ``raw_data`` of at
least ``min_bytes`` becomes an *external-data* tensor whose location is the .onnx file itself (relative name, the
payload's byte offset and length in the file), so it is read memory-mapped when a step needs it — the same path a
model with a separate data file takes. Invariant: every tensor's values read through its external reference are the
bytes ``onnx.load`` would have put in its ``raw_data``.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from permsparse.errors import PermsparseError

# field numbers of onnx.proto3
MODEL_GRAPH = 7
GRAPH_INITIALIZER = 5
_GRAPH_SPARSE_INITIALIZER = 15
_SPARSE_VALUES, _SPARSE_INDICES = 1, 2
TENSOR_RAW_DATA = 9
_TENSOR_DATA_FIELDS = frozenset({4, 5, 6, 7, 9, 10, 11})  # float, int32, string, int64, raw, double, uint64 data
#: the TensorProto fields that hold values (numbers above, by name)
TENSOR_VALUE_FIELDS = ("raw_data", "float_data", "int32_data", "string_data", "int64_data", "double_data",
                       "uint64_data")

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


def _varint(buf, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("malformed varint")


def varint_bytes(value: int) -> bytes:
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        if value:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _fields(buf, start: int, end: int):
    """``(field, wire type, payload start, payload end, field start)`` of each field in ``buf[start:end]``."""
    pos = start
    while pos < end:
        first = pos
        tag, pos = _varint(buf, pos)
        field, wire = tag >> 3, tag & 7
        if wire == _VARINT:
            _, pos2 = _varint(buf, pos)
        elif wire == _I64:
            pos2 = pos + 8
        elif wire == _I32:
            pos2 = pos + 4
        elif wire == _LEN:
            length, pos = _varint(buf, pos)
            pos2 = pos + length
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if pos2 > end:
            raise ValueError("truncated message")
        yield field, wire, pos, pos2, first
        pos = pos2


def len_prefix(field: int, length: int) -> bytes:
    """The tag and length that start a length-delimited field (a submessage, bytes) of ``length`` bytes."""
    return varint_bytes(field << 3 | _LEN) + varint_bytes(length)


def _submessage(field: int, payload: bytes) -> bytes:
    return len_prefix(field, len(payload)) + payload


def _tensor(buf, start: int, end: int) -> bytes:
    """A TensorProto without its values."""
    out = bytearray()
    for field, _, _, p_end, first in _fields(buf, start, end):
        if field not in _TENSOR_DATA_FIELDS:
            out += buf[first:p_end]
    return bytes(out)


def _lazy_tensor(buf, start: int, end: int, location: str, min_bytes: int) -> bytes:
    """The TensorProto at ``buf[start:end]``, its ``raw_data`` (when ``>= min_bytes``) replaced by an external
    reference to the same bytes of the file."""
    raw = next(((p0, p1) for field, wire, p0, p1, _ in _fields(buf, start, end)
                if field == TENSOR_RAW_DATA and wire == _LEN), None)
    if raw is None or raw[1] - raw[0] < min_bytes:
        return bytes(buf[start:end])
    t = onnx.TensorProto.FromString(_tensor(buf, start, end))
    t.data_location = onnx.TensorProto.EXTERNAL
    del t.external_data[:]
    for key, value in (("location", location), ("offset", str(raw[0])), ("length", str(raw[1] - raw[0]))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value
    return t.SerializeToString()


def _sparse(buf, start: int, end: int) -> bytes:
    out = bytearray()
    for field, wire, p0, p1, first in _fields(buf, start, end):
        if field in (_SPARSE_VALUES, _SPARSE_INDICES) and wire == _LEN:
            out += _submessage(field, _tensor(buf, p0, p1))
        else:
            out += buf[first:p1]
    return bytes(out)


def _graph(buf, start: int, end: int, lazy: tuple[str, int] | None = None) -> bytes:
    out = bytearray()
    for field, wire, p0, p1, first in _fields(buf, start, end):
        if field == GRAPH_INITIALIZER and wire == _LEN:
            out += _submessage(field, _tensor(buf, p0, p1) if lazy is None else _lazy_tensor(buf, p0, p1, *lazy))
        elif field == _GRAPH_SPARSE_INITIALIZER and wire == _LEN and lazy is None:  # lazy: kept whole
            out += _submessage(field, _sparse(buf, p0, p1))
        else:
            out += buf[first:p1]
    return bytes(out)


def structure_bytes(buf, lazy: tuple[str, int] | None = None) -> bytes:
    """The serialized ModelProto ``buf`` (bytes, memoryview or mmap) without its initializers' values (``lazy =
    (location, min_bytes)``: big raw values referenced at their offsets in the file named ``location`` instead)."""
    out = bytearray()
    for field, wire, p0, p1, first in _fields(buf, 0, len(buf)):
        if field == MODEL_GRAPH and wire == _LEN:
            out += _submessage(field, _graph(buf, p0, p1, lazy))
        else:
            out += buf[first:p1]
    return bytes(out)


def load_structure(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """The model at ``path`` without its initializers' values (see the module docstring), reading only the bytes
    of its structure. Raises :class:`PermsparseError` if the file is missing or not an ONNX model."""
    return _load(Path(path), None)


def load_lazy(path: str | os.PathLike[str], min_bytes: int = 1024) -> onnx.ModelProto:
    """The model at ``path`` with every inline ``raw_data`` of at least ``min_bytes`` turned into an external
    reference into the file itself (see the module docstring): weights stay on disk until read. The references are
    relative to the model's folder, like any external data."""
    p = Path(path)
    return _load(p, (p.name, min_bytes))


def _load(p: Path, lazy: tuple[str, int] | None) -> onnx.ModelProto:
    if not p.is_file():
        raise PermsparseError(f"model file {str(p)!r} does not exist")
    if p.stat().st_size == 0:
        raise PermsparseError(f"{p}: the file is empty; export the model again")
    try:
        with open(p, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            data = structure_bytes(mm, lazy)
        return onnx.ModelProto.FromString(data)
    except (ValueError, IndexError, DecodeError) as exc:  # malformed wire data, or protobuf's own complaint
        raise PermsparseError(f"{p}: cannot be read as ONNX ({type(exc).__name__}: {exc}). Is it an .onnx file?") \
            from None

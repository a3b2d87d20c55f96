"""Saving a model: one saver for every verb — atomic, streaming, and never onto an input's files.

Promises:
- :func:`check_output` runs before any work: the output must end in ``.onnx``, its folder must be writable, and
  neither the output nor its external-data file may be one of the input's files (the ``.onnx`` or any data file it
  reads), so no run can overwrite its input.
- :func:`save_model` writes into a temporary folder beside the output and renames into place; with external data
  the old ``.onnx`` is removed before the new data file is renamed in, so at every instant the output is either
  absent or complete and consistent. Temporary folders carry the writer's pid; ones left by a killed run are swept
  by the next run in the same folder.
- Tensors are streamed one at a time: weights already on disk are copied in chunks, and ``transform[name]`` (e.g.
  a mask) is applied on the way out, so a model bigger than memory is written with bounded memory.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from permsparse.errors import PermsparseError
from permsparse.ir.external import (
    external_info,
    external_path,
    is_external,
    nbytes,
    read_external,
    uses_external_data,
)
from permsparse.ir.header import (
    GRAPH_INITIALIZER,
    MODEL_GRAPH,
    TENSOR_RAW_DATA,
    TENSOR_VALUE_FIELDS,
    len_prefix,
)
from permsparse.ir.model import EXTERNAL_DATA_THRESHOLD, model_size_bytes

log = logging.getLogger(__name__)

Transform = Callable[[np.ndarray], np.ndarray]
TEMP_PREFIX = ".permsparse-tmp-"
_CHUNK = 64 << 20
_ALIGN = 4096


def data_file_of(dst: str | os.PathLike[str]) -> Path:
    """Where :func:`save_model` puts ``dst``'s external data."""
    p = Path(dst)
    return p.with_name(p.name + ".data")


def check_output(dst: str | os.PathLike[str], input_files: set[Path] | frozenset[Path] = frozenset()) -> Path:
    """Refuse an output that would land on an input file, has the wrong suffix, or cannot be written. No side effects
    except creating the output folder."""
    out = Path(dst)
    if out.suffix != ".onnx":
        raise PermsparseError(f"output {out} must end in .onnx")
    if out.is_dir():
        raise PermsparseError(f"output {out} is a folder; give a file name ending in .onnx")
    for candidate in (out, data_file_of(out)):
        resolved = candidate.resolve()
        if resolved in input_files:
            what = "the input model" if resolved.suffix == ".onnx" else "an external-data file the input reads"
            raise PermsparseError(
                f"output {out} would overwrite {what} ({resolved}); permsparse never modifies its input: choose "
                "another -o (a different file name, or another folder)"
            )
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=TEMP_PREFIX + "probe-", dir=out.parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        from permsparse.errors import os_reason

        raise PermsparseError(f"cannot write to {out.parent} ({os_reason(exc, out.parent)}); choose a writable -o") \
            from None
    return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale(folder: str | os.PathLike[str]) -> int:
    """Remove temporary folders/files left in ``folder`` by permsparse runs that were killed (their pid is gone)."""
    removed = 0
    try:
        entries = list(Path(folder).glob(TEMP_PREFIX + "*"))
    except OSError:
        return 0
    for entry in entries:
        parts = entry.name[len(TEMP_PREFIX):].split("-")
        if not parts or not parts[0].isdigit() or _pid_alive(int(parts[0])):
            continue
        with contextlib.suppress(OSError):
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
            removed += 1
    if removed:
        log.info("removed %d temporary item(s) left by killed runs in %s", removed, folder)
    return removed


@contextlib.contextmanager
def work_dir(folder: str | os.PathLike[str] | None, tag: str = "work") -> Iterator[Path]:
    """A temporary folder (beside the output when given) removed on exit, also on errors and interrupts."""
    parent = Path(folder) if folder is not None else None
    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True)
        sweep_stale(parent)
    path = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-{tag}-", dir=parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def save_model(
    model: onnx.ModelProto,
    path: str | os.PathLike[str],
    *,
    external_data: bool | None = None,
    base_dir: str | os.PathLike[str] | None = None,
    transform: Mapping[str, Transform] | None = None,
) -> Path:
    """Write ``model`` to ``path`` atomically (see the module docstring).

    ``external_data=None`` picks external data (one ``<name>.data`` file beside the model) when the model already
    keeps weights externally, they exceed :data:`EXTERNAL_DATA_THRESHOLD`, or transforms are given.
    ``external_data=False`` with external tensors or transforms writes one self-contained file, still one tensor at a
    time (:func:`_write_inline`), so an input read lazily from its own .onnx is written back in the same layout. ``base_dir``
    resolves relative external locations of ``model``. In external mode the initializers of ``model`` are rewritten
    to reference the new data file.
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    transform = dict(transform or {})
    if external_data is None:
        external_data = uses_external_data(model) or model_size_bytes(model) > EXTERNAL_DATA_THRESHOLD or bool(transform)
    data_path = data_file_of(out)
    with work_dir(out.parent, "save") as tmp_dir:
        tmp = tmp_dir / out.name
        if external_data:
            _write_streaming(model, tmp_dir / data_path.name, data_path.name, base_dir, transform)
            onnx.save_model(model, str(tmp))
            out.unlink(missing_ok=True)  # never an old .onnx beside a new data file
            os.replace(tmp_dir / data_path.name, data_path)
        elif transform or uses_external_data(model):
            _write_inline(model, tmp, base_dir, transform)
        else:
            onnx.save_model(model, str(tmp))
        _fix_mode(tmp)
        os.replace(tmp, out)
    if not external_data and data_path.exists():
        log.info("%s: leaving %s (not referenced by the new model)", out, data_path)
    return out


def _fix_mode(path: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    with contextlib.suppress(OSError):
        os.chmod(path, 0o666 & ~umask)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes | memoryview) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and an ``os.replace``."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _fix_mode(Path(tmp))
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def _write_streaming(model, data_path: Path, data_name: str, base_dir, transform: Mapping[str, Transform]) -> None:
    offset = 0
    with open(data_path, "wb") as f:
        for t in model.graph.initializer:
            external = is_external(t)
            fn = transform.get(t.name)
            if fn is not None:
                arr = read_external(t, base_dir, mmap=False) if external else numpy_helper.to_array(t)
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
                src = external_path(t, base_dir)
                _, src_offset, length = external_info(t)
                length = nbytes(t) if length is None else length
                _copy_range(src, src_offset, length, f, t.name)
            else:
                length = len(payload)
                f.write(payload)
            for field in TENSOR_VALUE_FIELDS:
                t.ClearField(field)
            del t.external_data[:]
            t.data_location = TensorProto.EXTERNAL
            for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(length))):
                entry = t.external_data.add()
                entry.key, entry.value = key, value
            offset += length


#: protobuf refuses messages of 2 GiB or more
_PROTOBUF_LIMIT = 2**31 - 1


def _write_inline(model: onnx.ModelProto, path: Path, base_dir, transform: Mapping[str, Transform]) -> None:
    """Write ``model`` as one .onnx file with every initializer inline, one tensor at a time.

    A ModelProto is written as its own fields, then the graph (field 7) as its fields without initializers followed
    by each initializer (graph field 5: the tensor's header fields, then its values as ``raw_data``, field 9).
    Protobuf lets fields come in any order and repeated fields concatenate, so the file parses to the same model as
    ``onnx.save`` would write; every length is known from dims and dtype before any value is read.
    Invariant: a transform keeps its tensor's shape and dtype (checked; a mismatch raises before the file is used).
    """
    rest = onnx.ModelProto()
    rest.CopyFrom(model)
    del rest.graph.initializer[:]
    graph_rest = rest.graph.SerializeToString()
    rest.ClearField("graph")
    parts: list[tuple[bytes, TensorProto | None, int]] = []  # (bytes before the values, tensor to stream, n values)
    for t in model.graph.initializer:
        if t.name not in transform and not is_external(t):
            body = t.SerializeToString()
            parts.append((len_prefix(GRAPH_INITIALIZER, len(body)) + body, None, 0))
            continue
        head = TensorProto()
        head.CopyFrom(t)
        for field in (*TENSOR_VALUE_FIELDS, "external_data", "data_location"):
            head.ClearField(field)
        n = nbytes(t)
        tensor_head = head.SerializeToString() + len_prefix(TENSOR_RAW_DATA, n)  # the values follow
        parts.append((len_prefix(GRAPH_INITIALIZER, len(tensor_head) + n) + tensor_head, t, n))
    graph_len = len(graph_rest) + sum(len(b) + n for b, _, n in parts)
    head_bytes = rest.SerializeToString() + len_prefix(MODEL_GRAPH, graph_len)
    if len(head_bytes) + graph_len > _PROTOBUF_LIMIT:
        raise PermsparseError(f"{path.name}: {len(head_bytes) + graph_len} bytes do not fit in one .onnx file "
                              "(protobuf's 2 GB limit); write it with external data")
    with open(path, "wb") as f:
        f.write(head_bytes)
        f.write(graph_rest)
        for before, t, n in parts:
            f.write(before)
            if t is None:
                continue
            fn = transform.get(t.name)
            if fn is None:
                _, offset, _ = external_info(t)
                _copy_range(external_path(t, base_dir), offset, n, f, t.name)
                continue
            arr = read_external(t, base_dir, mmap=False) if is_external(t) else numpy_helper.to_array(t)
            new = np.ascontiguousarray(fn(arr))
            if new.dtype != arr.dtype or new.shape != arr.shape or new.nbytes != n:
                raise PermsparseError(f"internal error: the transform of {t.name!r} changed its shape or dtype "
                                      f"({arr.shape} {arr.dtype} -> {new.shape} {new.dtype})")
            f.write(new.astype(new.dtype.newbyteorder("<"), copy=False).tobytes())


def _copy_range(src: Path, offset: int, length: int, f, name: str) -> None:
    with open(src, "rb") as g:
        g.seek(offset)
        left = length
        while left:
            chunk = g.read(min(_CHUNK, left))
            if not chunk:
                raise PermsparseError(f"external data of {name!r} is truncated in {src}")
            f.write(chunk)
            left -= len(chunk)


def spill_constants(graph, names: set[str], folder: str | os.PathLike[str]) -> None:
    """Move the in-memory values of constants ``names`` of a gs graph to a data file in ``folder``.

    Each constant then reads its values from that file on demand (:class:`permsparse.ir.graph.ExternalValues`), so
    the permuted weights of a big model are not held in memory while it is verified and written.
    """
    import onnx_graphsurgeon as gs

    from permsparse.ir.graph import ExternalValues

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

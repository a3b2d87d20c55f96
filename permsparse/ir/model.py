"""Loading a model: one loader for every verb, with the checks that turn bad input into a one-line error.

:func:`load_model` reads the graph without external data (weights stay on disk and are memory-mapped when a pass
needs them), runs the ONNX checker, and :func:`check_input` refuses what permsparse cannot optimize: unsupported
weight types, training-mode Dropout, non-finite weights (named). :func:`model_files` lists every file a model
consists of, so no output ever lands on one of them.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from permsparse.errors import PermsparseError
from permsparse.ir.external import (
    data_files,
    is_external,
    iter_tensors,
    nbytes,
    read_external,
    uses_external_data,
)
from permsparse.ir.header import load_structure

log = logging.getLogger(__name__)

#: Protobuf cannot serialize a model over 2 GiB inline; stay well below it.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000

#: Weight types permsparse prunes (numeric work in float32/float64, rounded once to the stored type on write).
FLOAT_TYPES = {TensorProto.FLOAT: "float32", TensorProto.FLOAT16: "float16", TensorProto.BFLOAT16: "bfloat16"}
_EXPONENT_BITS = {TensorProto.FLOAT16: np.uint16(0x7C00), TensorProto.BFLOAT16: np.uint16(0x7F80)}


def load_model(path: str | os.PathLike[str], *, lazy: bool = True, check: bool = True,
               lazy_inline_above: int | None = None) -> onnx.ModelProto:
    """Load an ONNX model, raising :class:`PermsparseError` (one line, what to do) on bad input.

    ``lazy`` (default) leaves external data on disk: tensors keep their references and are read memory-mapped on
    demand (:func:`permsparse.ir.graph.import_graph`); ``lazy=False`` loads every weight into memory.
    ``lazy_inline_above``: a model whose weights lie inside its .onnx file and take more than this many bytes once
    16-bit floats are widened is read with :func:`permsparse.ir.header.load_lazy` — its big weights become external
    references into the .onnx file itself, read memory-mapped like any external data, never parsed into memory.
    """
    p = Path(path)
    if p.is_dir():
        raise PermsparseError(f"{p} is a folder; give the path of an .onnx file")
    if not p.is_file():
        raise PermsparseError(f"{p}: no such file. Give the path of an .onnx model.")
    try:
        model = _load_lazy_inline(p, lazy_inline_above) if lazy and lazy_inline_above is not None else None
        read_lazily = model is not None
        if model is None:
            model = onnx.load(str(p), load_external_data=False)
    except PermsparseError:
        raise
    except Exception as exc:  # protobuf raises several types
        raise PermsparseError(
            f"{p}: cannot be read as ONNX ({type(exc).__name__}: {_first_line(exc)}). Is it an .onnx file?"
        ) from None
    if not model.HasField("graph") or not model.graph.node:
        raise PermsparseError(f"{p}: the ONNX graph has no nodes; export the model again.")
    external = uses_external_data(model)
    if external:
        _check_data_files(model, p)
    if check:
        try:
            if read_lazily:
                # the lazy proto's references are relative to the model's folder, where the checker looks for them
                # (from the working directory); checking the path instead would parse every weight (2x the file)
                with contextlib.chdir(p.parent):
                    onnx.checker.check_model(model)
            else:
                # With external data the checker reads the file path itself (and checks the data files exist).
                onnx.checker.check_model(str(p) if external or p.stat().st_size > EXTERNAL_DATA_THRESHOLD else model)
        except Exception as exc:
            raise PermsparseError(f"{p}: the ONNX checker rejects this model: {_first_line(exc)}") from None
    if external and not lazy:
        try:
            onnx.external_data_helper.load_external_data_for_model(model, str(p.parent))
        except Exception as exc:
            raise PermsparseError(f"{p}: cannot read its external data ({_first_line(exc)})") from None
    return model


def _load_lazy_inline(p: Path, above: int) -> onnx.ModelProto | None:
    """:func:`load_lazy` of ``p`` if its inline weights exceed ``above`` bytes widened to fp32; else None."""
    from permsparse.ir.header import load_lazy

    if p.stat().st_size * 2 <= above:  # cannot be over: 16-bit weights at most double
        return None
    header = load_structure(p)
    if uses_external_data(header):
        return None
    return load_lazy(p) if fp32_bytes(header) > above else None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _check_data_files(model: onnx.ModelProto, path: Path) -> None:
    for t in iter_tensors(model):
        if not is_external(t):
            continue
        try:
            read_external(t, path.parent)
        except PermsparseError as exc:
            raise PermsparseError(f"{path}: {exc}") from None
        except (KeyError, ValueError, OSError) as exc:
            raise PermsparseError(f"{path}: tensor {t.name!r} has bad external-data fields ({exc})") from None


def model_files(path: str | os.PathLike[str], model: onnx.ModelProto | None = None) -> set[Path]:
    """The resolved paths of a model's .onnx file and every external data file it reads."""
    p = Path(path)
    if model is None:
        model = load_structure(p)
    return {p.resolve()} | data_files(model, p.parent)


def weight_values(tensor: TensorProto, base_dir: str | os.PathLike[str] | None) -> np.ndarray:
    """A tensor's values (memory-mapped when external)."""
    if is_external(tensor):
        return read_external(tensor, base_dir)
    return numpy_helper.to_array(tensor)


def check_input(model: onnx.ModelProto, path: str | os.PathLike[str], *, finite: bool = True) -> None:
    """Refuse a model permsparse cannot optimize, naming the tensor or node and saying what to do."""
    p = Path(path)
    for node in model.graph.node:
        if node.op_type == "Dropout" and len(node.input) > 2 and node.input[2]:
            inits = {t.name: t for t in model.graph.initializer}
            t = inits.get(node.input[2])
            if t is not None and bool(numpy_helper.to_array(t)):
                raise PermsparseError(
                    f"{p}: Dropout node {node.name!r} runs in training mode, so the model is not deterministic. "
                    "Export it after calling model.eval()."
                )
        if node.op_type in ("If", "Loop", "Scan"):
            log.info("%s: node %s (%s) has a subgraph; weights inside it are not pruned", p, node.name, node.op_type)
    if finite:
        check_finite(model, p.parent, p)


def check_finite(model: onnx.ModelProto, base_dir: str | os.PathLike[str] | None, what: str | os.PathLike[str]) -> None:
    """Raise naming the first float weight that holds NaN or Inf (read in chunks: bounded memory)."""
    for t in model.graph.initializer:
        if t.data_type not in FLOAT_TYPES and t.data_type != TensorProto.DOUBLE:
            continue
        values = weight_values(t, base_dir).reshape(-1)
        exponent = _EXPONENT_BITS.get(t.data_type)  # 16-bit floats: all-ones exponent bits <=> NaN/Inf
        step = 1 << 24
        for start in range(0, values.size, step):
            chunk = np.asarray(values[start:start + step])
            if exponent is not None:
                finite = not ((chunk.view(np.uint16) & exponent) == exponent).any()
            else:
                finite = bool(np.isfinite(chunk).all())
            if not finite:
                bad = int(np.count_nonzero(~np.isfinite(values.astype(np.float32))))
                raise PermsparseError(
                    f"{what}: weight {t.name!r} holds {bad} NaN/Inf value(s); a model with non-finite weights cannot "
                    "be pruned or verified. Fix the export (or the training run) that produced it."
                )


def float_types(model: onnx.ModelProto) -> dict[str, int]:
    """How many initializers of each float type the model has (e.g. ``{"float16": 181, "float32": 30}``)."""
    counts: dict[str, int] = {}
    for t in model.graph.initializer:
        name = FLOAT_TYPES.get(t.data_type)
        if name:
            counts[name] = counts.get(name, 0) + 1
    return counts


def model_size_bytes(model: onnx.ModelProto) -> int:
    """Bytes of all initializers, stored inline or externally (what decides whether external data is needed)."""
    total = 0
    for t in model.graph.initializer:
        total += nbytes(t) if is_external(t) else (len(t.raw_data) or t.ByteSize())
    return total


def fp32_bytes(model: onnx.ModelProto) -> int:
    """Bytes of all initializers once 16-bit floats are widened to float32 (tensor by tensor): the one size rule that
    decides between reading a model lazily and holding it, and between checking it whole or block by block. Works on
    a header without values (:func:`permsparse.ir.header.load_structure`): sizes come from dims and types."""
    half = (TensorProto.FLOAT16, TensorProto.BFLOAT16)
    return sum(nbytes(t) * (2 if t.data_type in half else 1) for t in model.graph.initializer)


__all__ = [
    "EXTERNAL_DATA_THRESHOLD",
    "FLOAT_TYPES",
    "check_finite",
    "check_input",
    "float_types",
    "load_model",
    "model_files",
    "fp32_bytes",
    "model_size_bytes",
    "uses_external_data",
    "weight_values",
]


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of one file, read in 1 MiB chunks (for an ``.onnx``: graph and inline weights; external data files
    are named in it, not hashed)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()

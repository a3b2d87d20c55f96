"""Small I/O helpers shared by the runtime modules: atomic writes and ONNX graph loading without weights."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import onnx

from permsparse.errors import PermsparseError

logger = logging.getLogger(__name__)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes | memoryview) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and an ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def check_onnx_path(path: str | os.PathLike[str]) -> Path:
    """Return ``path`` as a Path, raising a :class:`PermsparseError` if it is not a readable file."""
    p = Path(path)
    if not p.is_file():
        raise PermsparseError(f"{p}: no such ONNX file (check the path)")
    return p


def load_graph(path: str | os.PathLike[str], with_weights: bool = False) -> onnx.ModelProto:
    """Load an ONNX model; without ``with_weights`` external tensors stay on disk (cheap for big models)."""
    p = check_onnx_path(path)
    try:
        model = onnx.load(str(p), load_external_data=False)
        if with_weights:
            from onnx.external_data_helper import load_external_data_for_model

            load_external_data_for_model(model, str(p.parent))
        return model
    except Exception as exc:  # onnx raises DecodeError, OSError, ...
        raise PermsparseError(f"{p}: cannot read ONNX model ({exc}); is it a valid .onnx file?") from exc


def save_model(model: onnx.ModelProto, path: str | os.PathLike[str]) -> Path:
    """Save ``model`` to ``path`` (external data beside it when over ~1.8 GB), atomically for the .onnx file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    big = model.ByteSize() > 1_800_000_000 if _small_enough_to_size(model) else True
    if big:
        data_name = path.name + ".data"
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data_name)
        return path
    atomic_write_bytes(path, model.SerializeToString())
    return path


def _small_enough_to_size(model: onnx.ModelProto) -> bool:
    try:
        model.ByteSize()
        return True
    except Exception:  # protobuf refuses > 2 GB
        return False

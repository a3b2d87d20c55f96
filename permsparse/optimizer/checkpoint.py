"""Solved permutation units on disk, keyed by what determines them, so a killed run resumes where it stopped.

Key (:func:`unit_key`): SHA-256 over the permsparse version, the method's name and configuration (every dataclass
field of the method object, which includes its seed and per-unit time budget) and the problem's content
(:func:`problem_digest`: every numpy array reachable from the problem's dataclass fields, through tuples, lists and
nested dataclasses, by dtype, shape and bytes; other field values by ``repr``; the problem's ``name`` is left out,
so two units with the same content share one entry). New optional array fields of the problem are covered without
changes here.

Value: ``<key>.npy`` (the permutation) and ``<key>.json`` (the quality numbers), under ``<work_dir>/units/<key[:2]>/``.
Each file is written to a temporary name in the same folder and renamed over its final name (``os.replace`` is
atomic on POSIX), the ``.npy`` first: the ``.json`` is the commit mark, so an entry is either absent or complete, even
when the writer is killed with SIGKILL between the two. ``get`` re-checks what it reads (the perm's length and its
SHA-256 stored in the JSON) and treats anything inconsistent as absent.

Invariant: ``put(key, r)`` then ``get(key)`` returns ``r``'s permutation bit for bit (and its numbers) in any later
process; a key changes whenever anything that may change the solver's answer changes (problem arrays, method,
config, seed, per-unit budget, permsparse version).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from permsparse.optimizer.base import SolveResult

log = logging.getLogger(__name__)

FORMAT = 1


def _update(h: hashlib._Hash, obj: Any, skip: frozenset[str] = frozenset()) -> None:
    """Feed ``obj`` into ``h`` unambiguously (type tags and lengths before contents)."""
    if isinstance(obj, np.ndarray):
        a = np.ascontiguousarray(obj)
        h.update(f"nd|{a.dtype.str}|{a.shape}|".encode())
        h.update(memoryview(a).cast("B") if a.size else b"")
    elif isinstance(obj, (tuple, list)):
        h.update(f"seq|{type(obj).__name__}|{len(obj)}|".encode())
        for item in obj:
            _update(h, item)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        h.update(f"dc|{type(obj).__module__}.{type(obj).__qualname__}|".encode())
        for f in dataclasses.fields(obj):
            if f.name in skip:
                continue
            h.update(f"f|{f.name}|".encode())
            _update(h, getattr(obj, f.name))
    elif isinstance(obj, dict):
        h.update(f"map|{len(obj)}|".encode())
        for k in sorted(obj, key=repr):
            h.update(f"k|{k!r}|".encode())
            _update(h, obj[k])
    elif obj is None or isinstance(obj, (bool, int, float, str, bytes, np.generic)):
        h.update(f"v|{type(obj).__name__}|{obj!r}|".encode())
    elif hasattr(obj, "__dict__") and not callable(obj):  # a plain configured object: its attributes
        h.update(f"obj|{type(obj).__module__}.{type(obj).__qualname__}|".encode())
        _update(h, {k: v for k, v in vars(obj).items() if not k.startswith("_") and k not in skip})
    else:
        raise TypeError(f"cannot hash a {type(obj).__name__} into a checkpoint key; give it a stable repr or "
                        "make it a dataclass / numpy array")


def problem_digest(problem: Any) -> str:
    """SHA-256 hex digest of a problem's content (every dataclass field except ``name``)."""
    h = hashlib.sha256()
    _update(h, problem, skip=frozenset({"name"}))
    return h.hexdigest()


def config_digest(config: Any) -> str:
    """SHA-256 hex digest of a method object or configuration (all dataclass fields, nested)."""
    h = hashlib.sha256()
    _update(h, config)
    return h.hexdigest()


def unit_key(problem_hash: str, method_name: str, method: Any) -> str:
    """The checkpoint key of solving a problem with digest ``problem_hash`` by ``method`` (a configured object)."""
    from permsparse import __version__

    h = hashlib.sha256()
    h.update(f"permsparse-unit|{FORMAT}|{__version__}|{method_name}|".encode())
    h.update(config_digest(method).encode())
    h.update(problem_hash.encode())
    return h.hexdigest()


def atomic_write(path: Path, write) -> None:
    """Write ``path`` through ``write(file)`` on a temporary name in the same folder, then rename it into place."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


class CheckpointStore:
    """Solved units under ``work_dir/units`` (see the module docstring for the format and its guarantees)."""

    def __init__(self, work_dir: str | os.PathLike[str]) -> None:
        self.work_dir = Path(work_dir)
        self.root = self.work_dir / "units"
        self.root.mkdir(parents=True, exist_ok=True)

    def _paths(self, key: str) -> tuple[Path, Path]:
        d = self.root / key[:2]
        return d / f"{key}.npy", d / f"{key}.json"

    def get(self, key: str) -> SolveResult | None:
        """The stored result (``reused=True``), or None when absent or inconsistent."""
        from permsparse.optimizer.base import SolveResult

        npy, meta = self._paths(key)
        try:
            info = json.loads(meta.read_text())
            perm = np.load(npy, allow_pickle=False)
        except (OSError, ValueError):
            return None
        if (info.get("format") != FORMAT or perm.ndim != 1 or perm.shape[0] != info.get("k")
                or hashlib.sha256(perm.astype(np.int64).tobytes()).hexdigest() != info.get("perm_sha256")):
            log.warning("ignoring inconsistent checkpoint entry %s", meta)
            return None
        fields = {f.name for f in dataclasses.fields(SolveResult)} - {"perm", "reused"}
        try:
            return SolveResult(perm=perm.astype(np.int64), reused=True, **{k: info["result"][k] for k in fields})
        except (KeyError, TypeError):
            log.warning("ignoring checkpoint entry %s written by another version", meta)
            return None

    def put(self, key: str, result: Any) -> None:
        """Store a solve result (a dataclass with a ``perm`` array) under ``key``: atomically, the JSON last."""
        npy, meta = self._paths(key)
        npy.parent.mkdir(parents=True, exist_ok=True)
        perm = np.ascontiguousarray(np.asarray(result.perm, dtype=np.int64))
        atomic_write(npy, lambda f: np.save(f, perm, allow_pickle=False))
        numbers = {f.name: getattr(result, f.name) for f in dataclasses.fields(result) if f.name not in ("perm", "reused")}
        info = {"format": FORMAT, "key": key, "k": int(perm.shape[0]),
                "perm_sha256": hashlib.sha256(perm.tobytes()).hexdigest(), "result": numbers}
        atomic_write(meta, lambda f: f.write(json.dumps(info, sort_keys=True).encode()))

    def __contains__(self, key: str) -> bool:
        return self._paths(key)[1].is_file()

    def __len__(self) -> int:
        return sum(1 for _ in self.root.glob("*/*.json"))

"""Reconstructed weights on disk: one ``.npy`` per weight in a work folder, read back memory-mapped.

The block loop produces every pruned weight's effective values (stored layout, the model's dtype); keeping them all
in memory would double a big model's footprint, so each goes to disk as soon as its block is done.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np


class WeightStore:
    def __init__(self, folder: str | Path, dtypes: dict[str, np.dtype] | None = None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.dtypes = dict(dtypes or {})
        self.names: list[str] = []

    def _path(self, name: str) -> Path:
        return self.folder / (hashlib.sha1(name.encode()).hexdigest()[:16] + ".npy")

    def put(self, name: str, stored: np.ndarray) -> None:
        dtype = self.dtypes.get(name)
        arr = np.asarray(stored) if dtype is None else np.asarray(stored).astype(dtype)
        np.save(self._path(name), np.ascontiguousarray(arr))
        if name not in self.names:
            self.names.append(name)

    def get(self, name: str) -> np.ndarray:
        return np.load(self._path(name), mmap_mode="r")

    def __contains__(self, name: str) -> bool:
        return name in self.names

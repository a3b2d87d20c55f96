"""Block-wise state on disk (``--work-dir``), so a killed block-wise run resumes after its last finished block.

After block ``l`` the engine commits, under ``<work_dir>/blocks/<run key>/``:

- ``weights/<sha1(name)>.npy``: the effective (pruned, reconstructed, tuned) stored values of block ``l``'s weights;
- ``stream-<l+1>.pt``: every calibration batch's ``sparse`` and ``dense`` stream tensors after block ``l`` (the
  inputs of block ``l + 1``; side tensors and padding masks are recomputed by the prefix, which is cheap);
- ``state.json`` (written last: the commit mark): the number of finished blocks, every permutation learned so far,
  the unit and block reports, the stream file's name and SHA-256 and each weight file's SHA-256.

Every file is written to a temporary name and renamed (atomic on POSIX), weights and stream first, so after a kill
(SIGKILL included) ``state.json`` names either the previous commit, whose files are still there (older stream files
are deleted only after the new commit), or the new one. :meth:`BlockCheckpoint.load` re-checks the hashes and treats
anything inconsistent as absent (the run then starts from block 0).

Run key (:func:`run_key`): SHA-256 of the permsparse version, the input model's digest, every option that can change
the block-wise result (every option of the resolved config, :meth:`~permsparse.pipeline.config.ResolvedConfig.to_dict`, but progress, workers, cluster, work dir,
evaluation, check and mask), the permutations fixed before the loop, the block plan and the calibration batches'
bytes. Invariant: a resumed run continues from exactly the state the interrupted run had after its last committed
block (same stream tensors bit for bit, same weights, same permutations), so it computes what an uninterrupted run
computes; any change of model, options or data gives another key, so stale state is never reused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from permsparse.ir.model import file_sha256
from permsparse.optimizer.checkpoint import atomic_write as _atomic_write

if TYPE_CHECKING:
    from permsparse.pipeline.config import ResolvedConfig

log = logging.getLogger(__name__)

FORMAT = 1
#: Options that cannot change what the block loop computes (left out of the run key).
_NOT_IN_KEY = frozenset({"progress", "workers", "cluster", "work_dir", "evaluate", "check", "mask", "rtol",
                         "recipe_perms", "budget_s", "recover"})


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _hash_array(h, a: Any) -> None:
    arr = np.ascontiguousarray(np.asarray(a))
    h.update(f"{arr.dtype.str}|{arr.shape}|".encode())
    h.update(arr.tobytes())


def run_key(model_digest: str, cfg: ResolvedConfig, pre_perms: dict[str, np.ndarray], blocks: Any,
            feeds: list[dict[str, np.ndarray]]) -> str:
    """The key of one block-wise run (see the module docstring)."""
    from permsparse import __version__

    h = hashlib.sha256()
    h.update(f"permsparse-blocks|{FORMAT}|{__version__}|{model_digest}|".encode())
    for name, value in cfg.to_dict().items():
        if name not in _NOT_IN_KEY:
            h.update(f"{name}={value!r}|".encode())
    for name in sorted(pre_perms):
        h.update(f"perm|{name}|".encode())
        _hash_array(h, np.asarray(pre_perms[name], dtype=np.int64))
    h.update(repr(blocks).encode())
    for feed in feeds:
        for k in sorted(feed):
            h.update(f"feed|{k}|".encode())
            _hash_array(h, feed[k])
    return h.hexdigest()


@dataclass
class Saved:
    """What a committed checkpoint holds."""

    done: int  # blocks finished
    perms: dict[str, np.ndarray]
    unit_reports: list[dict]
    block_reports: list[dict]
    streams: list[tuple[Any, Any]]  # (sparse, dense) torch tensors per batch: the input of block ``done``
    weights: dict[str, Path]  # weight name -> .npy of its stored effective values


class BlockCheckpoint:
    """The committed block-wise state of one run key under ``work_dir/blocks`` (see the module docstring)."""

    def __init__(self, work_dir: str | os.PathLike[str], key: str):
        self.root = Path(work_dir) / "blocks" / key[:32]
        self.key = key

    def _weight_path(self, name: str) -> Path:
        return self.root / "weights" / (hashlib.sha1(name.encode()).hexdigest()[:20] + ".npy")

    @property
    def _state(self) -> Path:
        return self.root / "state.json"

    def load(self) -> Saved | None:
        """The last committed state, or None (nothing committed, or anything inconsistent)."""
        import torch

        try:
            info = json.loads(self._state.read_text())
        except (OSError, ValueError):
            return None
        try:
            if info.get("format") != FORMAT or info.get("key") != self.key:
                raise ValueError("another format or run")
            stream = self.root / info["stream"]
            if file_sha256(stream) != info["stream_sha256"]:
                raise ValueError(f"{stream.name} does not match its hash")
            weights = {}
            for name, digest in info["weights"].items():
                path = self._weight_path(name)
                if file_sha256(path) != digest:
                    raise ValueError(f"the stored weight {name} does not match its hash")
                weights[name] = path
            streams = torch.load(stream, weights_only=True)
            perms = {k: np.asarray(v, dtype=np.int64) for k, v in info["perms"].items()}
            return Saved(int(info["done"]), perms, info["unit_reports"], info["block_reports"],
                         [(s, d) for s, d in streams], weights)
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
            log.warning("ignoring the block-wise checkpoint in %s (%s); starting from the first block", self.root,
                        exc)
            return None

    def commit(self, done: int, perms: dict[str, np.ndarray], unit_reports: list[dict], block_reports: list[dict],
               streams: list[tuple[Any, Any]], new_weights: dict[str, np.ndarray]) -> None:
        """Commit the state after ``done`` finished blocks: ``new_weights`` are the last block's stored values."""
        import torch

        (self.root / "weights").mkdir(parents=True, exist_ok=True)
        try:
            previous = json.loads(self._state.read_text())
        except (OSError, ValueError):
            previous = {}
        digests = dict(previous.get("weights", {})) if previous.get("key") == self.key else {}
        for name, arr in new_weights.items():
            path = self._weight_path(name)
            _atomic_write(path, lambda f, a=arr: np.save(f, np.ascontiguousarray(a), allow_pickle=False))
            digests[name] = file_sha256(path)
        stream = self.root / f"stream-{done}.pt"
        _atomic_write(stream, lambda f: torch.save([(s.cpu().contiguous(), d.cpu().contiguous()) for s, d in streams],
                                                   f))
        info = {"format": FORMAT, "key": self.key, "done": done, "stream": stream.name,
                "stream_sha256": file_sha256(stream), "weights": digests,
                "perms": {k: np.asarray(v, dtype=np.int64).tolist() for k, v in perms.items()},
                "unit_reports": unit_reports, "block_reports": block_reports}
        _atomic_write(self._state, lambda f: f.write(json.dumps(info).encode()))
        for old in self.root.glob("stream-*.pt"):
            if old.name != stream.name:
                old.unlink(missing_ok=True)


__all__ = ["BlockCheckpoint", "Saved", "run_key"]

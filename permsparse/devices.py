"""The one ``--device`` rule of every torch stage: ``optimize`` (block calibration, Hessians, SparseGPT, block
tuning, permutation learners), ``recover`` and the torch ``bench`` backend.

``cpu`` is the default of ``optimize`` and ``recover`` (what CI tests); ``auto`` takes CUDA when torch sees a GPU;
``cuda`` without one is refused with one line that says what to do instead. Light at import (torch is imported only
when a device is resolved).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from permsparse.errors import UsageError

if TYPE_CHECKING:
    import torch

#: the values ``--device`` takes, in the order the CLI offers them
DEVICES: tuple[str, ...] = ("cpu", "cuda", "auto")


def resolve_device(name: str | None, *, default: str = "cpu", option: str = "--device") -> torch.device:
    """``name`` (None: ``default``) as a torch device: ``auto`` → cuda when available, else cpu.

    Raises :class:`UsageError` for an unknown name, or ``cuda`` on a machine where torch sees no CUDA device."""
    import torch

    name = default if name is None else str(name)
    kind = name.split(":", 1)[0]
    if kind not in DEVICES:
        raise UsageError(f"{option} {name!r} is not one of: {', '.join(DEVICES)}")
    if kind == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"{option} {name}: torch sees no CUDA device here (torch.cuda.is_available() is False); "
                         f"use {option} cpu, or {option} auto to take a GPU only where there is one")
    return torch.device(name)


def feed_to_device(feed: Mapping[str, Any], device: torch.device | str) -> dict[str, torch.Tensor]:
    """A feed (numpy arrays or tensors) as torch tensors: float data on ``device``; integer inputs (token ids,
    masks, shapes) stay on the CPU, where the graph programs read them (:mod:`permsparse.torchgraph` moves what it
    computes with)."""
    import numpy as np
    import torch

    out = {}
    for k, v in feed.items():
        t = v if isinstance(v, torch.Tensor) else torch.as_tensor(np.asarray(v))
        out[k] = t.to(device) if t.is_floating_point() else t
    return out


__all__ = ["DEVICES", "feed_to_device", "resolve_device"]

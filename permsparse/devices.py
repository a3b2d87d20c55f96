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


#: the values of recovery's ``--recover-precision``: ``auto`` (bf16 autocast where the device multiplies bf16
#: natively, else fp32), ``fp32``, ``bf16`` (mixed precision: fp32 master weights, bf16 matrix products)
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16")


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:  # not Linux: no flags to read, so no claim of native bf16
        pass
    return set()


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bf16 matrices in hardware: a CUDA GPU of compute capability 8.0+ (Ampere),
    or an x86 CPU with AVX512-BF16 or AMX-BF16 (Zen 4, Cooper Lake, Sapphire Rapids+). Elsewhere bf16 would be
    emulated, slower than fp32."""
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 8
    if device.type == "cpu":
        return bool(_cpu_flags() & {"avx512_bf16", "amx_bf16"}) and torch.backends.mkldnn.is_available()
    return False


def autocast_dtype(precision: str | None, device: torch.device, *, option: str = "--recover-precision"):
    """The autocast dtype of ``precision`` on ``device``: ``torch.bfloat16`` or None (plain fp32)."""
    import torch

    precision = "auto" if precision is None else str(precision)
    if precision not in PRECISIONS:
        raise UsageError(f"{option} {precision!r} is not one of: {', '.join(PRECISIONS)}")
    if precision == "bf16" or (precision == "auto" and native_bf16(device)):
        return torch.bfloat16
    return None


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


__all__ = ["DEVICES", "PRECISIONS", "autocast_dtype", "feed_to_device", "native_bf16", "resolve_device"]

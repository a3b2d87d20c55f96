"""Latency measurement: warm-up, timed samples (CUDA events on GPU, perf_counter on CPU), median and p90.

Pure Python + numpy (torch only when timing on CUDA), so the standalone ``bench/linear_sparse.py`` can use it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TimingStats:
    """Milliseconds per call over ``n`` samples."""

    median_ms: float
    p90_ms: float
    mean_ms: float
    min_ms: float
    n: int

    @classmethod
    def from_samples(cls, samples_ms: Sequence[float]) -> TimingStats:
        a = np.asarray(samples_ms, dtype=np.float64)
        if a.size == 0:
            raise ValueError("no timing samples")
        return cls(
            median_ms=float(np.median(a)),
            p90_ms=float(np.percentile(a, 90)),
            mean_ms=float(a.mean()),
            min_ms=float(a.min()),
            n=int(a.size),
        )

    def scaled(self, factor: float) -> TimingStats:
        return TimingStats(self.median_ms * factor, self.p90_ms * factor, self.mean_ms * factor, self.min_ms * factor, self.n)

    def __add__(self, other: TimingStats) -> TimingStats:
        """Sum of two independent layers' times (medians and p90s add up as an estimate)."""
        return TimingStats(
            self.median_ms + other.median_ms,
            self.p90_ms + other.p90_ms,
            self.mean_ms + other.mean_ms,
            self.min_ms + other.min_ms,
            min(self.n, other.n),
        )


def time_callable(
    fn: Callable[[], object],
    iters: int = 50,
    warmup: int = 10,
    cuda: bool = False,
    stream: object | None = None,
    inner: int = 1,
) -> TimingStats:
    """Time ``fn``: ``warmup`` untimed calls, then ``iters`` samples of ``inner`` calls each (ms per call).

    With ``cuda`` each sample is bracketed by CUDA events recorded on ``stream`` (default: the current stream).
    """
    if iters < 1:
        raise ValueError("iters must be >= 1")
    inner = max(1, int(inner))
    for _ in range(max(0, warmup)):
        fn()
    samples: list[float] = []
    if cuda:
        import torch

        s = stream or torch.cuda.current_stream()
        torch.cuda.synchronize()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        for start, end in events:
            start.record(s)
            for _ in range(inner):
                fn()
            end.record(s)
        torch.cuda.synchronize()
        samples = [start.elapsed_time(end) / inner for start, end in events]
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            samples.append((time.perf_counter() - t0) * 1e3 / inner)
    return TimingStats.from_samples(samples)


def auto_inner(fn: Callable[[], object], target_ms: float = 0.5, cap: int = 100, cuda: bool = False) -> int:
    """Calls per sample so that one sample lasts about ``target_ms`` (tiny kernels are otherwise timer-bound)."""
    one = time_callable(fn, iters=3, warmup=2, cuda=cuda).median_ms
    if one <= 0:
        return cap
    return int(min(cap, max(1, round(target_ms / one))))

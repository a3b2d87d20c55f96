"""Comparing model outputs: the one comparison behind the fold check, ``bench``'s output check and the metrics.

:func:`compare` is the fold check's criterion: for every output, ``max|a − b| ≤ rtol · max|a|``; a shape mismatch or
a non-finite difference is infinitely wrong. :func:`agreement` summarizes how close two sets of outputs are
(relative max difference and cosine over all float values).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

DEFAULT_RTOL = 1e-4


@dataclass(frozen=True)
class Equivalence:
    """Worst relative error over all outputs and inputs, and whether it is within tolerance."""

    max_rel_error: float
    worst_output: str
    rtol: float
    batches: int
    method: str = "whole model on onnxruntime"

    @property
    def ok(self) -> bool:
        return self.max_rel_error <= self.rtol


def rel_error(a: np.ndarray, b: np.ndarray) -> float:
    """``max|a − b| / max|a|`` in float64 (``inf`` for a shape mismatch or a non-finite difference)."""
    if a.shape != b.shape:
        return float("inf")
    if not a.size:
        return 0.0
    a64, b64 = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    scale = max(float(np.abs(a64).max()), 1e-12)
    err = float(np.abs(a64 - b64).max()) / scale
    return err if np.isfinite(err) else float("inf")


def compare(
    reference: Sequence[Mapping[str, np.ndarray]],
    candidate: Sequence[Mapping[str, np.ndarray]],
    rtol: float = DEFAULT_RTOL,
    method: str = "whole model on onnxruntime",
) -> Equivalence:
    """The fold check's verdict over every output of every batch."""
    worst, worst_name = 0.0, ""
    for ref, cand in zip(reference, candidate):
        for name, a in ref.items():
            b = cand.get(name)
            err = float("inf") if b is None else rel_error(np.asarray(a), np.asarray(b))
            if err > worst or not worst_name:
                worst, worst_name = err, name
    return Equivalence(worst, worst_name, rtol, len(reference), method)


def agreement(ref: Sequence[np.ndarray], got: Sequence[np.ndarray]) -> dict[str, float]:
    """``max_rel_diff`` (max |a−b| / max|a|) and ``cosine`` over all float outputs taken together."""
    a = np.concatenate([np.asarray(r, dtype=np.float64).ravel() for r in ref]) if ref else np.zeros(1)
    b = np.concatenate([np.asarray(g, dtype=np.float64).ravel() for g in got]) if got else np.zeros(1)
    scale = max(float(np.abs(a).max()), 1e-12)
    cos = float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30))
    return {"max_rel_diff": float(np.abs(a - b).max()) / scale, "cosine": cos}

"""Verify pass: numerical equivalence of two models on onnxruntime.

Check (no rewrite). The permuted dense model must compute the same function as the input model: for every graph output,
``max|a - b| <= rtol * max(|a|)`` on the same inputs (random inputs and, when given, calibration inputs). In fp32 a fold
only changes summation order, so errors are around 1e-6 relative; the default tolerance is 1e-4.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from permsparse.passes.probe import OrtRunner

log = logging.getLogger(__name__)

DEFAULT_RTOL = 1e-4


@dataclass(frozen=True)
class Equivalence:
    """Worst relative error over all outputs and inputs, and whether it is within tolerance."""

    max_rel_error: float
    worst_output: str
    rtol: float
    batches: int

    @property
    def ok(self) -> bool:
        return self.max_rel_error <= self.rtol


def run_outputs(
    model: onnx.ModelProto | str | Path, feeds: Iterable[Mapping[str, np.ndarray]]
) -> list[dict[str, np.ndarray]]:
    """Graph outputs of ``model`` (a ModelProto, or the path of a saved model) for each feed."""
    runner = OrtRunner(model)
    try:
        return [runner.run(f) for f in feeds]
    finally:
        runner.close()


def compare(
    reference: list[dict[str, np.ndarray]], candidate: list[dict[str, np.ndarray]], rtol: float = DEFAULT_RTOL
) -> Equivalence:
    worst, worst_name = 0.0, ""
    for ref, cand in zip(reference, candidate):
        for name, a in ref.items():
            b = cand[name]
            if a.shape != b.shape:
                return Equivalence(float("inf"), name, rtol, len(reference))
            a64, b64 = a.astype(np.float64), b.astype(np.float64)
            scale = max(float(np.abs(a64).max()) if a64.size else 0.0, 1e-12)
            err = float(np.abs(a64 - b64).max()) / scale if a64.size else 0.0
            if not np.isfinite(err):
                err = float("inf")
            if err > worst:
                worst, worst_name = err, name
    return Equivalence(worst, worst_name, rtol, len(reference))


def check_equivalent(
    reference: onnx.ModelProto,
    candidate: onnx.ModelProto,
    feeds: list[Mapping[str, np.ndarray]],
    rtol: float = DEFAULT_RTOL,
) -> Equivalence:
    """Run both models (one session at a time, to bound memory) on ``feeds`` and compare every output."""
    ref_out = run_outputs(reference, feeds)
    cand_out = run_outputs(candidate, feeds)
    return compare(ref_out, cand_out, rtol)

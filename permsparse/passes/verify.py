"""Verify pass: numerical equivalence of two models on onnxruntime.

Check (no rewrite). The permuted dense model must compute the same function as the input model: for every graph output,
``max|a - b| <= rtol * max(|a|)`` on the same inputs (:func:`permsparse.ir.compare.compare`). In fp32 a fold only
changes summation order, so errors are around 1e-6 relative; the default tolerance is 1e-4.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx

from permsparse.ir.compare import DEFAULT_RTOL, Equivalence, compare
from permsparse.ir.session import run_outputs


def check_equivalent(
    reference: onnx.ModelProto,
    candidate: onnx.ModelProto,
    feeds: list[Mapping[str, np.ndarray]],
    rtol: float = DEFAULT_RTOL,
) -> Equivalence:
    """Run both models (one session at a time, to bound memory) on ``feeds`` and compare every output."""
    return compare(run_outputs(reference, feeds), run_outputs(candidate, feeds), rtol)


__all__ = ["DEFAULT_RTOL", "Equivalence", "check_equivalent", "compare", "run_outputs"]

"""Probe pass: the concrete shape of every tensor and the values of small integer tensors.

The analysis needs the rank and last dimension of every activation, and the values of small integer tensors (Slice
bounds, Gather indices, reduction axes). The probe runs the model once in onnxruntime at a tiny size (batch 1, a short
sequence) with every intermediate tensor exposed; the run also proves that the input model executes. Rewrite: none.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from permsparse.ir.session import Session

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Probe:
    """Result of the probe: the shape of every tensor and the values of small integer tensors."""

    shapes: Mapping[str, tuple[int, ...]]
    values: Mapping[str, np.ndarray]
    feeds: Mapping[str, np.ndarray]
    method: str = "onnxruntime run"


def probe_session(model: onnx.ModelProto, *, base_dir: str | os.PathLike[str] | None = None) -> Session:
    """A session of ``model`` exposing every node output (for :func:`probe`; graph outputs can be asked by name)."""
    return Session(model, [o for n in model.graph.node for o in n.output if o], base_dir=base_dir)


def probe(
    model: onnx.ModelProto,
    feeds: Mapping[str, np.ndarray],
    *,
    session: Session | None = None,
    base_dir: str | Path | None = None,
) -> Probe:
    """Run ``model`` once on ``feeds`` exposing every node output; return all shapes and small integer values."""
    own = session is None
    session = session or probe_session(model, base_dir=base_dir)
    try:
        results = session.run(feeds)
    finally:
        if own:
            session.close()
    shapes: dict[str, tuple[int, ...]] = {k: tuple(int(d) for d in np.shape(v)) for k, v in results.items()}
    values = {
        k: np.asarray(v)
        for k, v in results.items()
        if np.issubdtype(np.asarray(v).dtype, np.integer) and np.size(v) <= 4096
    }
    for name, arr in feeds.items():
        shapes[name] = tuple(arr.shape)
    for t in model.graph.initializer:
        shapes[t.name] = tuple(int(d) for d in t.dims)
    return Probe(shapes=shapes, values=values, feeds=dict(feeds))

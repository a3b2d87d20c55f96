"""Probe pass: the concrete shape of every tensor and the values of small integer tensors.

The analysis needs the rank and last dimension of every activation, and the values of small integer tensors (Slice
bounds, Gather indices, reduction axes). :func:`static_probe` gets them without running the model: ONNX shape
inference with data propagation on inputs fixed to a tiny size (batch 1, a short sequence), then the integer tensors
the rules read are computed from the inferred shapes (every ``Shape`` node replaced by its inferred value) on a
PyTorch evaluation of only the nodes they need — no weight is read. When a shape stays unknown, or a needed integer
depends on activation values, :func:`probe` runs the model once in onnxruntime with every intermediate tensor
exposed (which also proves that it executes). Rewrite: none.
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


#: (op type, input index) pairs whose integer values the analysis rules read.
_VALUE_INPUTS = {("Slice", 1), ("Slice", 2), ("Slice", 3), ("Slice", 4), ("Gather", 1), ("Split", 1)} | {
    (op, 1) for op in ("ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL1", "ReduceL2", "ReduceMax", "ReduceMin",
                       "ReduceProd", "ReduceLogSum", "ReduceLogSumExp")}


def static_probe(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> Probe | None:
    """Shapes and small integer values without running the model, or ``None`` when static inference is not enough."""
    from permsparse.passes.shapes import static_shapes

    shapes = static_shapes(model, {k: tuple(np.shape(v)) for k, v in feeds.items()})
    consts = {t.name for t in model.graph.initializer} | {o for n in model.graph.node if n.op_type == "Constant"
                                                           for o in n.output}
    missing = [o for n in model.graph.node for o in n.output if o and o not in shapes and o not in consts]
    if missing:
        log.info("static shapes: %d tensors unknown (e.g. %s); probing with onnxruntime", len(missing), missing[0])
        return None
    needed = sorted({n.input[i] for n in model.graph.node for (op, i) in _VALUE_INPUTS
                     if n.op_type == op and len(n.input) > i and n.input[i] and n.input[i] not in consts
                     and not (op == "Gather" and n.input[0] in consts)})  # a table lookup needs no index values
    values: dict[str, np.ndarray] = {}
    if needed:
        computed = _fold_integers(model, shapes, needed, feeds)
        if computed is None:
            return None
        values = {k: v for k, v in computed.items() if np.issubdtype(v.dtype, np.integer) and v.size <= 4096}
    for name, arr in feeds.items():
        shapes[name] = tuple(np.shape(arr))
    return Probe(shapes=shapes, values=values, feeds=dict(feeds), method="static shape inference")


def _fold_integers(model: onnx.ModelProto, shapes: Mapping[str, tuple[int, ...]], needed: list[str],
                   feeds: Mapping[str, np.ndarray]):
    """Values of ``needed`` computed from constants, inferred shapes (``Shape`` nodes become constants) and the probe
    feeds; ``None`` if that would need a weight product (a value that depends on activations)."""
    from onnx import helper as h

    from permsparse.errors import PermsparseError

    m = onnx.ModelProto()
    m.CopyFrom(model)
    nodes = []
    for node in m.graph.node:
        if node.op_type == "Shape" and node.input and node.input[0] in shapes:
            dims = np.asarray(shapes[node.input[0]], dtype=np.int64)
            attrs = {a.name: a.i for a in node.attribute}
            start, end = attrs.get("start", 0), attrs.get("end", None)
            value = dims[start:end] if end is not None else dims[start:]
            nodes.append(h.make_node("Constant", [], list(node.output), name=node.name,
                                     value=onnx.numpy_helper.from_array(value)))
        else:
            nodes.append(node)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    try:
        import torch

        from permsparse.torchgraph import GraphProgram

        prog = GraphProgram.from_model(m, inputs=list(feeds), outputs=needed)
        heavy = {"MatMul", "Gemm", "Conv", "Einsum"} & set(prog.op_types)
        if heavy:
            log.info("static probe: needed integers depend on %s results; probing with onnxruntime", sorted(heavy))
            return None
        with torch.no_grad():
            out = prog.run(dict(feeds))
    except PermsparseError as exc:  # a needed integer depends on activation values
        log.info("static probe: %s; probing with onnxruntime", str(exc).splitlines()[0][:200])
        return None
    return {k: v.detach().cpu().numpy() for k, v in out.items()}

"""The graph-editing view of a model (onnx-graphsurgeon): constants, lazily read weights, weight chains.

Weights kept in external data stay on disk: :func:`import_graph` wraps them in :class:`ExternalValues`, which maps
the data file read-only on each access, so passes can touch one weight at a time on a model bigger than memory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto
from onnx_graphsurgeon.ir.tensor import LazyValues

from permsparse.ir.external import read_external, uses_external_data

# onnx-graphsurgeon warns on every bfloat16 constant that numpy has no such type and that reading it "casts" it; it
# does not: its values come back as ml_dtypes.bfloat16 (onnx's own numpy type) and are written back as BFLOAT16.
gs.logger.G_LOGGER.severity = max(gs.logger.G_LOGGER.severity, gs.logger.G_LOGGER.ERROR)

#: Ops a weight may be read through on its way to MatMul's B input. Each must keep the matrix's axes identifiable.
WEIGHT_CHAIN_OPS = ("Transpose", "Cast", "Identity")


@dataclass(frozen=True)
class ConstRef:
    """A constant tensor of the graph: an initializer (``gs.Constant``) or the value of a ``Constant`` node."""

    name: str
    tensor: gs.Constant
    node: gs.Node | None = None  # the Constant node whose attribute holds the value, if any

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.tensor.shape)

    @property
    def values(self) -> np.ndarray:
        """The constant's values. Lazily stored weights are read on each access and not kept in memory."""
        raw = self.tensor._values
        if isinstance(raw, LazyValues):
            return np.asarray(raw.load())
        return np.asarray(raw)

    def set_values(self, values: np.ndarray) -> None:
        self.tensor.values = np.ascontiguousarray(values)


class ExternalValues(LazyValues):
    """Values of a tensor stored in an external data file, read from disk on each ``load()``.

    The wrapped ``TensorProto`` names its data file by absolute path, so graphs can mix weights from the input's data
    file and from permsparse's temporary files; :func:`permsparse.onnxio.save_model` copies them into the output.
    """

    def __init__(self, tensor: TensorProto, base_dir: str | os.PathLike[str]):
        proto = TensorProto()
        proto.CopyFrom(tensor)
        for entry in proto.external_data:
            if entry.key == "location" and not os.path.isabs(entry.value):
                entry.value = os.path.join(os.path.abspath(base_dir), entry.value)
        super().__init__(proto)

    def load(self) -> np.ndarray:
        return read_external(self.tensor, None)


def import_graph(model: onnx.ModelProto, base_dir: str | os.PathLike[str] | None = None) -> gs.Graph:
    """``gs.import_onnx`` that keeps externally stored weights on disk until they are used (see ExternalValues)."""
    graph = gs.import_onnx(model)
    if base_dir is not None and uses_external_data(model):
        for t in graph.tensors().values():
            if isinstance(t, gs.Constant) and isinstance(t._values, LazyValues):
                proto = t._values.tensor
                if proto.data_location == TensorProto.EXTERNAL:
                    t._values = ExternalValues(proto, base_dir)
    return graph


def export_graph(graph: gs.Graph, source: onnx.ModelProto | None = None) -> onnx.ModelProto:
    """``gs.export_onnx(graph)`` keeping what onnx-graphsurgeon drops: each node's ``metadata_props`` (a dynamo
    export's module scopes, which name its layers ``encoder.layer.3.attention...`` instead of ``node_MatMul_94``) and
    ``doc_string``, copied from ``source``'s node of the same name, and the model's own ``metadata_props``.
    Invariant: only annotations are copied; the graph computes the same function as ``gs.export_onnx`` gives."""
    model = gs.export_onnx(graph)
    if source is None:
        return model
    by_name = {n.name: n for n in source.graph.node if n.name and (len(n.metadata_props) or n.doc_string)}
    for node in model.graph.node:
        src = by_name.get(node.name)
        if src is not None and src.op_type == node.op_type:
            if not len(node.metadata_props):
                node.metadata_props.extend(src.metadata_props)
            node.doc_string = node.doc_string or src.doc_string
    have = {p.key for p in model.metadata_props}
    model.metadata_props.extend(p for p in source.metadata_props if p.key not in have)
    return model


def const_of(t: gs.Tensor) -> ConstRef | None:
    """The constant behind tensor ``t``, or ``None`` if it is computed at run time."""
    if isinstance(t, gs.Constant):
        return ConstRef(t.name, t)
    if len(t.inputs) == 1 and t.inputs[0].op == "Constant":
        node = t.inputs[0]
        value = node.attrs.get("value")
        if isinstance(value, gs.Constant):
            return ConstRef(t.name, value, node)
    return None


@dataclass(frozen=True)
class WeightChain:
    """How a MatMul/Gemm reads a constant weight: the stored constant and which of its axes is K and N."""

    const: ConstRef
    k_axis: int
    n_axis: int
    via: tuple[str, ...]  # op types of the chain, outermost first


def resolve_weight(t: gs.Tensor, *, trans: bool = False) -> WeightChain | None:
    """Follow ``t`` back through Transpose/Cast/Identity to a 2-D constant. ``trans``: B is read as ``[N, K]``."""
    axes = [1, 0] if trans else [0, 1]  # axes[0]: stored axis playing K, axes[1]: N
    via: list[str] = []
    cur = t
    while True:
        ref = const_of(cur)
        if ref is not None:
            if len(ref.shape) != 2:
                return None
            return WeightChain(ref, axes[0], axes[1], tuple(via))
        if len(cur.inputs) != 1:
            return None
        node = cur.inputs[0]
        if node.op not in WEIGHT_CHAIN_OPS or len(cur.outputs) != 1:
            return None  # computed at run time, or read by something else as well
        if node.op == "Transpose":
            perm = list(node.attrs.get("perm", [1, 0]))
            if perm != [1, 0]:
                return None
            axes = [perm[axes[0]], perm[axes[1]]]
        via.append(node.op)
        cur = node.inputs[0]


def const_index(graph: gs.Graph) -> dict[str, ConstRef]:
    """Every constant read by a node, by name."""
    index: dict[str, ConstRef] = {}
    for node in graph.nodes:
        for t in node.inputs:
            ref = const_of(t)
            if ref is not None:
                index[ref.name] = ref
    return index


def opset_of(graph: gs.Graph) -> int:
    return int(graph.opset or 0)

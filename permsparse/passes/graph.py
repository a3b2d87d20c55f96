"""Small helpers over an onnx-graphsurgeon graph: constants (initializers and Constant nodes) and weight chains."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

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
        return np.asarray(self.tensor.values)

    def set_values(self, values: np.ndarray) -> None:
        self.tensor.values = np.ascontiguousarray(values)


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


def opset_of(graph: gs.Graph) -> int:
    return int(graph.opset or 0)

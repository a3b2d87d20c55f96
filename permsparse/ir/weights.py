"""Weights: every constant 2-D matrix a MatMul/Gemm reads as its B operand — the one weight record of permsparse.

A weight is found by following MatMul/Gemm's B input back through Transpose/Cast/Identity to a constant
(:func:`permsparse.ir.graph.resolve_weight`); its reduction axis K is axis 0 of a ``MatMul`` weight ``[K, N]``,
axis 1 of a ``Gemm transB=1`` weight or of a transposed constant. :func:`find_weights` is read-only; the analysis
decides which weights are prunable and records why not. :func:`display_name` gives a layer name a user recognizes
(``model.layers.3.mlp.down_proj``) from the weight's or the node's name when the export kept one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from permsparse.ir.graph import resolve_weight
from permsparse.pattern import check_nm

#: TensorRT seldom picks a sparse tactic for a GEMM with fewer channels than this on either side.
MIN_SPARSE_CHANNELS = 256


@dataclass(frozen=True)
class WeightInfo:
    """A MatMul/Gemm reading a constant 2-D weight.

    ``name`` is the MatMul/Gemm node (TensorRT keeps ONNX node names as layer names), ``const`` the stored constant,
    ``k_axis`` the axis of the stored constant that is K, ``input`` the activation read as A. ``prunable``/``reason``
    and ``head`` are set by the analysis.
    """

    name: str
    op: str
    const: str
    stored_shape: tuple[int, ...]
    k_axis: int
    k: int
    n: int
    input: str
    output: str
    via: tuple[str, ...]
    dtype: str
    label: str
    prunable: bool = True
    reason: str | None = None
    head: bool = False

    @property
    def transposed(self) -> bool:
        """Stored ``[N, K]`` (Gemm transB=1 or a transposed constant)."""
        return self.k_axis == 1

    def k_major(self, stored: np.ndarray) -> np.ndarray:
        """View of the stored weight as ``[K, N]``."""
        return stored if self.k_axis == 0 else stored.T

    def stored(self, k_major: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`k_major`."""
        return k_major if self.k_axis == 0 else k_major.T


def _node_label(node: gs.Node, index: int) -> str:
    return node.name or f"{node.op}_{index}"


_PATHLIKE = re.compile(r"^/?[A-Za-z_][\w.]*(/[\w.]+)+$")


def display_name(const: str, node: str) -> str:
    """A layer name a user recognizes: ``model.layers.3.mlp.down_proj`` from the constant's name
    (``model.layers.3.mlp.down_proj.weight``) or the node's path (``/model/layers.3/mlp/down_proj/MatMul``),
    else the node name."""
    if "." in const and not const.startswith("onnx::") and not const.startswith("val_"):
        name = re.sub(r"\.(weight|kernel|w)$", "", const)
        return name
    if _PATHLIKE.match(node):
        parts = [p for p in node.split("/") if p]
        if len(parts) > 1 and parts[-1].split("_")[0] in ("MatMul", "Gemm"):
            parts = parts[:-1]
        return ".".join(parts)
    return node


def _dtype_name(tensor: gs.Constant) -> str:
    """numpy-style name of a constant's type; onnx-graphsurgeon keeps types numpy lacks (bfloat16) as the ONNX
    enum, which is mapped back to its name here (issue 17: "weight dtype 16" for a bfloat16 model)."""
    from permsparse.ir.model import FLOAT_TYPES

    if isinstance(tensor.dtype, int) and tensor.dtype in FLOAT_TYPES:
        return FLOAT_TYPES[tensor.dtype]
    try:
        return str(np.dtype(tensor.dtype))
    except TypeError:
        return str(tensor.dtype)


def node_scopes(model) -> dict[str, str]:
    """Module path of each node of a torch dynamo export (its ``pkg.torch.onnx.name_scopes`` metadata), by node name."""
    import ast

    scopes: dict[str, str] = {}
    for node in model.graph.node:
        props = {p.key: p.value for p in node.metadata_props}
        if not node.name or "pkg.torch.onnx.name_scopes" not in props:
            continue
        try:
            names = ast.literal_eval(props["pkg.torch.onnx.name_scopes"])
            classes = ast.literal_eval(props.get("pkg.torch.onnx.class_hierarchy", "[]"))
        except (ValueError, SyntaxError):
            continue
        modules = [n for n, c in zip(names, classes) if n and not str(c).startswith("aten.")] if classes else \
            [n for n in names if "." in n]
        if modules:
            scopes[node.name] = re.sub(r"^(model\.)+", "", str(modules[-1]))
    return scopes


def find_weights(graph: gs.Graph, scopes: dict[str, str] | None = None) -> list[WeightInfo]:
    """Every MatMul/Gemm of ``graph`` whose B operand resolves to a constant 2-D matrix, in graph order.

    ``scopes`` (from :func:`node_scopes`) gives layer names of dynamo exports, whose weight names carry none."""
    found = []
    for index, node in enumerate(graph.nodes):
        if node.op not in ("MatMul", "Gemm") or len(node.inputs) < 2:
            continue
        if node.op == "Gemm" and int(node.attrs.get("transA", 0)):
            continue
        chain = resolve_weight(node.inputs[1], trans=node.op == "Gemm" and bool(int(node.attrs.get("transB", 0))))
        if chain is None:
            continue
        name = _node_label(node, index)
        tensor = chain.const.tensor
        dtype = _dtype_name(tensor)
        found.append(WeightInfo(
            name=name,
            op=node.op,
            const=chain.const.name,
            stored_shape=chain.const.shape,
            k_axis=chain.k_axis,
            k=chain.const.shape[chain.k_axis],
            n=chain.const.shape[chain.n_axis],
            input=node.inputs[0].name,
            output=node.outputs[0].name,
            via=chain.via,
            dtype=dtype,
            label=(scopes or {}).get(name) or display_name(chain.const.name, name),
        ))
    return found


@dataclass(frozen=True)
class WeightStatus:
    """What the stored values of a weight say: N:M validity and density (read by inspect, build and bench)."""

    weight: WeightInfo
    nm_valid: bool
    density: float

    def sparse_obstacle(self, min_channels: int = MIN_SPARSE_CHANNELS, m: int = 4) -> str | None:
        """Why TensorRT would not use sparse math for this weight, or None if it is a candidate."""
        w = self.weight
        if w.k % m:
            return f"K={w.k} is not a multiple of {m}"
        if not self.nm_valid:
            return f"weights are not 2:4 along K (density {self.density:.0%})"
        if min(w.k, w.n) < min_channels:
            return f"channels {w.k}x{w.n} < {min_channels}: sparse kernels rarely win there"
        return None


def weight_status(w: WeightInfo, stored: np.ndarray, n: int = 2, m: int = 4) -> WeightStatus:
    values = np.asarray(stored)
    return WeightStatus(w, check_nm(values, w.k_axis, n, m), float(np.count_nonzero(values)) / max(1, values.size))


def model_weight_status(model, base_dir, n: int = 2, m: int = 4) -> list[WeightStatus]:
    """N:M status of every weight of an ONNX model (weights read memory-mapped, one at a time)."""
    from permsparse.ir.graph import const_index, import_graph

    graph = import_graph(model, base_dir)
    consts = const_index(graph)
    return [weight_status(w, consts[w.const].values, n, m) for w in find_weights(graph, node_scopes(model))]

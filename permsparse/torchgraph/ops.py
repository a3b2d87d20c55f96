"""The op table of the torch evaluator: ONNX op type -> builder of a torch callable.

:data:`OPS` is filled by the op modules (``ops_elementwise``, ``ops_tensor``, ``ops_nn``) at import.
:func:`resolve` turns one ``onnx.NodeProto`` into its ready-to-call function, doing all attribute parsing up front.

Invariant: :func:`resolve` either returns a callable implementing the node's ONNX semantics (see each op module's
invariant) or raises :class:`~permsparse.errors.PermsparseError` naming the node and the op; it never returns a
partial implementation (unsupported attribute values raise at resolve time, not at run time, where possible).
"""

from __future__ import annotations

import logging
from typing import Any

import onnx
import torch

from permsparse.errors import PermsparseError
from permsparse.torchgraph import ops_elementwise, ops_nn, ops_tensor  # noqa: F401  (registers the ops)
from permsparse.torchgraph.registry import (
    CONTROL_FLOW,
    DOMAINS,
    OPS,
    Node,
    OpFunction,
    OpSpec,
    parse_attributes,
)

log = logging.getLogger(__name__)

__all__ = ["OPS", "resolve", "supported_ops", "unsupported_ops"]


def supported_ops() -> list[str]:
    """The ONNX op types the evaluator implements (``Constant`` is read as a constant, not run)."""
    return sorted([*OPS, "Constant"])


def unsupported_ops(model_or_nodes: Any) -> set[str]:
    """The op types among ``model_or_nodes`` the evaluator cannot run (control flow, ops outside the table, other
    domains). Accepts an ``onnx.ModelProto``, a path to one, an ``onnx_graphsurgeon`` graph, or an iterable of
    ``onnx.NodeProto`` / graphsurgeon nodes. Resize/Upsample nodes count as supported only in the forms
    :func:`resolve` accepts (their attributes are checked)."""
    import os

    if isinstance(model_or_nodes, (str, os.PathLike)):
        model_or_nodes = onnx.load(str(model_or_nodes), load_external_data=False)
    if isinstance(model_or_nodes, onnx.ModelProto):
        model_or_nodes = model_or_nodes.graph.node
    elif hasattr(model_or_nodes, "nodes") and not isinstance(model_or_nodes, (list, tuple)):
        model_or_nodes = model_or_nodes.nodes
    missing: set[str] = set()
    for n in model_or_nodes:
        if isinstance(n, onnx.NodeProto):
            op, domain, attrs = n.op_type, n.domain, None
        else:  # onnx_graphsurgeon node
            op, domain, attrs = n.op, getattr(n, "domain", "") or "", n.attrs
        if op == "Constant" and domain in ("", "ai.onnx"):
            continue
        if op in CONTROL_FLOW or domain not in DOMAINS or op not in OPS:
            missing.add(op if domain in ("", "ai.onnx") else f"{domain}.{op}")
            continue
        if op in ("Resize", "Upsample"):
            if attrs is None:
                attrs = parse_attributes(n)
            parsed = Node(op_type=op, name="", attrs=dict(attrs), inputs=(), outputs=(), opset=18)
            try:
                OPS[op].build(parsed)
            except PermsparseError:
                missing.add(op)
    return missing


def resolve(
    node: onnx.NodeProto, *, opset: int, upcast: bool = False, device: torch.device | None = None
) -> tuple[OpFunction, OpSpec, Node]:
    """The callable for ``node`` plus its spec (shape-like inputs) and the parsed :class:`Node`."""
    label = node.name or (node.output[0] if node.output else "?")
    if node.op_type in CONTROL_FLOW:
        raise PermsparseError(
            f"torchgraph: node {label!r} is a {node.op_type} (control flow); the torch evaluator runs straight-line "
            "graphs only. Export without data-dependent control flow, or cut the block so it does not contain it."
        )
    spec = OPS.get(node.op_type) if node.domain in DOMAINS else None
    if spec is None:
        domain = f" (domain {node.domain!r})" if node.domain not in ("", "ai.onnx") else ""
        raise PermsparseError(
            f"torchgraph: op {node.op_type}{domain} of node {label!r} is not supported by the torch evaluator. "
            "Add it to permsparse/torchgraph (a builder registered with @register), or cut the block so it excludes "
            f"this node. Supported: {', '.join(supported_ops())}."
        )
    parsed = Node(
        op_type=node.op_type,
        name=label,
        attrs=parse_attributes(node),
        inputs=tuple(node.input),
        outputs=tuple(node.output),
        opset=opset,
        upcast=upcast,
        device=device or torch.device("cpu"),
    )
    return spec.build(parsed), spec, parsed

"""The op table of the torch evaluator: ONNX op type -> builder of a torch callable.

:data:`OPS` is filled by the op modules (``ops_elementwise``, ``ops_tensor``, ``ops_nn``) at import.
:func:`resolve` turns one ``onnx.NodeProto`` into its ready-to-call function, doing all attribute parsing up front.

Invariant: :func:`resolve` either returns a callable implementing the node's ONNX semantics (see each op module's
invariant) or raises :class:`~permsparse.errors.PermsparseError` naming the node and the op; it never returns a
partial implementation (unsupported attribute values raise at resolve time, not at run time, where possible).
"""

from __future__ import annotations

import logging

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

__all__ = ["OPS", "resolve", "supported_ops"]


def supported_ops() -> list[str]:
    """The ONNX op types the evaluator implements (``Constant`` is read as a constant, not run)."""
    return sorted([*OPS, "Constant"])


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

"""The op registry of :mod:`permsparse.torchgraph`: ONNX node -> torch callable, resolved once per node.

Every op module registers *builders* with :func:`register`. A builder receives a :class:`Node` (the op type, its
parsed attributes, how many inputs/outputs it has, the opset, and the evaluator's upcast/device settings) and returns
a plain callable ``fn(*inputs)``: missing optional inputs arrive as ``None``; it returns one tensor for a
single-output node, else a tuple with one entry per output. All attribute parsing happens in the builder, so the
evaluator's loop only calls ``fn``.

Invariant (what makes the evaluator faithful): a builder's callable computes the ONNX operator's output for the
given inputs in the inputs' own dtype (ONNX guarantees equal dtypes where the op requires them), using only
out-of-place, differentiable torch functions; integer tensors that describe shapes (``shape_inputs``) are read with
``tolist()`` and never enter autograd. Under ``upcast`` the only dtype-producing places (constants, feeds, Cast,
CastLike, ConstantOfShape, Range) map float16/bfloat16 to float32, so a graph stays dtype-consistent.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from permsparse.errors import PermsparseError

log = logging.getLogger(__name__)

OpFunction = Callable[..., Any]
Builder = Callable[["Node"], OpFunction]

#: ONNX element type -> torch dtype (the types our exports use; others raise a clear error).
ONNX_TO_TORCH: dict[int, torch.dtype] = {
    TensorProto.FLOAT: torch.float32,
    TensorProto.FLOAT16: torch.float16,
    TensorProto.BFLOAT16: torch.bfloat16,
    TensorProto.DOUBLE: torch.float64,
    TensorProto.INT8: torch.int8,
    TensorProto.INT16: torch.int16,
    TensorProto.INT32: torch.int32,
    TensorProto.INT64: torch.int64,
    TensorProto.UINT8: torch.uint8,
    TensorProto.UINT16: torch.uint16,
    TensorProto.UINT32: torch.uint32,
    TensorProto.UINT64: torch.uint64,
    TensorProto.BOOL: torch.bool,
}
LOW_PRECISION = (torch.float16, torch.bfloat16)
CONTROL_FLOW = frozenset({"If", "Loop", "Scan", "SequenceMap"})
#: Domains whose ops are looked up in the table (ONNX's own, and ORT's contrib domain for a few norms).
DOMAINS = ("", "ai.onnx", "com.microsoft")


@dataclass(frozen=True)
class Node:
    """What a builder needs to know about one ONNX node."""

    op_type: str
    name: str
    attrs: Mapping[str, Any]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    opset: int
    upcast: bool = False
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def n_outputs(self) -> int:
        return len(self.outputs)

    def has_input(self, i: int) -> bool:
        return len(self.inputs) > i and bool(self.inputs[i])

    def wants_output(self, i: int) -> bool:
        return len(self.outputs) > i and bool(self.outputs[i])

    def fail(self, why: str) -> PermsparseError:
        """A user-facing error about this node (returned, for ``raise node.fail(...)``)."""
        return PermsparseError(f"torchgraph: node {self.name!r} ({self.op_type}): {why}")


@dataclass(frozen=True)
class OpSpec:
    """A registered op: its builder and which input positions are shape-like (Python ints, kept on the CPU)."""

    build: Builder
    shape_inputs: frozenset[int]


OPS: dict[str, OpSpec] = {}


def register(*op_types: str, shape_inputs: Iterable[int] = ()) -> Callable[[Builder], Builder]:
    """Decorator: register ``builder`` for every name in ``op_types``."""

    def deco(builder: Builder) -> Builder:
        for op in op_types:
            if op in OPS:
                raise RuntimeError(f"torchgraph op {op} registered twice")
            OPS[op] = OpSpec(builder, frozenset(shape_inputs))
        return builder

    return deco


def parse_attributes(node: onnx.NodeProto) -> dict[str, Any]:
    """Attributes as Python values: ints/floats/lists as such, strings decoded, tensors as numpy arrays."""
    out: dict[str, Any] = {}
    for attr in node.attribute:
        if attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
            out[attr.name] = attr  # control flow: rejected by the program with a clear message
            continue
        value = helper.get_attribute_value(attr)
        if isinstance(value, bytes):
            value = value.decode()
        elif isinstance(value, onnx.TensorProto):
            value = numpy_helper.to_array(value)
        elif isinstance(value, list) and value and isinstance(value[0], bytes):
            value = [v.decode() for v in value]
        out[attr.name] = value
    return out


def torch_dtype(onnx_type: int, upcast: bool, node: Node | None = None) -> torch.dtype:
    """The torch dtype for an ONNX element type; float16/bfloat16 become float32 under ``upcast``."""
    try:
        dt = ONNX_TO_TORCH[onnx_type]
    except KeyError:
        name = TensorProto.DataType.Name(onnx_type) if onnx_type in TensorProto.DataType.values() else onnx_type
        msg = f"element type {name} is not supported by the torch evaluator"
        raise (node.fail(msg) if node else PermsparseError(f"torchgraph: {msg}")) from None
    return torch.float32 if upcast and dt in LOW_PRECISION else dt


def to_torch(array: np.ndarray | torch.Tensor, *, upcast: bool, device: torch.device) -> torch.Tensor:
    """A numpy array (or tensor) as a torch tensor: floats on ``device`` (float32 if ``upcast`` and 16-bit),
    integers and booleans on the CPU. Never shares memory with a read-only numpy array."""
    if isinstance(array, torch.Tensor):
        t = array
    else:
        a = np.asarray(array)
        if a.dtype.name == "bfloat16":  # ml_dtypes' bfloat16, as onnx's numpy_helper returns it
            t = torch.from_numpy(np.ascontiguousarray(a).view(np.uint16).copy()).view(torch.bfloat16)
        elif a.dtype.kind in "OSU":
            raise PermsparseError(f"torchgraph: {a.dtype} tensors (strings/objects) are not supported")
        else:
            t = torch.from_numpy(a.copy() if not a.flags.writeable or not a.flags.c_contiguous else a)
    if t.is_floating_point():
        if upcast and t.dtype in LOW_PRECISION:
            t = t.float()
        if t.device != device:
            t = t.to(device)
    return t


def constant_node_value(node: onnx.NodeProto) -> np.ndarray:
    """The value of an ONNX ``Constant`` node as a numpy array."""
    for attr in node.attribute:
        if attr.name == "value":
            return numpy_helper.to_array(attr.t)
        if attr.name == "value_float":
            return np.array(attr.f, dtype=np.float32)
        if attr.name == "value_floats":
            return np.array(list(attr.floats), dtype=np.float32)
        if attr.name == "value_int":
            return np.array(attr.i, dtype=np.int64)
        if attr.name == "value_ints":
            return np.array(list(attr.ints), dtype=np.int64)
    kinds = [a.name for a in node.attribute]
    raise PermsparseError(
        f"torchgraph: Constant node {node.name!r} holds {kinds}; only numeric value/value_float(s)/value_int(s) "
        "constants are supported (sparse and string constants are not)."
    )

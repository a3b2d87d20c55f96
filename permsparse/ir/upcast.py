"""An fp32 copy of an fp16/bf16 model, for checks: same function, computed without 16-bit rounding.

Rewrite (on a copy): every float16/bfloat16 initializer, Constant value and ConstantOfShape value becomes float32
(exactly: every 16-bit float is a float32); ``Cast(to=float16|bfloat16)`` becomes ``Cast(to=float)``; graph inputs,
outputs and value infos of 16-bit float type become float32. Invariant: the copy computes the real-number function of
the original with float32 rounding instead of 16-bit rounding, so two 16-bit models that differ only by an exact
permutation of their weights give float32 outputs equal up to float32 summation-order noise — which is what the fold
check needs to prove (comparing the fp16 runs would drown an exact fold in fp16 rounding).
"""

from __future__ import annotations

import os

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

_HALF = {TensorProto.FLOAT16, TensorProto.BFLOAT16}


def is_half_model(model: onnx.ModelProto) -> bool:
    return any(t.data_type in _HALF for t in model.graph.initializer) or any(
        vi.type.tensor_type.elem_type in _HALF for vi in list(model.graph.input) + list(model.graph.output))


def _to_fp32(t: TensorProto, base_dir: str | os.PathLike[str] | None) -> TensorProto:
    from permsparse.ir.model import weight_values

    arr = np.asarray(weight_values(t, base_dir)).astype(np.float32)
    return numpy_helper.from_array(arr, t.name)


def upcast_model(model: onnx.ModelProto, base_dir: str | os.PathLike[str] | None = None) -> onnx.ModelProto:
    """A float32 copy of ``model`` (weights read from ``base_dir`` when external); the input is not modified."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    for i, t in enumerate(g.initializer):
        if t.data_type in _HALF:
            g.initializer[i].CopyFrom(_to_fp32(t, base_dir))
    for node in g.node:
        for attr in node.attribute:
            if node.op_type == "Cast" and attr.name == "to" and attr.i in _HALF:
                attr.i = TensorProto.FLOAT
            elif attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type in _HALF:
                attr.t.CopyFrom(_to_fp32(attr.t, base_dir))
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        if vi.type.tensor_type.elem_type in _HALF:
            vi.type.tensor_type.elem_type = TensorProto.FLOAT
    return out


def upcast_feeds(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Feeds with 16-bit float arrays widened to float32 (what the upcast copy takes)."""
    return {k: (np.asarray(v).astype(np.float32) if np.asarray(v).dtype in (np.float16,) or
                str(np.asarray(v).dtype) == "bfloat16" else v) for k, v in feeds.items()}

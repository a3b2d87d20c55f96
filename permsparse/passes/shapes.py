"""Static shapes: shape inference on inputs fixed to concrete sizes, without running the model.

Read-only. onnxruntime's symbolic shape inference (it resolves Range, Slice and Reshape targets computed from shapes,
which ONNX's own inference leaves unknown in torch exports), falling back to ONNX shape inference with data
propagation. Works on a copy of the graph whose weights (large tensors, and every float tensor kept in external data)
are turned into graph inputs of the same type and shape: no weight byte is read, not even the data file is needed, so
it costs little memory and time even for a 7B model. Tensors whose shape stays unknown are absent from the result; callers that
need every shape (the analysis) fall back to the onnxruntime probe (:mod:`permsparse.passes.probe`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import onnx

from permsparse.ir.model import FLOAT_TYPES

log = logging.getLogger(__name__)


def _dims_only(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose weights (large tensors, and float tensors kept in external data) are graph inputs of
    the same type and shape: shape inference sees their dims and never reads their bytes."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    keep, as_inputs = [], []
    for init in m.graph.initializer:
        floating = init.data_type in FLOAT_TYPES or init.data_type == onnx.TensorProto.DOUBLE
        external = init.data_location == onnx.TensorProto.EXTERNAL
        large = len(init.dims) >= 2 and np.prod(list(init.dims), dtype=np.int64) > 4096
        if large or (floating and external):
            as_inputs.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
        else:
            keep.append(init)
    del m.graph.initializer[:]
    m.graph.initializer.extend(keep)
    known = {i.name for i in m.graph.input}
    m.graph.input.extend(v for v in as_inputs if v.name not in known)
    return m


def static_shapes(model: onnx.ModelProto, input_shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Concrete shape of every tensor ONNX shape inference can resolve with the inputs fixed to ``input_shapes``."""
    m = _dims_only(model)
    for vi in m.graph.input:
        if vi.name in input_shapes:
            dims = vi.type.tensor_type.shape.dim
            for d, v in zip(dims, input_shapes[vi.name]):
                d.Clear()
                d.dim_value = int(v)
    inferred = None
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        inferred = SymbolicShapeInference.infer_shapes(m, auto_merge=True, guess_output_rank=False)
    except Exception as exc:  # the tool raises many types on graphs it does not know
        log.info("symbolic shape inference failed (%s); trying ONNX shape inference", str(exc)[:200])
    if inferred is None:
        try:
            inferred = onnx.shape_inference.infer_shapes(m, data_prop=True)
        except Exception as exc:  # onnx raises InferenceError and others
            log.info("static shape inference failed: %s", exc)
            return {}
    out: dict[str, tuple[int, ...]] = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        tt = vi.type.tensor_type
        if not tt.HasField("shape"):
            continue
        dims = tt.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            out[vi.name] = tuple(int(d.dim_value) for d in dims)
    for init in model.graph.initializer:
        out[init.name] = tuple(int(d) for d in init.dims)
    return out


def token_counts(model: onnx.ModelProto, input_shapes: Mapping[str, tuple[int, ...]]) -> dict[str, int]:
    """Tokens (product of all but the last dim) of every tensor with a static shape at ``input_shapes``."""
    return {name: int(np.prod(s[:-1], dtype=np.int64)) if len(s) > 1 else 1
            for name, s in static_shapes(model, input_shapes).items()}

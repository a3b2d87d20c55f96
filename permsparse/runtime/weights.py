"""The prunable MatMul/Gemm weights of an ONNX model, as the runtime sees them (shape, 2:4 status, token count).

Independent of ``permsparse.passes`` on purpose: ``build`` and ``bench`` must work on any ONNX file, and a second
2:4 checker keeps the optimizer honest. K runs down axis 0 of a MatMul weight ``[K, N]`` and axis 1 of a Gemm weight
with ``transB=1`` (``[N, K]``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

logger = logging.getLogger(__name__)

# TensorRT seldom picks a sparse tactic for a GEMM with fewer channels than this on either side.
MIN_SPARSE_CHANNELS = 256


@dataclass(frozen=True)
class WeightInfo:
    """One constant weight read as the B operand of MatMul/Gemm.

    Attributes:
        node: the MatMul/Gemm node name (TensorRT keeps ONNX node names as layer names).
        weight: the initializer (or Constant output) name.
        op: "MatMul" or "Gemm".
        k: reduction size; n: output channels.
        transposed: True if stored ``[N, K]`` (Gemm transB=1).
        is_2to4: every group of 4 consecutive K elements has at most 2 non-zeros.
        density: share of non-zero elements.
        dtype: numpy dtype name of the stored weight.
        a_input: the activation tensor name (A operand).
    """

    node: str
    weight: str
    op: str
    k: int
    n: int
    transposed: bool
    is_2to4: bool
    density: float
    dtype: str
    a_input: str

    def sparse_obstacle(self, min_channels: int = MIN_SPARSE_CHANNELS) -> str | None:
        """Why TensorRT would not use sparse math for this weight, or None if it is a candidate."""
        if self.k % 4:
            return f"K={self.k} is not a multiple of 4"
        if not self.is_2to4:
            return f"weights are not 2:4 along K (density {self.density:.0%})"
        if min(self.k, self.n) < min_channels:
            return f"channels {self.k}x{self.n} < {min_channels}: sparse kernels rarely win there"
        return None


def is_2to4(w_kn: np.ndarray) -> bool:
    """True if ``w_kn`` ([K, N]) has at most 2 non-zeros in every group of 4 consecutive rows, per column."""
    k = w_kn.shape[0]
    if k % 4:
        return False
    nz = (w_kn.reshape(k // 4, 4, -1) != 0).sum(axis=1)
    return bool((nz <= 2).all())


def _initializer_arrays(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    out = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    out[node.output[0]] = a.t
    return out


def _to_float_array(t: onnx.TensorProto, base_dir: str | None) -> np.ndarray:
    if t.data_type == onnx.TensorProto.BFLOAT16 and t.raw_data:
        bits = np.frombuffer(t.raw_data, dtype=np.uint16).astype(np.uint32) << 16
        return bits.view(np.float32).reshape(tuple(t.dims))
    return numpy_helper.to_array(t, base_dir or "")


def iter_weights(
    model: onnx.ModelProto, base_dir: str | None = None, with_arrays: bool = False
) -> Iterator[tuple[WeightInfo, np.ndarray | None]]:
    """Yield (info, weight as [K, N] float array or None) for every MatMul/Gemm with a constant 2-D B operand."""
    consts = _initializer_arrays(model)
    for idx, node in enumerate(model.graph.node):
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2 or node.input[1] not in consts:
            continue
        t = consts[node.input[1]]
        if len(t.dims) != 2:
            continue
        trans_b = node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute)
        try:
            arr = _to_float_array(t, base_dir)
        except Exception as exc:  # external data missing, etc.
            logger.warning("cannot read weight %s: %s", node.input[1], exc)
            continue
        w_kn = arr.T if trans_b else arr
        k, n = int(w_kn.shape[0]), int(w_kn.shape[1])
        info = WeightInfo(
            node=node.name or f"{node.op_type}_{idx}",
            weight=node.input[1],
            op=node.op_type,
            k=k,
            n=n,
            transposed=trans_b,
            is_2to4=is_2to4(w_kn),
            density=float(np.count_nonzero(w_kn)) / max(1, w_kn.size),
            dtype=str(arr.dtype) if t.data_type != onnx.TensorProto.BFLOAT16 else "bfloat16",
            a_input=node.input[0],
        )
        yield info, (np.ascontiguousarray(w_kn) if with_arrays else None)


def prunable_weights(model: onnx.ModelProto, base_dir: str | None = None) -> list[WeightInfo]:
    return [info for info, _ in iter_weights(model, base_dir)]


def activation_tokens(model: onnx.ModelProto, input_shapes: Mapping[str, tuple[int, ...]]) -> dict[str, int]:
    """Tokens (product of all but the last dim) of every MatMul A operand at the given concrete input shapes.

    Runs ONNX shape inference (with data propagation) on a copy of the graph with fixed input dims and no weights
    data needed. Tensors whose shape cannot be inferred are missing from the result.
    """
    m = onnx.ModelProto()
    m.CopyFrom(model)
    # Drop weights' bytes: shape inference needs only dims.
    for init in m.graph.initializer:
        dims = list(init.dims)
        if np.prod(dims, dtype=np.int64) > 64:
            init.ClearField("raw_data")
            init.ClearField("float_data")
            init.ClearField("int32_data")
            init.ClearField("int64_data")
            init.ClearField("double_data")
            del init.external_data[:]
            init.data_location = onnx.TensorProto.DEFAULT
    for vi in m.graph.input:
        if vi.name in input_shapes:
            shape = input_shapes[vi.name]
            dims = vi.type.tensor_type.shape.dim
            for d, v in zip(dims, shape):
                d.Clear()
                d.dim_value = int(v)
    try:
        inferred = onnx.shape_inference.infer_shapes(m, data_prop=True)
    except Exception as exc:
        logger.info("shape inference failed: %s", exc)
        return {}
    out: dict[str, int] = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if not dims or not all(d.HasField("dim_value") for d in dims):
            continue
        vals = [int(d.dim_value) for d in dims]
        out[vi.name] = int(np.prod(vals[:-1], dtype=np.int64)) if len(vals) > 1 else 1
    return out

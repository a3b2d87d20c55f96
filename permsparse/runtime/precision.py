"""Precision conversion of an ONNX model: fp32 → fp16 or bf16 with numerically sensitive ops kept in fp32.

Strongly typed TensorRT (TensorRT 11, TensorRT-RTX) takes its precision from the ONNX, so an fp16/bf16 engine needs an
fp16/bf16 ONNX. fp16 uses onnxconverter-common's float16 converter. bf16 runs the same converter (to place the casts)
and then retypes every fp16 tensor to bf16, re-rounding initializers from the original fp32 values (bf16 has fp32's
range, so nothing is clamped).
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from permsparse.errors import PermsparseError
from permsparse.ir.model import load_model
from permsparse.ir.save import save_model
from permsparse.runtime.choices import PRECISIONS

logger = logging.getLogger(__name__)


# Ops whose fp16 arithmetic loses too much (normalization statistics, sums of squares, exponentials' normalizer).
DEFAULT_KEEP_FP32_OPS: tuple[str, ...] = (
    "LayerNormalization",
    "SimplifiedLayerNormalization",
    "SkipLayerNormalization",
    "RMSNormalization",
    "GroupNormalization",
    "InstanceNormalization",
    "Softmax",
    "LogSoftmax",
    "ReduceMean",
    "ReduceSum",
    "ReduceSumSquare",
    "ReduceL2",
    "ReduceLogSumExp",
    "Pow",
    "Sqrt",
    "Reciprocal",
)


def onnx_elem_type(precision: str) -> int:
    return {"fp32": TensorProto.FLOAT, "fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}[precision]


def model_float_type(model: onnx.ModelProto) -> str:
    """'fp16'/'bf16' if the model's MatMul/Gemm weights are stored in that type, else 'fp32'."""
    inits = {i.name: i.data_type for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type in ("MatMul", "Gemm") and len(node.input) > 1 and node.input[1] in inits:
            t = inits[node.input[1]]
            if t == TensorProto.FLOAT16:
                return "fp16"
            if t == TensorProto.BFLOAT16:
                return "bf16"
            return "fp32"
    return "fp32"


def fp32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round fp32 values to bf16 (nearest even) and return the raw uint16 bits."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    nan = np.isnan(x)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    rounded[nan] = 0x7FC0
    return rounded


def _bf16_tensor(name: str, values: np.ndarray) -> TensorProto:
    bits = fp32_to_bf16_bits(values)
    return onnx.helper.make_tensor(name, TensorProto.BFLOAT16, list(values.shape), bits.tobytes(), raw=True)


def convert_model(
    model: onnx.ModelProto,
    precision: str,
    keep_fp32_ops: tuple[str, ...] | None = None,
    keep_io_types: bool = True,
) -> onnx.ModelProto:
    """Return a converted copy of ``model`` (which is not modified). ``precision='fp32'`` returns a plain copy."""
    if precision not in PRECISIONS:
        raise PermsparseError(f"unknown precision '{precision}'; choose one of {', '.join(PRECISIONS)}")
    src = onnx.ModelProto()
    src.CopyFrom(model)
    if precision == "fp32":
        return src
    current = model_float_type(model)
    if current != "fp32":
        raise PermsparseError(
            f"the model's weights are already {current}; convert from the fp32 model or pass --precision fp32"
        )
    try:
        from onnxconverter_common import float16
    except ImportError as exc:
        raise PermsparseError(
            "fp16/bf16 conversion needs onnxconverter-common: pip install 'permsparse[trt]' (or onnxconverter-common)"
        ) from exc
    keep = tuple(DEFAULT_KEEP_FP32_OPS if keep_fp32_ops is None else keep_fp32_ops)
    block = sorted(set(float16.DEFAULT_OP_BLOCK_LIST) | set(keep))
    originals: dict[str, np.ndarray] = {}
    if precision == "bf16":
        originals = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer if i.data_type == TensorProto.FLOAT}
        for node in model.graph.node:
            if node.op_type == "Constant":
                for a in node.attribute:
                    if a.name == "value" and a.t.data_type == TensorProto.FLOAT:
                        originals["const:" + node.output[0]] = numpy_helper.to_array(a.t)
    _fold_constant_identities(src)
    kwargs: dict = dict(keep_io_types=keep_io_types, op_block_list=block, disable_shape_infer=False)
    if precision == "bf16":
        kwargs.update(min_positive_val=0.0, max_finite_val=float(np.finfo(np.float32).max))
    try:
        with warnings.catch_warnings():  # onnxconverter-common warns once per clamped constant: too noisy
            warnings.simplefilter("ignore", UserWarning)
            out = float16.convert_float_to_float16(src, **kwargs)
    except Exception as exc:
        # Shape inference fails on some exporters' graphs (or > 2 GB protos): retry without it.
        logger.info("float16 conversion with shape inference failed (%s); retrying without", exc)
        src = onnx.ModelProto()
        src.CopyFrom(model)
        _fold_constant_identities(src)
        kwargs["disable_shape_infer"] = True
        with warnings.catch_warnings():  # onnxconverter-common warns once per clamped constant: too noisy
            warnings.simplefilter("ignore", UserWarning)
            out = float16.convert_float_to_float16(src, **kwargs)
    _sync_cast_value_info(out)
    if precision == "bf16":
        _retype_fp16_to_bf16(out, originals)
    _validate_types(out, precision)
    logger.info("converted model to %s (kept in fp32: %s)", precision, ", ".join(keep) or "nothing")
    return out


def _sync_cast_value_info(model: onnx.ModelProto) -> None:
    """Set the recorded type of every Cast output to the Cast's ``to``.

    The converter keeps an exporter's ``Cast(to=float)`` that feeds an op kept in fp32 but still records its output
    as fp16 in ``value_info`` (e.g. the ``Cast → Pow`` of an attention-scale computation); runtimes then reject it.
    """
    g = model.graph
    cast_to = {}
    for node in g.node:
        if node.op_type == "Cast":
            for a in node.attribute:
                if a.name == "to":
                    cast_to[node.output[0]] = a.i
    for vi in list(g.value_info) + list(g.output):
        t = cast_to.get(vi.name)
        if t is not None and vi.type.tensor_type.elem_type != t:
            vi.type.tensor_type.elem_type = t


def _validate_types(model: onnx.ModelProto, precision: str) -> None:
    """Strict ONNX type inference over the converted graph (models under 2 GB): catch a broken conversion here."""
    try:
        if model.ByteSize() > 1_800_000_000:
            return
    except Exception:
        return
    try:
        onnx.shape_inference.infer_shapes(model, strict_mode=True)
    except Exception as exc:
        msg = str(exc).splitlines()[0][:300]
        raise PermsparseError(
            f"the {precision} conversion produced an inconsistent graph ({msg}); keep the offending op in fp32 "
            "with --keep-fp32 OP ..., or build with --precision fp32"
        ) from exc


def _fold_constant_identities(model: onnx.ModelProto) -> None:
    """Replace ``Identity(initializer)`` (the legacy exporter's de-duplicated parameters) by an initializer copy.

    The float16 converter converts such an Identity while a blocked consumer (e.g. LayerNormalization) still expects
    fp32, which produces an invalid model.
    """
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    outputs = {o.name for o in g.output}
    keep = []
    for node in g.node:
        if node.op_type == "Identity" and node.input[0] in inits and node.output[0] not in outputs:
            copy = onnx.TensorProto()
            copy.CopyFrom(inits[node.input[0]])
            copy.name = node.output[0]
            g.initializer.append(copy)
            inits[copy.name] = copy
        else:
            keep.append(node)
    if len(keep) != len(g.node):
        del g.node[:]
        g.node.extend(keep)


def _retype_fp16_to_bf16(model: onnx.ModelProto, originals: dict[str, np.ndarray]) -> None:
    graphs = [model.graph]
    while graphs:
        g = graphs.pop()
        for i, init in enumerate(g.initializer):
            if init.data_type == TensorProto.FLOAT16:
                vals = originals.get(init.name)
                if vals is None:
                    vals = numpy_helper.to_array(init).astype(np.float32)
                g.initializer[i].CopyFrom(_bf16_tensor(init.name, vals))
        for vi in list(g.input) + list(g.output) + list(g.value_info):
            if vi.type.tensor_type.elem_type == TensorProto.FLOAT16:
                vi.type.tensor_type.elem_type = TensorProto.BFLOAT16
        for node in g.node:
            for a in node.attribute:
                if node.op_type == "Cast" and a.name == "to" and a.i == TensorProto.FLOAT16:
                    a.i = TensorProto.BFLOAT16
                elif a.type == onnx.AttributeProto.TENSOR and a.t.data_type == TensorProto.FLOAT16:
                    vals = originals.get("const:" + node.output[0]) if node.op_type == "Constant" else None
                    if vals is None:
                        vals = numpy_helper.to_array(a.t).astype(np.float32)
                    a.t.CopyFrom(_bf16_tensor(a.t.name, vals))
                elif a.type == onnx.AttributeProto.GRAPH:
                    graphs.append(a.g)
                elif a.type == onnx.AttributeProto.GRAPHS:
                    graphs.extend(a.graphs)


def convert_precision(
    in_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    precision: str,
    keep_fp32_ops: tuple[str, ...] | None = None,
    keep_io_types: bool = True,
) -> Path:
    """Convert the ONNX file at ``in_path`` and write it to ``out_path`` (never overwriting the input)."""
    in_path, out_path = Path(in_path), Path(out_path)
    if in_path.resolve() == out_path.resolve():
        raise PermsparseError(f"{out_path}: refusing to overwrite the input model; choose another output path")
    model = load_model(in_path, lazy=False, check=False)
    converted = convert_model(model, precision, keep_fp32_ops=keep_fp32_ops, keep_io_types=keep_io_types)
    return save_model(converted, out_path)

"""Neural-network ONNX ops: MatMul, Gemm, Conv, normalizations, Softmax family, reductions, ArgMax, Einsum.

Invariant: each callable equals the ONNX definition. MatMul uses numpy-style batched broadcasting (torch.matmul is
defined the same way, including 1-D operands); Gemm is ``alpha * A' @ B' + beta * C``; Softmax before opset 13
coerces the input to 2-D at ``axis`` (the old semantics), from 13 on it normalizes along ``axis``; reductions take
their axes from the attribute or (newer opsets) the second input, honour ``keepdims`` and
``noop_with_empty_axes``. LayerNormalization and the RMS norms with ``stash_type=1`` compute 16-bit inputs in float32
and cast back, as onnxruntime does.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from permsparse.torchgraph.registry import LOW_PRECISION, Node, OpFunction, register

log = logging.getLogger(__name__)


@register("MatMul")
def _matmul(node: Node) -> OpFunction:
    return torch.matmul


@register("Gemm")
def _gemm(node: Node) -> OpFunction:
    alpha, beta = float(node.attrs.get("alpha", 1.0)), float(node.attrs.get("beta", 1.0))
    trans_a, trans_b = bool(node.attrs.get("transA", 0)), bool(node.attrs.get("transB", 0))

    def gemm(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        y = torch.matmul(a.t() if trans_a else a, b.t() if trans_b else b)
        if alpha != 1.0:
            y = y * alpha
        if c is None:
            return y
        return y + (c if beta == 1.0 else c * beta)

    return gemm


@register("Conv")
def _conv(node: Node) -> OpFunction:
    group = int(node.attrs.get("group", 1))
    auto_pad = node.attrs.get("auto_pad", "NOTSET")
    if auto_pad not in ("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER"):
        raise node.fail(f"Conv auto_pad={auto_pad!r} is not supported")

    def conv(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        n = w.dim() - 2
        fn = (F.conv1d, F.conv2d, F.conv3d)[n - 1]
        strides = [int(s) for s in node.attrs.get("strides", [1] * n)]
        dil = [int(d) for d in node.attrs.get("dilations", [1] * n)]
        pads = [int(p) for p in node.attrs.get("pads", [0] * (2 * n))]
        if auto_pad == "VALID":
            pads = [0] * (2 * n)
        elif auto_pad.startswith("SAME"):
            pads = [0] * (2 * n)
            for i in range(n):
                size, k = x.shape[2 + i], w.shape[2 + i]
                total = max((-(-size // strides[i]) - 1) * strides[i] + (k - 1) * dil[i] + 1 - size, 0)
                small = total // 2
                pads[i], pads[n + i] = (small, total - small) if auto_pad == "SAME_UPPER" else (total - small, small)
        if pads[:n] == pads[n:]:
            return fn(x, w, b, strides, pads[:n], dil, group)
        torch_pads: list[int] = []
        for i in range(n - 1, -1, -1):
            torch_pads += [pads[i], pads[n + i]]
        return fn(F.pad(x, torch_pads), w, b, strides, 0, dil, group)

    return conv


def _stash(node: Node) -> bool:
    return bool(node.attrs.get("stash_type", 1) == 1)


@register("LayerNormalization")
def _layer_norm(node: Node) -> OpFunction:
    axis, eps, stash = int(node.attrs.get("axis", -1)), float(node.attrs.get("epsilon", 1e-5)), _stash(node)
    extra = node.wants_output(1) or node.wants_output(2)

    def layer_norm(
        x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor | None, ...]:
        a = axis + x.dim() if axis < 0 else axis
        dtype = x.dtype
        if stash and dtype in LOW_PRECISION:
            x, scale = x.float(), scale.float()
            bias = None if bias is None else bias.float()
        shape = tuple(x.shape[a:])
        if not extra and tuple(scale.shape) == shape and (bias is None or tuple(bias.shape) == shape):
            return F.layer_norm(x, shape, scale, bias, eps).to(dtype)
        dims = tuple(range(a, x.dim()))
        mean = x.mean(dims, keepdim=True)
        inv_std = torch.rsqrt((x - mean).square().mean(dims, keepdim=True) + eps)
        y = (x - mean) * inv_std * scale
        y = (y if bias is None else y + bias).to(dtype)
        return (y, mean, inv_std)[: node.n_outputs] if node.n_outputs > 1 else y

    return layer_norm


@register("SimplifiedLayerNormalization", "RMSNormalization")
def _rms_norm(node: Node) -> OpFunction:
    axis, eps, stash = int(node.attrs.get("axis", -1)), float(node.attrs.get("epsilon", 1e-5)), _stash(node)

    def rms_norm(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        a = axis + x.dim() if axis < 0 else axis
        dtype = x.dtype
        if stash and dtype in LOW_PRECISION:
            x, scale = x.float(), scale.float()
        dims = tuple(range(a, x.dim()))
        inv = torch.rsqrt(x.square().mean(dims, keepdim=True) + eps)
        y = (x * inv * scale).to(dtype)
        return (y, inv)[: node.n_outputs] if node.n_outputs > 1 else y

    return rms_norm


@register("BatchNormalization")
def _batch_norm(node: Node) -> OpFunction:
    eps = float(node.attrs.get("epsilon", 1e-5))
    if node.attrs.get("training_mode", 0):
        raise node.fail("BatchNormalization in training mode is not supported (export the model in eval mode)")
    return lambda x, scale, bias, mean, var: F.batch_norm(x, mean, var, scale, bias, False, 0.0, eps)


@register("Softmax", "LogSoftmax", "Hardmax")
def _softmax(node: Node) -> OpFunction:
    op = node.op_type
    fn: Callable[[torch.Tensor, int], torch.Tensor]
    if op == "Softmax":
        fn = torch.softmax
    elif op == "LogSoftmax":
        fn = torch.log_softmax
    else:
        def fn(x: torch.Tensor, dim: int) -> torch.Tensor:
            return F.one_hot(x.argmax(dim), x.shape[dim]).movedim(-1, dim).to(x.dtype)
    if node.opset >= 13:
        axis = int(node.attrs.get("axis", -1))
        return lambda x: fn(x, axis)
    axis = int(node.attrs.get("axis", 1))

    def coerced(x: torch.Tensor) -> torch.Tensor:  # opset < 13: flatten to 2-D at axis, normalize rows
        a = axis + x.dim() if axis < 0 else axis
        flat = x.reshape(math.prod(x.shape[:a]), math.prod(x.shape[a:]))
        return fn(flat, 1).reshape(x.shape)

    return coerced


def _prod(x: torch.Tensor, dims: list[int], keep: bool) -> torch.Tensor:
    for d in sorted((d % x.dim() for d in dims), reverse=True):
        x = torch.prod(x, d, keepdim=keep)
    return x


_REDUCE: dict[str, Callable[[torch.Tensor, list[int], bool], torch.Tensor]] = {
    "ReduceMean": lambda x, d, k: torch.mean(x, d, keepdim=k),
    "ReduceSum": lambda x, d, k: torch.sum(x, d, keepdim=k, dtype=x.dtype),
    "ReduceMax": lambda x, d, k: torch.amax(x, d, keepdim=k),
    "ReduceMin": lambda x, d, k: torch.amin(x, d, keepdim=k),
    "ReduceProd": _prod,
    "ReduceL1": lambda x, d, k: torch.sum(x.abs(), d, keepdim=k, dtype=x.dtype),
    "ReduceL2": lambda x, d, k: torch.sqrt(torch.sum(x * x, d, keepdim=k)),
    "ReduceSumSquare": lambda x, d, k: torch.sum(x * x, d, keepdim=k, dtype=x.dtype),
    "ReduceLogSum": lambda x, d, k: torch.log(torch.sum(x, d, keepdim=k)),
    "ReduceLogSumExp": lambda x, d, k: torch.logsumexp(x, d, keepdim=k),
}


@register(*_REDUCE, shape_inputs=[1])
def _reduce(node: Node) -> OpFunction:
    fn = _REDUCE[node.op_type]
    keep, noop = bool(node.attrs.get("keepdims", 1)), bool(node.attrs.get("noop_with_empty_axes", 0))
    attr_axes = node.attrs.get("axes")

    def reduce(x: torch.Tensor, axes: torch.Tensor | None = None) -> torch.Tensor:
        dims = [int(a) for a in axes.reshape(-1).tolist()] if axes is not None else list(attr_axes or [])
        if not dims:
            if noop:
                return x
            dims = list(range(x.dim()))
        if x.dim() == 0:
            return x
        return fn(x, dims, keep)

    return reduce


@register("ArgMax", "ArgMin")
def _arg(node: Node) -> OpFunction:
    axis, keep = int(node.attrs.get("axis", 0)), bool(node.attrs.get("keepdims", 1))
    last = bool(node.attrs.get("select_last_index", 0))
    fn = torch.argmax if node.op_type == "ArgMax" else torch.argmin

    def arg(x: torch.Tensor) -> torch.Tensor:
        if not last:
            return fn(x, axis, keepdim=keep)
        a = axis % x.dim()
        return x.shape[a] - 1 - fn(x.flip(a), a, keepdim=keep)

    return arg


@register("Einsum")
def _einsum(node: Node) -> OpFunction:
    equation = node.attrs["equation"]
    return lambda *xs: torch.einsum(equation, *xs)


@register("GlobalAveragePool", "GlobalMaxPool")
def _global_pool(node: Node) -> OpFunction:
    if node.op_type == "GlobalAveragePool":
        return lambda x: x.mean(tuple(range(2, x.dim())), keepdim=True)
    return lambda x: x.amax(tuple(range(2, x.dim())), keepdim=True)


#: (mode, coordinate_transformation_mode) -> (torch interpolate mode, align_corners) for the Resize forms torch
#: computes exactly as ONNX defines them (cubic: torch's A = -0.75, ONNX's default ``cubic_coeff_a``).
_RESIZE_MODES = {
    ("linear", "half_pixel"): ("linear", False),
    ("linear", "pytorch_half_pixel"): ("linear", False),
    ("linear", "align_corners"): ("linear", True),
    ("cubic", "half_pixel"): ("cubic", False),
    ("cubic", "pytorch_half_pixel"): ("cubic", False),
    ("cubic", "align_corners"): ("cubic", True),
    ("nearest", "asymmetric"): ("nearest", None),
}
_TORCH_MODES = {("linear", 1): "linear", ("linear", 2): "bilinear", ("linear", 3): "trilinear", ("cubic", 2): "bicubic",
                ("nearest", 1): "nearest", ("nearest", 2): "nearest", ("nearest", 3): "nearest"}


@register("Resize", "Upsample", shape_inputs=[3])
def _resize(node: Node) -> OpFunction:
    """Resize (opset 11+; ``Upsample`` takes scales as input 1) on the spatial axes of an ``[N, C, ...]`` tensor by
    ``F.interpolate``: linear (half_pixel/pytorch_half_pixel/align_corners), cubic with ``cubic_coeff_a`` -0.75 and
    ``exclude_outside`` 0, nearest with asymmetric coordinates and ``floor`` rounding; N and C must keep their size.
    Other forms (antialias, tf_crop_and_resize, other rounding) raise at resolve time."""
    a = node.attrs
    mode = a.get("mode", "nearest")
    ctm = a.get("coordinate_transformation_mode", "half_pixel" if node.op_type == "Resize" else "asymmetric")
    nearest = a.get("nearest_mode", "round_prefer_floor")
    unsupported = (
        (mode, ctm) not in _RESIZE_MODES
        or (mode == "nearest" and nearest != "floor" and node.op_type == "Resize")
        or (mode == "cubic" and (abs(float(a.get("cubic_coeff_a", -0.75)) + 0.75) > 1e-9
                                 or int(a.get("exclude_outside", 0))))
        or int(a.get("antialias", 0))
        or a.get("axes") is not None
        or a.get("keep_aspect_ratio_policy", "stretch") != "stretch"
    )
    if unsupported:
        raise node.fail(f"Resize mode {mode!r} with coordinate_transformation_mode {ctm!r} (nearest_mode "
                        f"{nearest!r}, attributes {sorted(a)}) is not supported by the torch evaluator")
    kind, align = _RESIZE_MODES[(mode, ctm)]
    scale_pos = 1 if node.op_type == "Upsample" else 2

    def resize(x: torch.Tensor, *rest: torch.Tensor | None) -> torch.Tensor:
        scales = rest[scale_pos - 1] if len(rest) >= scale_pos else None
        sizes = rest[2] if len(rest) > 2 else None
        spatial = x.dim() - 2
        if sizes is not None and sizes.numel():
            size = [int(s) for s in sizes.tolist()]
        elif scales is not None and scales.numel():
            sc = [float(s) for s in scales.tolist()]
            if sc[0] != 1.0 or sc[1] != 1.0:
                raise node.fail("Resize of the batch or channel axis is not supported by the torch evaluator")
            size = [x.shape[0], x.shape[1], *[math.floor(d * s) for d, s in zip(x.shape[2:], sc[2:])]]
        else:
            raise node.fail("Resize needs scales or sizes")
        if size[:2] != list(x.shape[:2]):
            raise node.fail("Resize of the batch or channel axis is not supported by the torch evaluator")
        tmode = _TORCH_MODES.get((kind, spatial))
        if tmode is None:
            raise node.fail(f"{mode} Resize of {spatial} spatial axes is not supported by the torch evaluator")
        out_size = size[2:]
        if list(x.shape[2:]) == out_size:
            return x
        if tmode == "nearest":
            return F.interpolate(x, size=out_size, mode="nearest")
        if ctm == "half_pixel" and any(s == 1 for s in out_size):
            raise node.fail("half_pixel Resize to a length of 1 differs from torch's; not supported")
        return F.interpolate(x, size=out_size, mode=tmode, align_corners=align)

    return resize

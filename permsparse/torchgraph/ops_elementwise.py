"""Elementwise ONNX ops (unary math, binary arithmetic with broadcasting, comparisons, logic, Cast, Where, Clip).

Invariant: each callable is the ONNX definition applied elementwise with numpy-style broadcasting, in the inputs'
dtype. Where torch and ONNX differ, the difference is handled explicitly: integer ``Div`` truncates toward zero
(torch's ``/`` would give floats), ``Mod`` follows the sign of the divisor unless ``fmod=1``, ``Pow`` returns the
base's dtype, ``Cast`` to bool is ``x != 0`` and float16/bfloat16 targets become float32 under ``upcast``.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch
import torch.nn.functional as F

from permsparse.torchgraph.registry import Node, OpFunction, register, torch_dtype

log = logging.getLogger(__name__)

_UNARY: dict[str, OpFunction] = {
    "Abs": torch.abs,
    "Neg": torch.neg,
    "Sqrt": torch.sqrt,
    "Reciprocal": torch.reciprocal,
    "Exp": torch.exp,
    "Log": torch.log,
    "Erf": torch.erf,
    "Sin": torch.sin,
    "Cos": torch.cos,
    "Tan": torch.tan,
    "Tanh": torch.tanh,
    "Sigmoid": torch.sigmoid,
    "Relu": torch.relu,
    "Floor": torch.floor,
    "Ceil": torch.ceil,
    "Round": torch.round,  # half to even, as ONNX
    "Sign": torch.sign,
    "Not": torch.logical_not,
    "IsNaN": torch.isnan,
    "Softplus": F.softplus,
    "Softsign": F.softsign,
    "HardSwish": F.hardswish,
}

_BINARY: dict[str, OpFunction] = {
    "Add": torch.add,
    "Sub": torch.sub,
    "Mul": torch.mul,
    "Equal": torch.eq,
    "Greater": torch.gt,
    "GreaterOrEqual": torch.ge,
    "Less": torch.lt,
    "LessOrEqual": torch.le,
    "And": torch.logical_and,
    "Or": torch.logical_or,
    "Xor": torch.logical_xor,
    "BitwiseAnd": torch.bitwise_and,
    "BitwiseOr": torch.bitwise_or,
    "BitwiseXor": torch.bitwise_xor,
}


def _fixed(fn: OpFunction) -> Any:
    return lambda node: fn


for _op, _fn in _UNARY.items():
    register(_op)(_fixed(_fn))
for _op, _fn in _BINARY.items():
    register(_op)(_fixed(_fn))


@register("Identity")
def _identity(node: Node) -> OpFunction:
    return lambda x: x


@register("Dropout")
def _dropout(node: Node) -> OpFunction:
    # Inference semantics (the evaluator runs exported models): y = x; the optional mask is all True.
    if node.wants_output(1):
        return lambda x, ratio=None, training=None: (x, torch.ones(x.shape, dtype=torch.bool, device=x.device))
    if node.n_outputs > 1:
        return lambda x, ratio=None, training=None: (x, None)
    return lambda x, ratio=None, training=None: x


@register("Div")
def _div(node: Node) -> OpFunction:
    def div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if a.is_floating_point():
            return torch.div(a, b)
        return torch.div(a, b, rounding_mode="trunc")  # ONNX integer Div truncates toward zero

    return div


@register("Mod")
def _mod(node: Node) -> OpFunction:
    return torch.fmod if node.attrs.get("fmod", 0) else torch.remainder


@register("Pow")
def _pow(node: Node) -> OpFunction:
    def power(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if y.numel() == 1 and y.dim() <= x.dim() and y.device.type == "cpu" and not y.requires_grad:
            out = torch.pow(x, y.reshape(()).item())  # scalar exponent: x*x for 2, like onnxruntime
        else:
            out = torch.pow(x, y)
        return out if out.dtype == x.dtype else out.to(x.dtype)  # ONNX: the output has the base's type

    return power


@register("Max", "Min", "Sum", "Mean")
def _variadic(node: Node) -> OpFunction:
    pair = {"Max": torch.maximum, "Min": torch.minimum, "Sum": torch.add, "Mean": torch.add}[node.op_type]
    n = len(node.inputs)

    def fold(*xs: torch.Tensor) -> torch.Tensor:
        out = functools.reduce(pair, xs)
        return out / n if node.op_type == "Mean" else out

    return fold


@register("IsInf")
def _isinf(node: Node) -> OpFunction:
    neg, pos = node.attrs.get("detect_negative", 1), node.attrs.get("detect_positive", 1)
    if neg and pos:
        return torch.isinf
    if pos:
        return torch.isposinf
    if neg:
        return torch.isneginf
    return lambda x: torch.zeros(x.shape, dtype=torch.bool, device=x.device)


@register("Cast")
def _cast(node: Node) -> OpFunction:
    dt = torch_dtype(node.attrs["to"], node.upcast, node)
    if dt is torch.bool:
        return lambda x: x if x.dtype is torch.bool else x != 0
    return lambda x: x.to(dt)  # float -> int truncates toward zero, as onnxruntime


@register("CastLike")
def _cast_like(node: Node) -> OpFunction:
    def cast_like(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        if like.dtype is torch.bool and x.dtype is not torch.bool:
            return x != 0
        return x.to(like.dtype)

    return cast_like


@register("Where")
def _where(node: Node) -> OpFunction:
    return torch.where


@register("Clip")
def _clip(node: Node) -> OpFunction:
    if node.opset < 11:
        lo, hi = node.attrs.get("min"), node.attrs.get("max")
        return lambda x: torch.clamp(x, lo, hi)

    def clip(x: torch.Tensor, lo: torch.Tensor | None = None, hi: torch.Tensor | None = None) -> torch.Tensor:
        if lo is None and hi is None:
            return x
        return torch.clamp(x, lo, hi)

    return clip


@register("LeakyRelu")
def _leaky_relu(node: Node) -> OpFunction:
    alpha = float(node.attrs.get("alpha", 0.01))
    return lambda x: F.leaky_relu(x, alpha)


@register("Elu")
def _elu(node: Node) -> OpFunction:
    alpha = float(node.attrs.get("alpha", 1.0))
    return lambda x: F.elu(x, alpha)


@register("Selu")
def _selu(node: Node) -> OpFunction:
    alpha = float(node.attrs.get("alpha", 1.67326319217681884765625))
    gamma = float(node.attrs.get("gamma", 1.05070102214813232421875))
    return lambda x: gamma * torch.where(x > 0, x, alpha * (torch.exp(x) - 1))


@register("HardSigmoid")
def _hard_sigmoid(node: Node) -> OpFunction:
    alpha, beta = float(node.attrs.get("alpha", 0.2)), float(node.attrs.get("beta", 0.5))
    return lambda x: torch.clamp(alpha * x + beta, 0.0, 1.0)


@register("Gelu")
def _gelu(node: Node) -> OpFunction:
    approximate = node.attrs.get("approximate", "none")
    return lambda x: F.gelu(x, approximate=approximate)


@register("PRelu")
def _prelu(node: Node) -> OpFunction:
    return lambda x, slope: torch.where(x < 0, x * slope, x)

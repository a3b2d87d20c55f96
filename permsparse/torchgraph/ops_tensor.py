"""Shape, layout and indexing ONNX ops (Shape, Reshape, Slice, Gather*, Scatter*, Expand, Range, Trilu, ...).

Invariant: shape-like inputs (target shapes, axes, starts/ends/steps, repeats, pads) are integer tensors read with
``tolist()``; the data inputs are moved only by differentiable views/indexing (reshape, permute, basic slicing,
``index_select``, ``gather``, ``index_put``), so gradients reach every float input. Index semantics follow the ONNX
spec literally: negative indices count from the end, Slice clamps per the sign of its step (not Python's rules), 0
in a Reshape target copies the input dimension unless ``allowzero``, Expand broadcasts both ways. Tensors these
ops create from nothing (Shape, Size, integer Range/ConstantOfShape) live on the CPU as int64.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
import torch.nn.functional as F

from permsparse.torchgraph.registry import Node, OpFunction, register, to_torch

log = logging.getLogger(__name__)
CPU = torch.device("cpu")


def _ints(t: torch.Tensor | None) -> list[int]:
    return [] if t is None else [int(v) for v in t.reshape(-1).tolist()]


def _axes(node: Node, t: torch.Tensor | None) -> list[int] | None:
    """Axes from the optional input ``t`` (newer opsets) or the ``axes`` attribute (older ones); None if neither."""
    if t is not None:
        return _ints(t)
    axes = node.attrs.get("axes")
    return None if axes is None else [int(a) for a in axes]


@register("Shape")
def _shape(node: Node) -> OpFunction:
    start, end = int(node.attrs.get("start", 0)), node.attrs.get("end")
    end = None if end is None else int(end)
    return lambda x: torch.tensor(x.shape[start:end], dtype=torch.int64)


@register("Size")
def _size(node: Node) -> OpFunction:
    return lambda x: torch.tensor(x.numel(), dtype=torch.int64)


@register("Reshape", shape_inputs=[1])
def _reshape(node: Node) -> OpFunction:
    allowzero = bool(node.attrs.get("allowzero", 0))

    def reshape(x: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
        dims = _ints(shape)
        if not allowzero and 0 in dims:
            dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
        return x.reshape(dims)

    return reshape


@register("Flatten")
def _flatten(node: Node) -> OpFunction:
    axis = int(node.attrs.get("axis", 1))

    def flatten(x: torch.Tensor) -> torch.Tensor:
        a = axis + x.dim() if axis < 0 else axis
        return x.reshape(math.prod(x.shape[:a]), math.prod(x.shape[a:]))

    return flatten


@register("Squeeze", shape_inputs=[1])
def _squeeze(node: Node) -> OpFunction:
    def squeeze(x: torch.Tensor, axes: torch.Tensor | None = None) -> torch.Tensor:
        ax = _axes(node, axes)
        if ax is None:
            return x.squeeze()
        return x.squeeze(tuple(ax)) if ax else x

    return squeeze


@register("Unsqueeze", shape_inputs=[1])
def _unsqueeze(node: Node) -> OpFunction:
    def unsqueeze(x: torch.Tensor, axes: torch.Tensor | None = None) -> torch.Tensor:
        ax = _axes(node, axes) or []
        rank = x.dim() + len(ax)
        for a in sorted(a + rank if a < 0 else a for a in ax):
            x = x.unsqueeze(a)
        return x

    return unsqueeze


@register("Transpose")
def _transpose(node: Node) -> OpFunction:
    perm = node.attrs.get("perm")
    if perm is None:
        return lambda x: x.permute(tuple(range(x.dim() - 1, -1, -1)))
    perm = tuple(int(p) for p in perm)
    return lambda x: x.permute(perm)


@register("Concat")
def _concat(node: Node) -> OpFunction:
    axis = int(node.attrs["axis"])
    return lambda *xs: torch.cat(xs, dim=axis)


@register("Split", shape_inputs=[1])
def _split(node: Node) -> OpFunction:
    axis, n = int(node.attrs.get("axis", 0)), node.n_outputs
    attr_split, num = node.attrs.get("split"), node.attrs.get("num_outputs")

    def split(x: torch.Tensor, sizes: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, ...]:
        if sizes is not None:
            parts = _ints(sizes)
        elif attr_split:
            parts = [int(s) for s in attr_split]
        else:  # equal parts; opset 18's num_outputs makes the last one smaller when it does not divide
            k, dim = int(num or n), x.shape[axis]
            chunk = -(-dim // k)
            parts = [chunk] * (k - 1) + [dim - chunk * (k - 1)]
        out = torch.split(x, parts, dim=axis)
        return out[0] if n == 1 else tuple(out)

    return split


@register("Slice", shape_inputs=[1, 2, 3, 4])
def _slice(node: Node) -> OpFunction:
    def slice_(
        x: torch.Tensor,
        starts: torch.Tensor | None = None,
        ends: torch.Tensor | None = None,
        axes: torch.Tensor | None = None,
        steps: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if node.opset < 10:
            s_list, e_list = list(node.attrs["starts"]), list(node.attrs["ends"])
            a_list = list(node.attrs.get("axes", range(len(s_list))))
            st_list = [1] * len(s_list)
        else:
            s_list, e_list = _ints(starts), _ints(ends)
            a_list = _ints(axes) if axes is not None else list(range(len(s_list)))
            st_list = _ints(steps) if steps is not None else [1] * len(s_list)
        index: list[slice] = [slice(None)] * x.dim()
        backward: list[tuple[int, int, int, int]] = []
        for a, s, e, st in zip(a_list, s_list, e_list, st_list):
            a = a + x.dim() if a < 0 else a
            dim = x.shape[a]
            s, e = s + dim if s < 0 else s, e + dim if e < 0 else e
            if st > 0:  # ONNX clamping: [0, dim] for positive steps ...
                index[a] = slice(min(max(s, 0), dim), min(max(e, 0), dim), st)
            elif st < 0:  # ... [0, dim-1] for starts and [-1, dim-1] for ends with negative steps
                backward.append((a, min(max(s, 0), dim - 1), min(max(e, -1), dim - 1), st))
            else:
                raise node.fail("Slice step 0 is invalid")
        y = x[tuple(index)]
        for a, s, e, st in backward:
            y = y.index_select(a, torch.arange(s, e, st, device=y.device))
        return y

    return slice_


def _wrap(idx: torch.Tensor, dim: int) -> torch.Tensor:
    """ONNX indices may be negative (count from the end)."""
    if idx.dtype != torch.int64:
        idx = idx.long()
    return torch.where(idx < 0, idx + dim, idx)


@register("Gather")
def _gather(node: Node) -> OpFunction:
    axis = int(node.attrs.get("axis", 0))

    def gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        a = axis + x.dim() if axis < 0 else axis
        if idx.dim() == 0:
            i = int(idx)
            return x.select(a, i + x.shape[a] if i < 0 else i)
        flat = _wrap(idx.reshape(-1), x.shape[a])
        out = x.index_select(a, flat)
        return out if idx.dim() == 1 else out.reshape(x.shape[:a] + idx.shape + x.shape[a + 1 :])

    return gather


@register("GatherElements")
def _gather_elements(node: Node) -> OpFunction:
    axis = int(node.attrs.get("axis", 0))
    return lambda x, idx: torch.gather(x, axis, _wrap(idx, x.shape[axis]))


@register("GatherND")
def _gather_nd(node: Node) -> OpFunction:
    b = int(node.attrs.get("batch_dims", 0))

    def gather_nd(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        k = idx.shape[-1]
        batch = math.prod(x.shape[:b])
        inner, rest = x.shape[b : b + k], x.shape[b + k :]
        data = x.reshape(batch, math.prod(inner), *rest)
        ind = idx.reshape(batch, -1, k).long()
        linear = torch.zeros(ind.shape[:2], dtype=torch.int64, device=ind.device)
        for j, size in enumerate(inner):
            linear = linear * size + _wrap(ind[..., j], size)
        rows = torch.arange(batch, device=ind.device).unsqueeze(1)
        return data[rows, linear.to(data.device)].reshape(*idx.shape[:-1], *rest)

    return gather_nd


@register("ScatterND")
def _scatter_nd(node: Node) -> OpFunction:
    reduction = node.attrs.get("reduction", "none")
    if reduction not in ("none", "add"):
        raise node.fail(f"ScatterND reduction={reduction!r} is not supported (none and add are)")

    def scatter_nd(x: torch.Tensor, idx: torch.Tensor, updates: torch.Tensor) -> torch.Tensor:
        k = idx.shape[-1]
        index = tuple(_wrap(idx[..., j], x.shape[j]).to(x.device) for j in range(k))
        return x.index_put(index, updates, accumulate=reduction == "add")

    return scatter_nd


@register("ScatterElements", "Scatter")
def _scatter_elements(node: Node) -> OpFunction:
    axis, reduction = int(node.attrs.get("axis", 0)), node.attrs.get("reduction", "none")
    reduce = {"add": "sum", "mul": "prod", "max": "amax", "min": "amin"}

    def scatter(x: torch.Tensor, idx: torch.Tensor, updates: torch.Tensor) -> torch.Tensor:
        i = _wrap(idx, x.shape[axis])
        if reduction == "none":
            return torch.scatter(x, axis, i, updates)
        return torch.scatter_reduce(x, axis, i, updates, reduce[reduction], include_self=True)

    return scatter


@register("Expand", shape_inputs=[1])
def _expand(node: Node) -> OpFunction:
    def expand(x: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
        return x.expand(torch.broadcast_shapes(x.shape, tuple(_ints(shape))))  # bidirectional broadcast

    return expand


@register("Tile", shape_inputs=[1])
def _tile(node: Node) -> OpFunction:
    return lambda x, repeats: x.repeat(_ints(repeats))


@register("ConstantOfShape", shape_inputs=[0])
def _constant_of_shape(node: Node) -> OpFunction:
    value = node.attrs.get("value")
    arr = np.zeros(1, dtype=np.float32) if value is None else np.asarray(value).reshape(-1)
    t = to_torch(arr, upcast=node.upcast, device=CPU)
    dt, fill = t.dtype, t[0].item()
    device = node.device if dt.is_floating_point else CPU
    return lambda shape: torch.full(_ints(shape), fill, dtype=dt, device=device)


@register("Range", shape_inputs=[0, 1, 2])
def _range(node: Node) -> OpFunction:
    def range_(start: torch.Tensor, limit: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        dt = start.dtype
        if node.upcast and dt in (torch.float16, torch.bfloat16):
            dt = torch.float32
        s, lim, d = start.item(), limit.item(), delta.item()
        n = max(math.ceil((lim - s) / d), 0)  # ONNX: the number of elements
        device = node.device if dt.is_floating_point else CPU
        return s + torch.arange(n, dtype=dt, device=device) * d

    return range_


@register("Trilu", shape_inputs=[1])
def _trilu(node: Node) -> OpFunction:
    upper = bool(node.attrs.get("upper", 1))

    def trilu(x: torch.Tensor, k: torch.Tensor | None = None) -> torch.Tensor:
        kk = 0 if k is None else int(k.item())
        return torch.triu(x, kk) if upper else torch.tril(x, kk)

    return trilu


@register("CumSum", shape_inputs=[1])
def _cumsum(node: Node) -> OpFunction:
    exclusive, reverse = bool(node.attrs.get("exclusive", 0)), bool(node.attrs.get("reverse", 0))

    def cumsum(x: torch.Tensor, axis: torch.Tensor) -> torch.Tensor:
        a = int(axis.item())
        y = x.flip(a) if reverse else x
        out = torch.cumsum(y, a, dtype=x.dtype)
        if exclusive:
            out = out - y
        return out.flip(a) if reverse else out

    return cumsum


@register("Pad", shape_inputs=[1, 3])
def _pad(node: Node) -> OpFunction:
    mode = {"constant": "constant", "reflect": "reflect", "edge": "replicate", "wrap": "circular"}.get(
        node.attrs.get("mode", "constant"))
    if mode is None:
        raise node.fail(f"Pad mode {node.attrs.get('mode')!r} is not supported")

    def pad(x: torch.Tensor, pads: torch.Tensor | None = None, value: torch.Tensor | None = None,
            axes: torch.Tensor | None = None) -> torch.Tensor:
        p = _ints(pads) if pads is not None else [int(v) for v in node.attrs["pads"]]
        ax = _ints(axes) if axes is not None else list(range(x.dim()))
        ax = [a + x.dim() if a < 0 else a for a in ax]
        begin, end = dict(zip(ax, p[: len(ax)])), dict(zip(ax, p[len(ax) :]))
        first = min(ax) if ax else x.dim()
        torch_pads: list[int] = []
        for a in range(x.dim() - 1, first - 1, -1):
            torch_pads += [begin.get(a, 0), end.get(a, 0)]
        if mode != "constant":
            return F.pad(x, torch_pads, mode=mode)
        fill = float(node.attrs.get("value", 0.0)) if value is None or value.numel() == 0 else value.item()
        return F.pad(x, torch_pads, mode="constant", value=fill)

    return pad


@register("NonZero")
def _nonzero(node: Node) -> OpFunction:
    return lambda x: torch.nonzero(x).T.contiguous()

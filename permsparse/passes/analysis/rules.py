"""The op-rule table: how each ONNX op relates the channel axes of the items it touches.

A rule returns a :class:`NodeRule`: *links* (a permutation of the sources' channel axis passes to the destination,
through a transformation of the block labels: broadcast, reshape, transpose, ``probs @ V``, concat, gather, slice,
reduce), *blocked* items (the op does not commute with a permutation of that item's channel axis, with the reason)
and *neutral* items (the op's result does not depend on their channel order: shapes, reductions over the channel
axis, scalars). An op without a rule blocks everything it touches. Each rule is small and has its own test.

Channel cuts of a fused projection (:func:`rule_channel_cut`, used by Slice and Split along the channel axis). A fused
projection (Phi-3's ``qkv_proj`` and ``gate_up_proj``, GPT-2's ``c_attn``) computes several parts with one MatMul and
cuts its output along the channel axis. Permuting channels ``a:b`` of the output by ``p`` only needs the weight's
columns ``a:b`` (and the same channels of a bias or scale applied after it) permuted by ``p``: every other channel is
unchanged. So a channel cut ``Y = X[..., a:b]`` links ``Y`` to the *segments* ``a:b`` of the producer's constants
(:class:`ConstSegment`), provided ``X`` comes from a MatMul/Gemm with a constant weight through ops that keep each
channel in place (unary ops, bias/scale with a constant, reshapes and transposes that keep the last axis), every
tensor on that way is read by nothing else (shape reads aside), and every reader of ``X`` is a channel cut whose range
equals ``a:b`` or is disjoint from it. Then permuting the segments commutes with the whole way and with every cut:
the cut that reads ``a:b`` sees ``Y`` permuted by ``p``, the others see no change. Parts combined elementwise (gate and
up) meet in one closure and get the same permutation; a part read per head (V) gets its head structure from the
reshapes and ``probs @ V`` after the cut, as an unfused projection does.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from permsparse.ir.graph import WeightChain, const_of, opset_of
from permsparse.passes.analysis.plan import ConstAxis, ConstSegment, Item, TensorItem
from permsparse.passes.probe import Probe

UNARY_OPS = frozenset(
    """Identity Cast CastLike Relu LeakyRelu Elu Selu Celu Sigmoid HardSigmoid HardSwish Tanh Erf Gelu FastGelu
    QuickGelu BiasGelu Softplus Softsign Mish Exp Log Neg Abs Sqrt Reciprocal Floor Ceil Round Sign IsNaN IsInf Not
    Sin Cos Tan Asin Acos Atan Sinh Cosh Asinh Acosh Atanh ThresholdedRelu Clip Dropout""".split()
)
ELEMENTWISE_OPS = frozenset(
    """Add Sub Mul Div Pow Max Min Mean Sum Where PRelu Equal Greater GreaterOrEqual Less LessOrEqual And Or Xor Mod
    BitwiseAnd BitwiseOr BitwiseXor""".split()
)
NORM_OPS = frozenset(["LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization"])
REDUCE_OPS = frozenset(
    "ReduceMean ReduceSum ReduceSumSquare ReduceL1 ReduceL2 ReduceMax ReduceMin ReduceProd ReduceLogSum "
    "ReduceLogSumExp".split()
)
RESHAPE_OPS = frozenset(["Reshape", "Flatten", "Squeeze", "Unsqueeze"])


@dataclass
class Link:
    """The destination's channel blocks follow from the sources' through ``kind`` (see closures._transform)."""

    kind: str  # bcast | reshape | transpose | matmul_b | concat | take | slice | reduce
    srcs: list[Item]
    dst: Item
    src_shapes: list[tuple[int, ...]]
    dst_shape: tuple[int, ...]
    info: dict = field(default_factory=dict)


@dataclass
class NodeRule:
    links: list[Link] = field(default_factory=list)
    blocked: dict[Item, str] = field(default_factory=dict)
    neutral: set[Item] = field(default_factory=set)

    def items(self) -> Iterable[Item]:
        for link in self.links:
            yield from link.srcs
            yield link.dst
        yield from self.blocked
        yield from self.neutral


class Ctx:
    """What a rule may look at: shapes (from the probe), constants, the opset, the weight chains."""

    def __init__(self, graph: gs.Graph, probe: Probe, chains: Mapping[str, WeightChain]):
        self.graph = graph
        self.probe = probe
        self.chains = chains
        self.opset = opset_of(graph)
        self.graph_outputs = {t.name for t in graph.outputs}

    def shape(self, t: gs.Tensor) -> tuple[int, ...] | None:
        ref = const_of(t)
        if ref is not None:
            return ref.shape
        s = self.probe.shapes.get(t.name)
        return None if s is None else tuple(s)

    def item(self, t: gs.Tensor) -> Item:
        ref = const_of(t)
        if ref is not None:
            return ConstAxis(ref.name, len(ref.shape) - 1)
        return TensorItem(t.name)

    def value(self, t: gs.Tensor) -> np.ndarray | None:
        ref = const_of(t)
        if ref is not None:
            return ref.values
        return self.probe.values.get(t.name)


class _Builder:
    """Helper for one node's rule."""

    def __init__(self, node: gs.Node, ctx: Ctx):
        self.node, self.ctx = node, ctx
        self.ins = [t for t in node.inputs if t.name]
        self.outs = [t for t in node.outputs if t.name]
        self.rule = NodeRule()

    def link(self, kind: str, srcs: list[gs.Tensor], dst: gs.Tensor, **info) -> None:
        c = self.ctx
        self.rule.links.append(Link(kind, [c.item(s) for s in srcs], c.item(dst), [c.shape(s) for s in srcs],
                                    c.shape(dst), info))

    def neutral(self, *tensors: gs.Tensor) -> None:
        self.rule.neutral.update(self.ctx.item(t) for t in tensors)

    def block_all(self, reason: str) -> NodeRule:
        blocked = NodeRule()
        for t in self.ins + self.outs:
            ref = const_of(t)
            if ref is not None:
                for ax in range(len(ref.shape)):
                    blocked.blocked[ConstAxis(ref.name, ax)] = reason
            else:
                blocked.blocked[TensorItem(t.name)] = reason
        return blocked


def _last(shape: tuple[int, ...] | None) -> int | None:
    return None if not shape else shape[-1]


def _invariant(shape: tuple[int, ...] | None) -> bool:
    return shape is not None and (len(shape) == 0 or shape[-1] == 1)


def _axes(node: gs.Node, ctx: Ctx, rank: int) -> list[int] | None:
    if "axes" in node.attrs:
        axes = list(node.attrs["axes"])
    elif len(node.inputs) > 1 and node.inputs[1].name:
        val = ctx.value(node.inputs[1])
        if val is None:
            return None
        axes = [int(a) for a in np.ravel(val)]
    else:
        return []
    return [a % rank for a in axes]


RuleFn = Callable[[_Builder], NodeRule]


def rule_shape(b: _Builder) -> NodeRule:
    b.neutral(b.ins[0])
    return b.rule


def rule_unary(b: _Builder) -> NodeRule:
    for out in b.outs:  # Dropout's mask too
        b.link("bcast", [b.ins[0]], out)
    b.neutral(*b.ins[1:])
    return b.rule


def rule_elementwise(b: _Builder) -> NodeRule:
    out_last = _last(b.ctx.shape(b.outs[0]))
    if out_last is None or out_last == 1:
        return b.block_all(f"{b.node.op} output has no channel axis")
    for t in b.ins:
        s = b.ctx.shape(t)
        if _invariant(s):
            b.neutral(t)
        elif _last(s) == out_last:
            b.link("bcast", [t], b.outs[0])
        else:
            b.rule.blocked[b.ctx.item(t)] = f"{b.node.op} broadcasts along the channel axis"
    return b.rule


def rule_norm(b: _Builder) -> NodeRule:
    rank = len(b.ctx.shape(b.ins[0]))
    if int(b.node.attrs.get("axis", -1)) % rank != rank - 1:
        return b.block_all(f"{b.node.op} normalizes over more than the channel axis")
    b.link("bcast", [b.ins[0]], b.outs[0])
    for t in b.ins[1:]:
        if _invariant(b.ctx.shape(t)):
            b.neutral(t)
        else:
            b.link("bcast", [t], b.outs[0])
    b.neutral(*b.outs[1:])
    return b.rule


def rule_softmax(b: _Builder) -> NodeRule:
    rank = len(b.ctx.shape(b.outs[0]))
    axis = int(b.node.attrs.get("axis", -1 if b.ctx.opset >= 13 else 1)) % max(rank, 1)
    if b.ctx.opset < 13 and axis != rank - 1:
        return b.block_all(f"{b.node.op} (opset < 13) flattens the channel axis with others")
    b.link("bcast", [b.ins[0]], b.outs[0])
    return b.rule


def rule_reduce(b: _Builder) -> NodeRule:
    rank = len(b.ctx.shape(b.ins[0]))
    axes = _axes(b.node, b.ctx, rank)
    if axes is None:
        return b.block_all(f"{b.node.op} has run-time axes")
    if not axes and not int(b.node.attrs.get("noop_with_empty_axes", 0)):
        axes = list(range(rank))
    b.neutral(*b.ins[1:])
    if rank - 1 in axes:
        b.neutral(b.ins[0])  # reduced over channels: the result carries no permutation
        return b.rule
    b.link("reduce", [b.ins[0]], b.outs[0], axes=axes, keepdims=bool(b.node.attrs.get("keepdims", 1)))
    return b.rule


def rule_matmul(b: _Builder) -> NodeRule:
    op, ctx = b.node.op, b.ctx
    a, bb = b.ins[0], b.ins[1]
    out = b.outs[0]
    chain = ctx.chains.get(b.node.name)
    if chain is not None:
        if const_of(a) is not None:
            return b.block_all(f"{op} with two constant inputs")
        k_item = ConstAxis(chain.const.name, chain.k_axis)
        n_item = ConstAxis(chain.const.name, chain.n_axis)
        b.rule.links.append(Link("bcast", [k_item], ctx.item(a), [(chain.const.shape[chain.k_axis],)], ctx.shape(a)))
        b.rule.links.append(Link("bcast", [n_item], ctx.item(out), [(chain.const.shape[chain.n_axis],)],
                                 ctx.shape(out)))
        if op == "Gemm" and len(b.ins) > 2:
            c_shape = ctx.shape(b.ins[2])
            if _invariant(c_shape):
                b.neutral(b.ins[2])
            elif len(c_shape) == 1 or (len(c_shape) == 2 and c_shape[0] == 1):
                b.link("bcast", [b.ins[2]], out)
            else:
                b.rule.blocked[ctx.item(b.ins[2])] = "Gemm bias is not broadcast along rows"
                b.rule.blocked[ctx.item(out)] = "Gemm bias is not broadcast along rows"
        return b.rule
    if op == "Gemm":
        return b.block_all("Gemm whose B is not a constant 2-D weight")
    a_shape, b_shape = ctx.shape(a), ctx.shape(bb)
    if len(b_shape) < 2 or len(a_shape) < 2:
        return b.block_all("MatMul with a vector operand")
    b.rule.blocked[ctx.item(a)] = "contracted by a MatMul with a run-time B"
    b.link("matmul_b", [bb], out)
    return b.rule


def rule_gather(b: _Builder) -> NodeRule:
    ctx = b.ctx
    data, idx = b.ins[0], b.ins[1]
    rank = len(ctx.shape(data))
    axis = int(b.node.attrs.get("axis", 0)) % rank
    b.neutral(idx)
    if axis == rank - 1:
        return b.block_all("Gather along the channel axis")
    ref = const_of(data)
    if ref is not None:
        if rank != 2 or axis != 0:
            return b.block_all("Gather from a constant that is not a 2-D table")
        b.rule.links.append(Link("bcast", [ConstAxis(ref.name, 1)], ctx.item(b.outs[0]), [(ref.shape[1],)],
                                 ctx.shape(b.outs[0])))
        return b.rule
    indices = ctx.value(idx)
    if indices is None:
        return b.block_all("Gather with indices of unknown value")
    b.link("take", [data], b.outs[0], axis=axis, indices=np.asarray(indices))
    return b.rule


def rule_reshape(b: _Builder) -> NodeRule:
    in_last, out_last = _last(b.ctx.shape(b.ins[0])), _last(b.ctx.shape(b.outs[0]))
    b.neutral(*b.ins[1:])
    if not in_last or not out_last or out_last == 1 or in_last == 1:
        return b.block_all(f"{b.node.op} moves the channel axis")
    if math.gcd(in_last, out_last) < min(in_last, out_last) and in_last % out_last and out_last % in_last:
        return b.block_all(f"{b.node.op} regroups the channel axis ({in_last} -> {out_last})")
    b.link("reshape", [b.ins[0]], b.outs[0])
    return b.rule


def rule_transpose(b: _Builder) -> NodeRule:
    rank = len(b.ctx.shape(b.outs[0]))
    perm = list(b.node.attrs.get("perm", list(range(rank))[::-1]))
    if perm[-1] != rank - 1:
        return b.block_all("Transpose moves the channel axis")
    b.link("transpose", [b.ins[0]], b.outs[0], perm=perm)
    return b.rule


def rule_expand(b: _Builder) -> NodeRule:
    b.neutral(b.ins[1])
    if _last(b.ctx.shape(b.ins[0])) != _last(b.ctx.shape(b.outs[0])):
        return b.block_all("Expand broadcasts along the channel axis")
    b.link("bcast", [b.ins[0]], b.outs[0])
    return b.rule


def rule_concat(b: _Builder) -> NodeRule:
    rank = len(b.ctx.shape(b.outs[0]))
    axis = int(b.node.attrs.get("axis", 0)) % rank
    if axis == rank - 1:
        return b.block_all("Concat along the channel axis")
    b.link("concat", b.ins, b.outs[0], axis=axis)
    return b.rule


def _slice_bounds(node: gs.Node, ctx: Ctx) -> tuple[list[slice], range | None] | None:
    """A Slice node's per-axis slices and the channels it keeps (``None`` when it keeps them all), or ``None`` when
    its bounds are not known."""
    in_shape = ctx.shape(node.inputs[0])
    if in_shape is None:
        return None
    rank = len(in_shape)
    vals = [ctx.value(node.inputs[i]) if i < len(node.inputs) and node.inputs[i].name else None for i in range(1, 5)]
    starts, ends = vals[0], vals[1]
    if starts is None or ends is None:
        return None
    axes = [int(a) % rank for a in np.ravel(vals[2])] if vals[2] is not None else list(range(len(np.ravel(starts))))
    steps = [int(s) for s in np.ravel(vals[3])] if vals[3] is not None else [1] * len(axes)
    slices = [slice(None)] * rank
    kept = None
    for ax, st, en, sp in zip(axes, np.ravel(starts), np.ravel(ends), steps):
        slices[ax] = slice(int(st), int(en), sp)
        if ax == rank - 1 and range(in_shape[-1])[slices[ax]] != range(in_shape[-1]):
            kept = range(in_shape[-1])[slices[ax]]
    return slices, kept


def _split_ranges(node: gs.Node, ctx: Ctx) -> list[range] | None:
    """Channels kept by each output of a Split along the channel axis (``None`` if it splits another axis)."""
    shape = ctx.shape(node.inputs[0])
    if shape is None or int(node.attrs.get("axis", 0)) % len(shape) != len(shape) - 1:
        return None
    out, start = [], 0
    for o in node.outputs:
        oshape = ctx.shape(o)
        if oshape is None:
            return None
        out.append(range(start, start + oshape[-1]))
        start += oshape[-1]
    return out


def _cut_ranges(node: gs.Node, ctx: Ctx) -> list[range] | None:
    """The channel ranges a reader cuts out of its first input, or ``None`` if it is not a channel cut."""
    if node.op == "Split":
        return _split_ranges(node, ctx)
    if node.op == "Slice":
        got = _slice_bounds(node, ctx)
        return None if got is None or got[1] is None else [got[1]]
    return None


_SHAPE_READS = frozenset({"Shape", "Size"})
_SEGMENT_BINARY = frozenset({"Add", "Sub", "Mul", "Div"})


def _fused_segments(ctx: Ctx, x: gs.Tensor, seg: range) -> tuple[list[ConstSegment], str | None]:
    """The constant segments whose permutation permutes channels ``seg`` of ``x`` and nothing else: the columns of
    the constant-weight MatMul/Gemm that produces ``x`` and those of each bias/scale after it (see the module
    docstring). Returns ``(segments, None)`` or ``([], why not)``."""
    n = _last(ctx.shape(x))
    if seg.step != 1 or not len(seg) or n is None:
        return [], "not a contiguous range"
    for reader in x.outputs:
        if reader.op in _SHAPE_READS:
            continue
        ranges = _cut_ranges(reader, ctx) if reader.inputs and reader.inputs[0] is x else None
        if ranges is None:
            return [], f"its input is also read whole by {reader.op} {reader.name}"
        for r in ranges:
            if r != seg and r.start < seg.stop and seg.start < r.stop:
                return [], f"{reader.op} {reader.name} cuts an overlapping range"
    segs: list[ConstSegment] = []
    t = x
    for _ in range(32):
        if t.name in ctx.graph_outputs:
            return [], f"{t.name} is a graph output"
        if len(t.inputs) != 1:
            return [], f"{t.name} is not computed from a MatMul with a constant weight"
        p = t.inputs[0]
        chain = ctx.chains.get(p.name)
        if chain is not None and p.outputs[0] is t:
            if chain.const.shape[chain.n_axis] != n:
                return [], f"{p.op} {p.name} has {chain.const.shape[chain.n_axis]} columns, not {n}"
            segs.append(ConstSegment(chain.const.name, chain.n_axis, seg.start, seg.stop))
            if p.op == "Gemm" and len(p.inputs) > 2 and p.inputs[2].name:
                bias = p.inputs[2]
                ref = const_of(bias)
                if ref is None or (not _invariant(ref.shape) and (ref.shape[-1] != n or int(np.prod(ref.shape)) != n)):
                    return [], f"Gemm {p.name} has a bias that is not a constant row"
                if not _invariant(ref.shape):
                    segs.append(ConstSegment(ref.name, len(ref.shape) - 1, seg.start, seg.stop))
            return segs, None
        acts = [i for i in p.inputs if i.name and const_of(i) is None]
        if p.op in UNARY_OPS or p.op in RESHAPE_OPS or p.op == "Transpose":
            src = p.inputs[0]
            if const_of(src) is not None or _last(ctx.shape(src)) != n or len(p.outputs) != 1:
                return [], f"{p.op} {p.name} moves the channel axis"
            if p.op == "Transpose" and list(p.attrs.get("perm", [0, 1]))[-1] != len(ctx.shape(src)) - 1:
                return [], f"{p.op} {p.name} moves the channel axis"
        elif p.op in _SEGMENT_BINARY and len(acts) == 1 and len(p.inputs) == 2:
            src = acts[0]
            ref = const_of(next(i for i in p.inputs if i is not src))
            if ref is None or _last(ctx.shape(src)) != n or _last(ctx.shape(t)) != n:
                return [], f"{p.op} {p.name} is not a per-channel constant"
            if not _invariant(ref.shape):
                if ref.shape[-1] != n:
                    return [], f"{p.op} {p.name} broadcasts along the channel axis"
                segs.append(ConstSegment(ref.name, len(ref.shape) - 1, seg.start, seg.stop))
        else:
            return [], f"{t.name} is computed by {p.op} {p.name}, not by a constant-weight MatMul (through per-channel ops)"
        others = [r for r in src.outputs if r is not p and r.op not in _SHAPE_READS]
        if others:
            return [], f"{src.name} is also read by {others[0].op} {others[0].name}"
        t = src
    return [], "too long a way to the producing MatMul"


def rule_channel_cut(b: _Builder, x: gs.Tensor, cuts: list[tuple[gs.Tensor, range]]) -> NodeRule:
    """A Slice/Split along the channel axis: each cut ``y = x[..., a:b]`` reads the segments ``a:b`` of the fused
    projection that writes ``x`` (see the module docstring); ``x`` itself is cut apart here, so it blocks."""
    links: list[Link] = []
    for y, seg in cuts:
        segs, why = _fused_segments(b.ctx, x, seg)
        if why is not None:
            return b.block_all(f"{b.node.op} along the channel axis ({why})")
        for item in segs:
            links.append(Link("bcast", [item], b.ctx.item(y), [(len(seg),)], b.ctx.shape(y)))
    b.rule.links.extend(links)
    b.rule.blocked[b.ctx.item(x)] = f"{b.node.op} cuts it into channel segments (each folds into the producer's)"
    b.neutral(*b.ins[1:])
    return b.rule


def rule_slice(b: _Builder) -> NodeRule:
    got = _slice_bounds(b.node, b.ctx)
    if got is None:
        return b.block_all("Slice with bounds of unknown value")
    slices, kept = got
    if kept is not None:
        return rule_channel_cut(b, b.ins[0], [(b.outs[0], kept)])
    b.neutral(*[t for t in b.node.inputs[1:] if t.name])
    slices[-1] = slice(None)
    b.link("slice", [b.ins[0]], b.outs[0], slices=tuple(slices))
    return b.rule


def rule_split(b: _Builder) -> NodeRule:
    rank = len(b.ctx.shape(b.ins[0]))
    axis = int(b.node.attrs.get("axis", 0)) % rank
    if axis == rank - 1:
        ranges = _split_ranges(b.node, b.ctx)
        if ranges is None:
            return b.block_all("Split along the channel axis into parts of unknown size")
        return rule_channel_cut(b, b.ins[0], [(o, r) for o, r in zip(b.node.outputs, ranges) if o.name])
    b.neutral(*b.ins[1:])
    start = 0
    for o in b.outs:
        size = b.ctx.shape(o)[axis]
        sl = [slice(None)] * rank
        sl[axis] = slice(start, start + size)
        start += size
        b.link("slice", [b.ins[0]], o, slices=tuple(sl))
    return b.rule


#: op type -> rule. Anything not listed blocks every item it touches.
RULES: dict[str, RuleFn] = {
    **{op: rule_unary for op in UNARY_OPS},
    **{op: rule_elementwise for op in ELEMENTWISE_OPS},
    **{op: rule_norm for op in NORM_OPS},
    **{op: rule_reduce for op in REDUCE_OPS},
    **{op: rule_reshape for op in RESHAPE_OPS},
    "Shape": rule_shape,
    "Size": rule_shape,
    "Softmax": rule_softmax,
    "LogSoftmax": rule_softmax,
    "MatMul": rule_matmul,
    "Gemm": rule_matmul,
    "Gather": rule_gather,
    "Transpose": rule_transpose,
    "Expand": rule_expand,
    "Concat": rule_concat,
    "Slice": rule_slice,
    "Split": rule_split,
}


def node_rule(node: gs.Node, ctx: Ctx) -> NodeRule:
    """How ``node`` relates the items it touches (see :data:`RULES`)."""
    b = _Builder(node, ctx)
    if node.op == "Constant" or not b.outs:
        return b.rule
    if any(ctx.shape(t) is None for t in b.ins[:1] + b.outs[:1]):
        return b.block_all(f"{node.op} has a tensor of unknown shape")
    fn = RULES.get(node.op)
    if fn is None:
        return b.block_all(f"{node.op} is not known to commute with a channel permutation")
    return fn(b)

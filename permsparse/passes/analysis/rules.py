"""The op-rule table: how each ONNX op relates the channel axes of the items it touches.

A rule returns a :class:`NodeRule`: *links* (a permutation of the sources' channel axis passes to the destination,
through a transformation of the block labels: broadcast, reshape, transpose, ``probs @ V``, concat, gather, slice,
reduce), *blocked* items (the op does not commute with a permutation of that item's channel axis, with the reason)
and *neutral* items (the op's result does not depend on their channel order: shapes, reductions over the channel
axis, scalars). An op without a rule blocks everything it touches. Each rule is small and has its own test.

Cuts of a fused projection's output (:func:`rule_part_cut`). A fused projection (Phi-3's ``qkv_proj`` and
``gate_up_proj``, GPT-2's ``c_attn``, timm's ``qkv``) computes several parts with one MatMul and cuts its output
apart: a Slice/Split/Gather along the channel axis, or along an axis that a reshape cut out of the channel axis (heads,
or ``[3, heads, head_dim]``). Permuting the channels of one part only needs the weight's columns that hold that part
(and the same channels of a bias or scale applied before any reshape) permuted alike: every other column is
unchanged. :func:`fused_view` follows the cut's input back to a MatMul/Gemm with a constant weight through ops that
move whole elements (unary ops, reshapes, transposes) or act per column (bias/scale constants), and computes for every
element the column it comes from; applying the cut to that map gives, for each part, the columns it reads, as an
array shaped like the part with its channel axis last (:class:`ConstPart`). The part is linked to those columns like a
projection's output to its weight. Conditions: every tensor on the way is read by nothing else (shape reads aside),
every reader of the cut tensor is a cut, and two parts read the same columns in the same layout or disjoint ones.
Then permuting each part's columns commutes with the whole way and with every cut: the cut that reads the part sees
it permuted, the others see no change. Parts combined elementwise (gate and up) meet in one closure and get the same
permutation; a part read per head (V) gets its head structure from the reshapes and ``probs @ V`` after the cut, as
an unfused projection does (and a part whose columns differ by head carries that in its own shape).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from permsparse.ir.graph import WeightChain, const_of, opset_of
from permsparse.passes.analysis.plan import ConstAxis, ConstPart, Item, TensorItem
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
    ref = const_of(data)
    indices = ctx.value(idx)
    if ref is None and indices is not None:
        view, why = fused_view(ctx, data, [axis])
        if view is not None:
            return rule_part_cut(b, data, view)
        if axis == rank - 1:
            return b.block_all(f"Gather along the channel axis ({why})")
    if axis == rank - 1:
        return b.block_all("Gather along the channel axis")
    if ref is not None:
        if rank != 2 or axis != 0:
            return b.block_all("Gather from a constant that is not a 2-D table")
        b.rule.links.append(Link("bcast", [ConstAxis(ref.name, 1)], ctx.item(b.outs[0]), [(ref.shape[1],)],
                                 ctx.shape(b.outs[0])))
        return b.rule
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


def _slice_bounds(node: gs.Node, ctx: Ctx) -> list[slice] | None:
    """A Slice node's slice of every axis of its input, or ``None`` when its bounds are not known."""
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
    for ax, st, en, sp in zip(axes, np.ravel(starts), np.ravel(ends), steps):
        slices[ax] = slice(int(st), int(en), sp)
    return slices


def _sliced_axes(slices: list[slice], shape: tuple[int, ...]) -> list[int]:
    """The axes a Slice does not keep whole."""
    return [ax for ax, sl in enumerate(slices) if range(shape[ax])[sl] != range(shape[ax])]


def _read_once(t: gs.Tensor) -> bool:
    """Whether the constant behind input ``t`` (possibly through Transpose/Cast/Identity) is read by this one reader
    only: permuting part of it must not change what another node reads."""
    while len(t.outputs) == 1:
        if const_of(t) is not None:
            return True
        if len(t.inputs) != 1 or not t.inputs[0].inputs:
            return False
        t = t.inputs[0].inputs[0]
    return False


def _cut(node: gs.Node, ctx: Ctx, ids: np.ndarray) -> list[tuple[gs.Tensor, np.ndarray]] | None:
    """Apply a Slice/Split/Gather reading ``ids`` (its first input) to ``ids``: the map of each output, or ``None``
    if the node is not such a cut (it reads its input whole)."""
    if node.op == "Slice":
        slices = _slice_bounds(node, ctx)
        return None if slices is None else [(node.outputs[0], ids[tuple(slices)])]
    if node.op == "Gather":
        indices = ctx.value(node.inputs[1])
        if indices is None:
            return None
        axis = int(node.attrs.get("axis", 0)) % ids.ndim
        return [(node.outputs[0], np.take(ids, np.asarray(indices, dtype=np.int64), axis=axis))]
    if node.op == "Split":
        axis = int(node.attrs.get("axis", 0)) % ids.ndim
        out, start = [], 0
        for o in node.outputs:
            oshape = ctx.shape(o)
            if oshape is None:
                return None
            sl = [slice(None)] * ids.ndim
            sl[axis] = slice(start, start + oshape[axis])
            start += oshape[axis]
            if o.name:
                out.append((o, ids[tuple(sl)]))
        return out
    return None


def _first(ids: np.ndarray, ax: int) -> np.ndarray:
    return ids[(slice(None),) * ax + (slice(0, 1),)]


def _varies(ids: np.ndarray, ax: int) -> bool:
    """Whether the columns held by ``ids`` differ along axis ``ax``."""
    return ids.shape[ax] > 1 and ids.strides[ax] != 0 and not (ids == _first(ids, ax)).all()


def _core(ids: np.ndarray) -> np.ndarray:
    """``ids`` with every axis but the last along which the columns do not vary cut to size 1."""
    for ax in range(ids.ndim - 1):
        if not _varies(ids, ax):
            ids = _first(ids, ax)
    return np.ascontiguousarray(ids)


_SHAPE_READS = frozenset({"Shape", "Size"})
_PART_BINARY = frozenset({"Add", "Sub", "Mul", "Div"})
_LAYOUT_OPS = RESHAPE_OPS | {"Transpose"}
_MAX_IDS = 1 << 25  # elements of a column map worth computing (the probe's shapes are small)


@dataclass
class FusedView:
    """A tensor seen as the output of a constant-weight MatMul/Gemm: ``ids`` (the tensor's shape, possibly a
    broadcast view) holds at every element the MatMul output column it comes from; ``consts`` are the constant axes
    indexed by those columns (the weight's N axis, biases and scales applied before any reshape)."""

    consts: list[tuple[str, int]]
    ids: np.ndarray
    n: int


def fused_view(ctx: Ctx, t: gs.Tensor, cut_axes: list[int]) -> tuple[FusedView | None, str]:
    """``t``'s :class:`FusedView` if ``t`` comes from a constant-weight MatMul/Gemm through ops that move whole
    elements or act per column, each on the way read by nothing else, and its columns differ along one of
    ``cut_axes``; else ``None`` and why not (see the module docstring)."""
    way: list[gs.Node] = []  # from t back to the MatMul
    consts: list[tuple[str, int]] = []
    cur = t
    for _ in range(32):
        if cur.name in ctx.graph_outputs:
            return None, f"{cur.name} is a graph output"
        if len(cur.inputs) != 1:
            return None, f"{cur.name} is not computed by a MatMul with a constant weight"
        if cur is not t:
            others = [r for r in cur.outputs if r is not way[-1] and r.op not in _SHAPE_READS]
            if others:
                return None, f"{cur.name} is also read by {others[0].op} {others[0].name}"
        p = cur.inputs[0]
        chain = ctx.chains.get(p.name)
        if chain is not None and p.outputs[0] is cur:
            break
        acts = [i for i in p.inputs if i.name and const_of(i) is None]
        if (p.op in UNARY_OPS or p.op in _LAYOUT_OPS) and acts and acts[0] is p.inputs[0] and len(p.outputs) == 1:
            if p.op in _LAYOUT_OPS and consts:
                return None, f"{p.op} {p.name} moves columns a bias or scale after it has already been applied to"
        elif p.op in _PART_BINARY and len(acts) == 1 and len(p.inputs) == 2:
            ref = const_of(next(i for i in p.inputs if i is not acts[0]))
            n = _last(ctx.shape(acts[0]))
            if ref is None or ctx.shape(p.outputs[0]) != ctx.shape(acts[0]):
                return None, f"{p.op} {p.name} is not a per-column constant"
            if not _invariant(ref.shape):
                if ref.shape[-1] != n:
                    return None, f"{p.op} {p.name} broadcasts along the channel axis"
                if not _read_once(next(i for i in p.inputs if i is not acts[0])):
                    return None, f"{p.op} {p.name}'s constant {ref.name} is shared with other nodes"
                consts.append((ref.name, len(ref.shape) - 1))
        else:
            return None, (f"{cur.name} is computed by {p.op} {p.name}, not by a constant-weight MatMul (through "
                          "element-moving or per-column ops)")
        way.append(p)
        cur = acts[0]
    else:
        return None, "too long a way to the MatMul"
    n = chain.const.shape[chain.n_axis]
    shape0 = ctx.shape(cur)
    if shape0 is None or shape0[-1] != n:
        return None, f"{p.op} {p.name}'s output does not hold its {n} columns last"
    if not _read_once(p.inputs[1]):
        return None, f"{p.op} {p.name}'s weight {chain.const.name} is shared with other nodes"
    consts.insert(0, (chain.const.name, chain.n_axis))
    if p.op == "Gemm" and len(p.inputs) > 2 and p.inputs[2].name:
        ref = const_of(p.inputs[2])
        if ref is None or (not _invariant(ref.shape) and (ref.shape[-1] != n or int(np.prod(ref.shape)) != n)):
            return None, f"Gemm {p.name} has a bias that is not a constant row"
        if not _invariant(ref.shape):
            if not _read_once(p.inputs[2]):
                return None, f"Gemm {p.name}'s bias {ref.name} is shared with other nodes"
            consts.insert(1, (ref.name, len(ref.shape) - 1))
    if any(ctx.shape(q.outputs[0]) is None for q in way):
        return None, "a tensor on the way to the MatMul has no known shape"
    if any(q.op in RESHAPE_OPS for q in way) and int(np.prod(shape0)) > _MAX_IDS:
        return None, f"{cur.name} is too large to follow its columns through reshapes"
    ids = np.broadcast_to(np.arange(n, dtype=np.int64), shape0)
    for q in reversed(way):
        if q.op in RESHAPE_OPS:
            ids = ids.reshape(ctx.shape(q.outputs[0]))
        elif q.op == "Transpose":
            ids = ids.transpose(list(q.attrs.get("perm", range(ids.ndim)[::-1])))
    if not any(_varies(ids, ax) for ax in cut_axes):
        return None, f"the cut does not separate {p.op} {p.name}'s columns"
    return FusedView(consts, ids, n), ""


def rule_part_cut(b: _Builder, t: gs.Tensor, view: FusedView) -> NodeRule:
    """A cut of a fused projection's output ``t`` into parts: each output of this node reads the part of the
    constants in ``view`` that the cut selects (see the module docstring); ``t`` itself is cut apart, so it blocks."""
    ctx = b.ctx
    owner = np.full(view.n, -1, dtype=np.int64)  # column -> index of the part that reads it
    parts: dict[tuple[tuple[int, ...], tuple[int, ...]], int] = {}
    mine: list[tuple[gs.Tensor, tuple[int, ...], tuple[int, ...]]] = []
    for reader in t.outputs:
        if reader.op in _SHAPE_READS:
            continue
        cuts = _cut(reader, ctx, view.ids) if reader.inputs and reader.inputs[0] is t else None
        if cuts is None:
            return b.block_all(f"{b.node.op} of a fused projection's output that is also read whole by {reader.op} "
                               f"{reader.name}")
        for y, ids in cuts:
            core = _core(ids)
            key = (core.shape, tuple(core.ravel().tolist()))
            if len(set(key[1])) != core.size:
                return b.block_all(f"{b.node.op}: {reader.op} {reader.name} reads a fused column twice")
            if key not in parts:
                parts[key] = len(parts)
                if (owner[core.ravel()] >= 0).any():
                    return b.block_all(f"{b.node.op}: {reader.op} {reader.name} cuts a part that overlaps another")
                owner[core.ravel()] = parts[key]
            if reader is b.node:
                mine.append((y, *key))
    for y, shape, positions in mine:
        for const, axis in view.consts:
            b.rule.links.append(Link("bcast", [ConstPart(const, axis, shape, positions)], ctx.item(y), [shape],
                                     ctx.shape(y)))
    b.rule.blocked[ctx.item(t)] = f"{b.node.op} cuts it into parts (each folds into its columns of the projection)"
    b.neutral(*b.ins[1:])
    return b.rule


def rule_slice(b: _Builder) -> NodeRule:
    slices = _slice_bounds(b.node, b.ctx)
    if slices is None:
        return b.block_all("Slice with bounds of unknown value")
    axes = _sliced_axes(slices, b.ctx.shape(b.ins[0]))
    rank = len(slices)
    if axes:
        view, why = fused_view(b.ctx, b.ins[0], axes)
        if view is not None:
            return rule_part_cut(b, b.ins[0], view)
        if rank - 1 in axes:
            return b.block_all(f"Slice along the channel axis ({why})")
    b.neutral(*[t for t in b.node.inputs[1:] if t.name])
    slices[-1] = slice(None)
    b.link("slice", [b.ins[0]], b.outs[0], slices=tuple(slices))
    return b.rule


def rule_split(b: _Builder) -> NodeRule:
    rank = len(b.ctx.shape(b.ins[0]))
    axis = int(b.node.attrs.get("axis", 0)) % rank
    if any(b.ctx.shape(o) is None for o in b.node.outputs if o.name):
        return b.block_all("Split into parts of unknown size")
    view, why = fused_view(b.ctx, b.ins[0], [axis])
    if view is not None:
        return rule_part_cut(b, b.ins[0], view)
    if axis == rank - 1:
        return b.block_all(f"Split along the channel axis ({why})")
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

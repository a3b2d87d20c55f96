"""Analysis pass: prunable weights and permutation closures.

Rewrite: none (read-only). Result: a :class:`Plan` listing every prunable weight (its K axis, whether it can be
masked, and why not) and every *closure*: the set of tensors whose channel axis must carry the same permutation for a
permutation of a weight's input rows to be free at run time.

How closures are found. Every activation tensor and every constant axis is an *item*. Each node relates the items it
touches (``_node_rule``): elementwise ops, norms over the last axis, head reshapes, attention's ``probs @ V`` pass a
permutation from input to output; a MatMul with a constant weight absorbs it (rows of the weight on the input side,
columns on the output side); Shape and reductions over the channel axis are neutral; anything else *blocks* (a
boundary). A breadth-first walk over these relations gives each closure's items.

Invariant that proves a fold correct. Inside a closure, let ``b`` be the gcd of all channel-axis lengths. Every item's
channel axis is cut into aligned blocks of ``b``; each node's relation maps blocks of its inputs to blocks of its
outputs (a reshape keeps aligned blocks contiguous because both last dimensions are multiples of ``b``; a transpose that
keeps the last axis moves whole blocks). Union-find over all blocks of all items gives *classes*. If every block of one
class is permuted by the same permutation of ``b`` elements, every node commutes with the change: elementwise ops see
both operands permuted alike, norms and softmax are permutation-equivariant over the channel axis, reductions over it
are invariant, and a weight whose rows (resp. columns) are permuted alike reads (resp. writes) the permuted activation.
So the network function is unchanged. The canonical channel space of a closure is ``classes × b``; heads that share a
KV head (GQA) share a class, which is how tied blocks arise.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import onnx_graphsurgeon as gs

from permsparse.passes.graph import WeightChain, const_index, const_of, opset_of, resolve_weight
from permsparse.passes.probe import Probe

log = logging.getLogger(__name__)

#: An item: ("t", tensor name) for activations, ("c", constant name, axis) for a constant's axis.
Item = tuple

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
SYMMETRIC_REDUCE_OPS = frozenset(
    "ReduceMean ReduceSum ReduceSumSquare ReduceL1 ReduceL2 ReduceMax ReduceMin ReduceProd ReduceLogSum "
    "ReduceLogSumExp".split()
)
RESHAPE_OPS = frozenset(["Reshape", "Flatten", "Squeeze", "Unsqueeze"])


@dataclass(frozen=True)
class WeightInfo:
    """A MatMul/Gemm reading a constant 2-D weight."""

    name: str  # the MatMul/Gemm node name
    op: str
    const: str  # stored constant name
    stored_shape: tuple[int, ...]
    k_axis: int  # axis of the stored constant that is the reduction axis K
    k: int
    n: int
    input: str  # the activation read as A
    output: str
    via: tuple[str, ...]
    prunable: bool
    reason: str | None  # why not prunable
    head: bool = False  # writes a graph output (classifier / lm_head): kept dense unless asked


@dataclass(frozen=True)
class Boundary:
    """Where a closure meets something that does not commute with a channel permutation."""

    item: Item
    node: str | None  # node name, or None for a graph input/output
    side: Literal["consumer", "producer", "constant"]
    reason: str


@dataclass(frozen=True)
class Member:
    """A constant axis that is permuted when the closure is: weight rows/cols, bias, norm parameters, tables."""

    const: str
    axis: int
    role: Literal["rows", "cols", "param", "table"]
    block_map: np.ndarray  # canonical class of each block of ``block`` along ``axis``


@dataclass
class Closure:
    """One permutation closure."""

    id: int
    items: list[Item]
    block: int
    n_classes: int
    members: list[Member]
    boundaries: list[Boundary]
    siblings: list[str]  # names of weights whose rows are in this closure (prunable or not)
    groups: dict[str, list[str]]  # activation tensor -> weights reading it directly as A
    labels: dict[str, np.ndarray] = field(default_factory=dict)  # activation -> class of each channel block
    nodes: set[str] = field(default_factory=set)  # nodes that carry the permutation (not blocked, not neutral)
    problem: str | None = None  # set when the closure cannot be permuted at all

    @property
    def k(self) -> int:
        return self.n_classes * self.block

    @property
    def foldable(self) -> bool:
        return self.problem is None and not self.boundaries

    def describe(self) -> str:
        if self.problem:
            return f"cannot be permuted: {self.problem}"
        if not self.boundaries:
            return "folds for free"
        first = self.boundaries[0]
        more = f" (+{len(self.boundaries) - 1} more)" if len(self.boundaries) > 1 else ""
        return f"blocked: {first.reason}{more}"


@dataclass
class Plan:
    """Result of the analysis."""

    weights: dict[str, WeightInfo]
    closures: list[Closure]
    weight_closure: dict[str, int]  # weight name -> closure id of its rows
    n: int
    m: int

    def closure_of(self, weight: str) -> Closure | None:
        cid = self.weight_closure.get(weight)
        return None if cid is None else self.closures[cid]


@dataclass
class _Link:
    kind: str  # bcast | reshape | transpose | matmul_b | concat | take | slice | split | reduce
    srcs: list[Item]
    dst: Item
    src_shapes: list[tuple[int, ...]]
    dst_shape: tuple[int, ...]
    info: dict = field(default_factory=dict)


@dataclass
class _NodeRule:
    links: list[_Link] = field(default_factory=list)
    blocked: dict[Item, str] = field(default_factory=dict)
    neutral: set = field(default_factory=set)

    def items(self) -> Iterable[Item]:
        for link in self.links:
            yield from link.srcs
            yield link.dst
        yield from self.blocked
        yield from self.neutral


class _Ctx:
    """Shapes and constants for rule construction."""

    def __init__(self, graph: gs.Graph, probe: Probe):
        self.graph = graph
        self.probe = probe
        self.opset = opset_of(graph)

    def shape(self, t: gs.Tensor) -> tuple[int, ...] | None:
        ref = const_of(t)
        if ref is not None:
            return ref.shape
        s = self.probe.shapes.get(t.name)
        return None if s is None else tuple(s)

    def item(self, t: gs.Tensor) -> Item:
        ref = const_of(t)
        if ref is not None:
            return ("c", ref.name, len(ref.shape) - 1)
        return ("t", t.name)

    def value(self, t: gs.Tensor) -> np.ndarray | None:
        ref = const_of(t)
        if ref is not None:
            return ref.values
        return self.probe.values.get(t.name)


def _last(shape: tuple[int, ...] | None) -> int | None:
    return None if not shape else shape[-1]


def _invariant(shape: tuple[int, ...] | None) -> bool:
    return shape is not None and (len(shape) == 0 or shape[-1] == 1)


def _axes(node: gs.Node, ctx: _Ctx, rank: int) -> list[int] | None:
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


def _node_rule(node: gs.Node, ctx: _Ctx, chains: Mapping[str, WeightChain]) -> _NodeRule:
    """How ``node`` relates the items it touches. Unknown ops block everything they touch."""
    rule = _NodeRule()
    op = node.op
    ins = [t for t in node.inputs if t.name]
    outs = [t for t in node.outputs if t.name]

    def link(kind: str, srcs: list[gs.Tensor], dst: gs.Tensor, **info) -> None:
        rule.links.append(
            _Link(kind, [ctx.item(s) for s in srcs], ctx.item(dst), [ctx.shape(s) for s in srcs], ctx.shape(dst), info)
        )

    def block_all(reason: str) -> _NodeRule:
        blocked = _NodeRule()
        for t in ins + outs:
            ref = const_of(t)
            if ref is not None:
                for ax in range(len(ref.shape)):
                    blocked.blocked[("c", ref.name, ax)] = reason
            else:
                blocked.blocked[("t", t.name)] = reason
        return blocked

    if op == "Constant" or not outs:
        return rule
    if any(ctx.shape(t) is None for t in ins[:1] + outs[:1]):
        return block_all(f"{op} has a tensor of unknown shape")
    out = outs[0]
    out_shape = ctx.shape(out)

    if op in ("Shape", "Size"):
        rule.neutral.add(ctx.item(ins[0]))
        return rule

    if op in UNARY_OPS:
        link("bcast", [ins[0]], out)
        for extra in outs[1:]:  # Dropout's mask
            link("bcast", [ins[0]], extra)
        for t in ins[1:]:
            rule.neutral.add(ctx.item(t))
        return rule

    if op in ELEMENTWISE_OPS:
        out_last = _last(out_shape)
        if out_last is None or out_last == 1:
            return block_all(f"{op} output has no channel axis")
        for t in ins:
            s = ctx.shape(t)
            if _invariant(s):
                rule.neutral.add(ctx.item(t))
            elif _last(s) == out_last:
                link("bcast", [t], out)
            else:
                rule.blocked[ctx.item(t)] = f"{op} broadcasts along the channel axis"
        return rule

    if op in NORM_OPS:
        rank = len(ctx.shape(ins[0]))
        axis = int(node.attrs.get("axis", -1)) % rank
        if axis != rank - 1:
            return block_all(f"{op} normalizes over more than the channel axis")
        link("bcast", [ins[0]], out)
        for t in ins[1:]:
            s = ctx.shape(t)
            if _invariant(s):
                rule.neutral.add(ctx.item(t))
            else:
                link("bcast", [t], out)
        for t in outs[1:]:
            rule.neutral.add(ctx.item(t))
        return rule

    if op in ("Softmax", "LogSoftmax"):
        rank = len(out_shape)
        axis = int(node.attrs.get("axis", -1 if ctx.opset >= 13 else 1)) % max(rank, 1)
        if ctx.opset < 13 and axis != rank - 1:
            return block_all(f"{op} (opset < 13) flattens the channel axis with others")
        link("bcast", [ins[0]], out)
        return rule

    if op in SYMMETRIC_REDUCE_OPS:
        rank = len(ctx.shape(ins[0]))
        axes = _axes(node, ctx, rank)
        if axes is None:
            return block_all(f"{op} has run-time axes")
        if not axes and not int(node.attrs.get("noop_with_empty_axes", 0)):
            axes = list(range(rank))
        for t in ins[1:]:
            rule.neutral.add(ctx.item(t))
        if rank - 1 in axes:
            rule.neutral.add(ctx.item(ins[0]))  # reduced over channels: the result carries no permutation
            return rule
        link("reduce", [ins[0]], out, axes=axes, keepdims=bool(node.attrs.get("keepdims", 1)))
        return rule

    if op in ("MatMul", "Gemm"):
        a, b = ins[0], ins[1]
        chain = chains.get(node.name)
        if chain is not None:
            if const_of(a) is not None:
                return block_all(f"{op} with two constant inputs")
            k_item = ("c", chain.const.name, chain.k_axis)
            n_item = ("c", chain.const.name, chain.n_axis)
            a_shape = ctx.shape(a)
            rule.links.append(_Link("bcast", [k_item], ctx.item(a), [(chain.const.shape[chain.k_axis],)], a_shape))
            rule.links.append(_Link("bcast", [n_item], ctx.item(out), [(chain.const.shape[chain.n_axis],)], out_shape))
            if op == "Gemm" and len(ins) > 2:
                c_shape = ctx.shape(ins[2])
                if _invariant(c_shape):
                    rule.neutral.add(ctx.item(ins[2]))
                elif len(c_shape) == 1 or (len(c_shape) == 2 and c_shape[0] == 1):
                    link("bcast", [ins[2]], out)
                else:
                    rule.blocked[ctx.item(ins[2])] = "Gemm bias is not broadcast along rows"
                    rule.blocked[ctx.item(out)] = "Gemm bias is not broadcast along rows"
            return rule
        if op == "Gemm":
            return block_all("Gemm whose B is not a constant 2-D weight")
        a_shape, b_shape = ctx.shape(a), ctx.shape(b)
        if len(b_shape) < 2 or len(a_shape) < 2:
            return block_all("MatMul with a vector operand")
        rule.blocked[ctx.item(a)] = "contracted by a MatMul with a run-time B"
        link("matmul_b", [b], out)
        return rule

    if op == "Gather":
        data, idx = ins[0], ins[1]
        rank = len(ctx.shape(data))
        axis = int(node.attrs.get("axis", 0)) % rank
        rule.neutral.add(ctx.item(idx))
        if axis == rank - 1:
            return block_all("Gather along the channel axis")
        ref = const_of(data)
        if ref is not None:
            if rank != 2 or axis != 0:
                return block_all("Gather from a constant that is not a 2-D table")
            rule.links.append(_Link("bcast", [("c", ref.name, 1)], ctx.item(out), [(ref.shape[1],)], out_shape))
            return rule
        indices = ctx.value(idx)
        if indices is None:
            return block_all("Gather with indices of unknown value")
        link("take", [data], out, axis=axis, indices=np.asarray(indices))
        return rule

    if op in RESHAPE_OPS:
        in_last, out_last = _last(ctx.shape(ins[0])), _last(out_shape)
        for t in ins[1:]:
            rule.neutral.add(ctx.item(t))
        if not in_last or not out_last or out_last == 1 or in_last == 1:
            return block_all(f"{op} moves the channel axis")
        if math.gcd(in_last, out_last) < min(in_last, out_last) and in_last % out_last and out_last % in_last:
            return block_all(f"{op} regroups the channel axis ({in_last} -> {out_last})")
        link("reshape", [ins[0]], out)
        return rule

    if op == "Transpose":
        rank = len(out_shape)
        perm = list(node.attrs.get("perm", list(range(rank))[::-1]))
        if perm[-1] != rank - 1:
            return block_all("Transpose moves the channel axis")
        link("transpose", [ins[0]], out, perm=perm)
        return rule

    if op == "Expand":
        rule.neutral.add(ctx.item(ins[1]))
        if _last(ctx.shape(ins[0])) != _last(out_shape):
            return block_all("Expand broadcasts along the channel axis")
        link("bcast", [ins[0]], out)
        return rule

    if op == "Concat":
        rank = len(out_shape)
        axis = int(node.attrs.get("axis", 0)) % rank
        if axis == rank - 1:
            return block_all("Concat along the channel axis")
        link("concat", ins, out, axis=axis)
        return rule

    if op == "Slice":
        rank = len(ctx.shape(ins[0]))
        vals = [
            ctx.value(node.inputs[i]) if i < len(node.inputs) and node.inputs[i].name else None for i in range(1, 5)
        ]
        starts, ends = vals[0], vals[1]
        if starts is None or ends is None:
            return block_all("Slice with bounds of unknown value")
        axes = [int(a) % rank for a in np.ravel(vals[2])] if vals[2] is not None else list(range(len(np.ravel(starts))))
        steps = [int(s) for s in np.ravel(vals[3])] if vals[3] is not None else [1] * len(axes)
        slices = [slice(None)] * rank
        in_shape = ctx.shape(ins[0])
        for ax, st, en, sp in zip(axes, np.ravel(starts), np.ravel(ends), steps):
            slices[ax] = slice(int(st), int(en), sp)
            if ax == rank - 1 and range(in_shape[-1])[slices[ax]] != range(in_shape[-1]):
                return block_all("Slice along the channel axis")
        for t in node.inputs[1:]:
            if t.name:
                rule.neutral.add(ctx.item(t))
        slices[rank - 1] = slice(None)
        link("slice", [ins[0]], out, slices=tuple(slices))
        return rule

    if op == "Split":
        rank = len(ctx.shape(ins[0]))
        axis = int(node.attrs.get("axis", 0)) % rank
        if axis == rank - 1:
            return block_all("Split along the channel axis")
        for t in ins[1:]:
            rule.neutral.add(ctx.item(t))
        start = 0
        for o in outs:
            size = ctx.shape(o)[axis]
            sl = [slice(None)] * rank
            sl[axis] = slice(start, start + size)
            start += size
            link("slice", [ins[0]], o, slices=tuple(sl))
        return rule

    return block_all(f"{op} is not known to commute with a channel permutation")


class _UnionFind:
    def __init__(self, n: int):
        self.parent = np.arange(n)

    def find(self, x: int) -> int:
        root = x
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[x] != root:
            self.parent[x], x = root, self.parent[x]
        return int(root)

    def union_arrays(self, a: np.ndarray, b: np.ndarray) -> None:
        for x, y in zip(a.ravel().tolist(), b.ravel().tolist()):
            rx, ry = self.find(x), self.find(y)
            if rx != ry:
                self.parent[max(rx, ry)] = min(rx, ry)


def analyze(
    graph: gs.Graph,
    probe: Probe,
    *,
    n: int = 2,
    m: int = 4,
    prune_head: bool = False,
    exclude: Iterable[str] = (),
) -> Plan:
    """Find prunable weights and permutation closures (see the module docstring for the rules and the invariant)."""
    import re

    excludes = [re.compile(p) for p in exclude]
    graph_outputs = {t.name for t in graph.outputs}
    graph_inputs = {t.name for t in graph.inputs}

    # 1. Weights read by MatMul/Gemm through a resolvable chain.
    chains: dict[str, WeightChain] = {}
    chain_nodes: set[int] = set()  # Transpose/Cast nodes on a weight's way to MatMul
    weights: dict[str, WeightInfo] = {}
    readers: dict[str, int] = {}
    for node in graph.nodes:
        for t in node.inputs:
            ref = const_of(t)
            if ref is not None:
                readers[ref.name] = readers.get(ref.name, 0) + 1
    for i, node in enumerate(graph.nodes):
        if not node.name:
            node.name = f"{node.op}_{i}"
    for node in graph.nodes:
        if node.op not in ("MatMul", "Gemm") or len(node.inputs) < 2:
            continue
        if node.op == "Gemm" and int(node.attrs.get("transA", 0)):
            continue
        chain = resolve_weight(node.inputs[1], trans=node.op == "Gemm" and bool(int(node.attrs.get("transB", 0))))
        if chain is None:
            continue
        chains[node.name] = chain
        chain_nodes.update(id(x) for x in _chain_nodes(node))
        k = chain.const.shape[chain.k_axis]
        nn = chain.const.shape[chain.n_axis]
        reason = None
        dtype = np.dtype(chain.const.tensor.dtype)
        if dtype != np.float32:
            reason = f"weight dtype {dtype} (only float32 weights are masked)"
        elif k % m:
            reason = f"K={k} is not divisible by M={m}"
        elif readers.get(chain.const.name, 0) > 1:
            reason = f"the weight is shared by {readers[chain.const.name]} readers"
        out = node.outputs[0]
        head = _feeds_graph_output(out, graph_outputs)
        if reason is None and head and not prune_head:
            reason = "writes a graph output (head); use --prune-head to prune it"
        if reason is None and any(p.search(node.name) or p.search(chain.const.name) for p in excludes):
            reason = "excluded by --exclude"
        weights[node.name] = WeightInfo(
            name=node.name,
            op=node.op,
            const=chain.const.name,
            stored_shape=chain.const.shape,
            k_axis=chain.k_axis,
            k=k,
            n=nn,
            input=node.inputs[0].name,
            output=out.name,
            via=chain.via,
            prunable=reason is None,
            reason=reason,
            head=head,
        )

    # 2. Node rules, and for each item the nodes that mention it.
    ctx = _Ctx(graph, probe)
    rules: list[_NodeRule] = []
    touching: dict[Item, list[int]] = {}
    nodes = list(graph.nodes)
    for idx, node in enumerate(nodes):
        # Transpose/Cast nodes on a weight's way to MatMul are accounted for by the MatMul's rule.
        rule = _NodeRule() if id(node) in chain_nodes else _node_rule(node, ctx, chains)
        rules.append(rule)
        for it in set(rule.items()):
            touching.setdefault(it, []).append(idx)
    const_shapes = {name: ref.shape for name, ref in const_index(graph).items()}
    # 3. Closures, seeded from the input of every weight.
    seen: dict[Item, int] = {}
    closures: list[Closure] = []
    weight_closure: dict[str, int] = {}
    for w in weights.values():
        seed = ("t", w.input)
        if seed in seen:
            weight_closure[w.name] = seen[seed]
            continue
        cid = len(closures)
        items, node_ids, boundaries = _walk(seed, rules, touching, nodes, graph_inputs, graph_outputs, seen, cid)
        closure = _build_closure(cid, items, node_ids, boundaries, rules, nodes, chains, weights, ctx, m, const_shapes)
        closures.append(closure)
        weight_closure[w.name] = cid
    return Plan(weights=weights, closures=closures, weight_closure=weight_closure, n=n, m=m)


def _chain_nodes(node: gs.Node) -> list[gs.Node]:
    found = []
    cur = node.inputs[1]
    while const_of(cur) is None and len(cur.inputs) == 1:
        found.append(cur.inputs[0])
        cur = cur.inputs[0].inputs[0]
    return found


def _feeds_graph_output(t: gs.Tensor, graph_outputs: set[str]) -> bool:
    """True if ``t`` is a graph output, directly or through a bias Add/Identity/Reshape."""
    frontier = [t]
    for _ in range(3):
        nxt = []
        for x in frontier:
            if x.name in graph_outputs:
                return True
            for c in x.outputs:
                if c.op in ("Add", "Identity", "Reshape", "Cast", "Squeeze", "Flatten"):
                    nxt.extend(c.outputs)
        frontier = nxt
    return False


def _walk(seed, rules, touching, nodes, graph_inputs, graph_outputs, seen, cid):
    items: list[Item] = []
    node_ids: set[int] = set()
    boundaries: list[Boundary] = []
    queue = deque([seed])
    seen[seed] = cid
    while queue:
        it = queue.popleft()
        items.append(it)
        if it[0] == "t":
            if it[1] in graph_inputs:
                boundaries.append(Boundary(it, None, "producer", f"graph input {it[1]!r}"))
            if it[1] in graph_outputs:
                boundaries.append(Boundary(it, None, "consumer", f"graph output {it[1]!r}"))
        for idx in touching.get(it, []):
            rule = rules[idx]
            node = nodes[idx]
            if it in rule.blocked:
                side = "constant" if it[0] == "c" else (
                    "producer" if any(o.name == it[1] for o in node.outputs) else "consumer")
                boundaries.append(Boundary(it, node.name, side, f"{rule.blocked[it]} (node {node.name})"))
                continue
            if it in rule.neutral:
                continue
            node_ids.add(idx)
            for link in rule.links:
                group = link.srcs + [link.dst]
                if it in group:
                    for other in group:
                        if other not in seen:
                            seen[other] = cid
                            queue.append(other)
    return items, node_ids, boundaries


def _item_shape(it: Item, ctx: _Ctx, const_shapes: Mapping[str, tuple[int, ...]]) -> tuple[int, ...]:
    if it[0] == "t":
        return tuple(ctx.probe.shapes[it[1]])
    return (const_shapes[it[1]][it[2]],)


def _build_closure(cid, items, node_ids, boundaries, rules, nodes, chains, weights, ctx, m, const_shapes) -> Closure:
    shapes = {it: _item_shape(it, ctx, const_shapes) for it in items}
    lasts = [s[-1] for s in shapes.values() if s]
    block = 0
    for d in lasts:
        block = math.gcd(block, d)
    siblings = sorted({w.name for w in weights.values() if ("t", w.input) in shapes})
    groups: dict[str, list[str]] = {}
    for w in weights.values():
        if ("t", w.input) in shapes:
            groups.setdefault(w.input, []).append(w.name)
    closure = Closure(cid, items, block, 0, [], boundaries, siblings, groups, nodes={nodes[i].name for i in node_ids})
    if block % m:
        closure.problem = f"channel blocks of {block} are not a multiple of M={m}"
        return closure

    # Label arrays: one id per (item, position outside the channel axis, channel block).
    offsets: dict[Item, int] = {}
    lshape: dict[Item, tuple[int, ...]] = {}
    total = 0
    for it, s in shapes.items():
        ls = s[:-1] + (s[-1] // block,) if it[0] == "t" else (s[0] // block,)
        lshape[it] = ls
        offsets[it] = total
        total += int(np.prod(ls))
    uf = _UnionFind(total)

    def labels(it: Item) -> np.ndarray:
        return np.arange(offsets[it], offsets[it] + int(np.prod(lshape[it]))).reshape(lshape[it])

    def view(it: Item, shape: tuple[int, ...]) -> np.ndarray:
        lab = labels(it)
        if it[0] == "c":  # a constant's permutation is the same at every position of its other axes
            lab = lab.reshape((1,) * (len(shape) - 1) + lab.shape)
            lab = np.broadcast_to(lab, tuple(shape[:-1]) + lab.shape[-1:])
        return lab

    try:
        for idx in sorted(node_ids):
            for link in rules[idx].links:
                if not all(s in shapes for s in link.srcs + [link.dst]):
                    continue
                dst_shape = link.dst_shape if link.dst[0] == "t" else shapes[link.dst]
                dst = view(link.dst, dst_shape)
                srcs = [view(s, sh) for s, sh in zip(link.srcs, link.src_shapes)]
                got = _transform(link, srcs, dst.shape, uf)
                uf.union_arrays(np.broadcast_to(got, dst.shape), dst)
    except (ValueError, IndexError) as exc:
        closure.problem = f"inconsistent channel structure ({exc})"
        return closure

    # Classes, numbered in order of first appearance along sibling weights' rows.
    roots: dict[int, int] = {}

    def cls(arr: np.ndarray) -> np.ndarray:
        out = np.empty(arr.size, dtype=np.int64)
        for i, x in enumerate(arr.ravel().tolist()):
            r = uf.find(x)
            if r not in roots:
                roots[r] = len(roots)
            out[i] = roots[r]
        return out.reshape(arr.shape)

    members: list[Member] = []
    roles: dict[tuple[str, int], str] = {}
    for chain in chains.values():
        roles[(chain.const.name, chain.k_axis)] = "rows"
        roles.setdefault((chain.const.name, chain.n_axis), "cols")
    for it in items:
        if it[0] == "c":
            role = roles.get((it[1], it[2]))
            if role is None:
                role = "table" if len(const_shapes[it[1]]) == 2 and it[2] == 1 and (it[1], 0) not in roles else "param"
            members.append(Member(it[1], it[2], role, None))  # type: ignore[arg-type]
    # rows first so canonical classes follow the siblings' row order
    members.sort(key=lambda mb: {"rows": 0, "cols": 1, "table": 2, "param": 3}[mb.role])
    members = [Member(mb.const, mb.axis, mb.role, cls(labels(("c", mb.const, mb.axis)))) for mb in members]
    closure.members = members
    closure.labels = {it[1]: cls(labels(it)) for it in items if it[0] == "t"}
    closure.n_classes = len(roots)
    return closure


def _transform(link: _Link, srcs: list[np.ndarray], dst_shape: tuple[int, ...], uf: _UnionFind) -> np.ndarray:
    """Labels of the destination computed from the sources' labels (see the module docstring)."""
    kind = link.kind
    src = srcs[0]
    if kind == "bcast":
        return np.broadcast_to(src, dst_shape)
    if kind == "reshape":
        return src.reshape(dst_shape)
    if kind == "transpose":
        return src.transpose(link.info["perm"])
    if kind == "matmul_b":
        # B's permutation must not depend on its row (the contracted axis): tie all rows together.
        first = src[..., :1, :]
        uf.union_arrays(np.broadcast_to(first, src.shape), src)
        return np.broadcast_to(first, dst_shape)
    if kind == "concat":
        return np.concatenate(srcs, axis=link.info["axis"])
    if kind == "take":
        return np.take(src, link.info["indices"], axis=link.info["axis"])
    if kind == "slice":
        return src[link.info["slices"]]
    if kind == "reduce":
        axes = link.info["axes"]
        first = src
        for ax in axes:
            first = np.take(first, [0], axis=ax)
        uf.union_arrays(np.broadcast_to(first, src.shape), src)
        return first if link.info["keepdims"] else first.squeeze(axis=tuple(axes))
    raise ValueError(f"unknown link kind {kind}")

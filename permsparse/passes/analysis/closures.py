"""The closure solver: a breadth-first walk over the node rules, then a union-find over channel blocks.

Starting from a weight's input tensor, the walk follows every link of every node touching an item (in both
directions) and stops at blocked items (recorded as boundaries) and neutral ones. Then, with ``b`` the gcd of all
channel lengths of the closure, every item's channel axis is cut into aligned blocks of ``b``; each link maps the
sources' block labels to the destination's (:func:`transform`) and a union-find merges them into *classes*. The
canonical channel space of the closure is ``classes × b``.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence

import numpy as np
import onnx_graphsurgeon as gs

from permsparse.ir.graph import WeightChain
from permsparse.ir.weights import WeightInfo
from permsparse.passes.analysis.plan import (
    Boundary,
    Closure,
    ConstAxis,
    ConstPart,
    Item,
    Member,
    TensorItem,
)
from permsparse.passes.analysis.rules import Ctx, Link, NodeRule


class UnionFind:
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


def walk(
    seed: Item,
    rules: Sequence[NodeRule],
    touching: Mapping[Item, list[int]],
    nodes: Sequence[gs.Node],
    graph_inputs: set[str],
    graph_outputs: set[str],
    seen: dict[Item, int],
    cid: int,
) -> tuple[list[Item], set[int], list[Boundary]]:
    """Items, carrying nodes and boundaries of the closure grown from ``seed``; marks items ``seen`` with ``cid``."""
    items: list[Item] = []
    node_ids: set[int] = set()
    boundaries: list[Boundary] = []
    queue = deque([seed])
    seen[seed] = cid
    while queue:
        it = queue.popleft()
        items.append(it)
        if isinstance(it, TensorItem):
            if it.name in graph_inputs:
                boundaries.append(Boundary(it, None, "producer", f"graph input {it.name!r}"))
            if it.name in graph_outputs:
                boundaries.append(Boundary(it, None, "consumer", f"graph output {it.name!r}"))
        for idx in touching.get(it, []):
            rule = rules[idx]
            node = nodes[idx]
            if it in rule.blocked:
                if isinstance(it, (ConstAxis, ConstPart)):
                    side = "constant"
                else:
                    side = "producer" if any(o.name == it.name for o in node.outputs) else "consumer"
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


def _item_shape(it: Item, ctx: Ctx, const_shapes: Mapping[str, tuple[int, ...]]) -> tuple[int, ...]:
    if isinstance(it, TensorItem):
        return tuple(ctx.probe.shapes[it.name])
    if isinstance(it, ConstPart):
        return it.shape
    return (const_shapes[it.const][it.axis],)


def build_closure(
    cid: int,
    items: list[Item],
    node_ids: set[int],
    boundaries: list[Boundary],
    rules: Sequence[NodeRule],
    nodes: Sequence[gs.Node],
    chains: Mapping[str, WeightChain],
    weights: Mapping[str, WeightInfo],
    ctx: Ctx,
    m: int,
    const_shapes: Mapping[str, tuple[int, ...]],
) -> Closure:
    shapes = {it: _item_shape(it, ctx, const_shapes) for it in items}
    block = 0
    for s in shapes.values():
        if s:
            block = math.gcd(block, s[-1])
    siblings = sorted({w.name for w in weights.values() if TensorItem(w.input) in shapes})
    groups: dict[str, list[str]] = {}
    for w in weights.values():
        if TensorItem(w.input) in shapes:
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
        ls = s[:-1] + (s[-1] // block,)
        lshape[it] = ls
        offsets[it] = total
        total += int(np.prod(ls))
    uf = UnionFind(total)

    def labels(it: Item) -> np.ndarray:
        return np.arange(offsets[it], offsets[it] + int(np.prod(lshape[it]))).reshape(lshape[it])

    def view(it: Item, shape: tuple[int, ...]) -> np.ndarray:
        lab = labels(it)
        if isinstance(it, ConstAxis):  # a constant's permutation is the same at every position of its other axes
            lab = lab.reshape((1,) * (len(shape) - 1) + lab.shape)
            lab = np.broadcast_to(lab, tuple(shape[:-1]) + lab.shape[-1:])
        return lab

    try:
        for idx in sorted(node_ids):
            for link in rules[idx].links:
                if not all(s in shapes for s in link.srcs + [link.dst]):
                    continue
                dst_shape = link.dst_shape if isinstance(link.dst, TensorItem) else shapes[link.dst]
                dst = view(link.dst, dst_shape)
                srcs = [view(s, sh) for s, sh in zip(link.srcs, link.src_shapes)]
                got = transform(link, srcs, dst.shape, uf)
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

    roles: dict[tuple[str, int], str] = {}
    for chain in chains.values():
        roles[(chain.const.name, chain.k_axis)] = "rows"
        roles.setdefault((chain.const.name, chain.n_axis), "cols")
    members: list[tuple[Item, str]] = []
    for it in items:
        if isinstance(it, ConstAxis):
            role = roles.get((it.const, it.axis))
            if role is None:
                is_table = len(const_shapes[it.const]) == 2 and it.axis == 1 and (it.const, 0) not in roles
                role = "table" if is_table else "param"
            members.append((it, role))
        elif isinstance(it, ConstPart):  # a part of a fused projection's columns, or of its bias
            members.append((it, roles.get((it.const, it.axis), "param")))
    # rows first so canonical classes follow the siblings' row order
    members.sort(key=lambda mb: {"rows": 0, "cols": 1, "table": 2, "param": 3}[mb[1]])
    closure.members = [
        Member(it.const, it.axis, role, cls(labels(it)),  # type: ignore[arg-type]
               np.asarray(it.positions, dtype=np.int64).reshape(it.shape) if isinstance(it, ConstPart) else None)
        for it, role in members
    ]
    closure.labels = {it.name: cls(labels(it)) for it in items if isinstance(it, TensorItem)}
    closure.n_classes = len(roots)
    return closure


def transform(link: Link, srcs: list[np.ndarray], dst_shape: tuple[int, ...], uf: UnionFind) -> np.ndarray:
    """Labels of the destination computed from the sources' labels."""
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

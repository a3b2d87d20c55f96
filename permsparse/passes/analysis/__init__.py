"""Analysis pass: prunable weights and permutation closures.

Rewrite: none (read-only; the graph's nodes must be named, see :mod:`permsparse.passes.names`). Result: a
:class:`Plan` listing every weight (its K axis, whether it can be masked, and why not) and every *closure*: the set of
tensors whose channel axis must carry the same permutation for a permutation of a weight's input rows to be free at
run time.

How closures are found. Every activation tensor and every constant axis is an *item*. Each node relates the items it
touches (:mod:`.rules`, one rule per op): elementwise ops, norms over the last axis, head reshapes, attention's
``probs @ V`` pass a permutation from input to output; a MatMul with a constant weight absorbs it (rows of the weight
on the input side, columns on the output side); a Slice/Split/Gather that cuts a fused projection's output into parts
links each part to the projection's columns (and bias) that hold it (:func:`.rules.rule_part_cut`);
Shape and reductions over the channel axis are neutral; anything else *blocks* (a boundary). A breadth-first walk
over these relations gives each closure's items (:mod:`.closures`).

Invariant that proves a fold correct. Inside a closure, let ``b`` be the gcd of all channel-axis lengths. Every item's
channel axis is cut into aligned blocks of ``b``; each node's relation maps blocks of its inputs to blocks of its
outputs (a reshape keeps aligned blocks contiguous because both last dimensions are multiples of ``b``; a transpose that
keeps the last axis moves whole blocks). Union-find over all blocks of all items gives *classes*. If every block of one
class is permuted by the same permutation of ``b`` elements, every node commutes with the change: elementwise ops see
both operands permuted alike, norms and softmax are permutation-equivariant over the channel axis, reductions over it
are invariant, and a weight whose rows (resp. columns) are permuted alike reads (resp. writes) the permuted activation.
So the network function is unchanged. The canonical channel space of a closure is ``classes × b``; heads that share a
KV head (GQA) share a class, which is how tied blocks arise.

Postconditions (checked): every weight belongs to exactly one closure, whose rows member covers a prunable one; every
closure without a problem has a block size that is a multiple of M; no channel of a constant is a member of two
closures, nor of two parts of one closure (a fused projection's parts are disjoint).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import onnx_graphsurgeon as gs

from permsparse.errors import PermsparseError
from permsparse.ir.graph import const_index
from permsparse.ir.weights import WeightInfo
from permsparse.passes.analysis.closures import build_closure, walk
from permsparse.passes.analysis.plan import (
    Boundary,
    Closure,
    ConstAxis,
    ConstPart,
    Item,
    Member,
    Plan,
    TensorItem,
)
from permsparse.passes.analysis.rules import Ctx, NodeRule, node_rule
from permsparse.passes.analysis.weights import (
    chain_nodes,
    classify_weights,
    weight_chains,
)
from permsparse.passes.probe import Probe
from permsparse.pattern import NMPattern

log = logging.getLogger(__name__)


def analyze(
    graph: gs.Graph,
    probe: Probe,
    *,
    pattern: NMPattern | None = None,
    prune_head: bool = False,
    exclude: Iterable[str] = (),
    scopes: dict[str, str] | None = None,
) -> Plan:
    """Find weights and permutation closures (see the module docstring for the rules and the invariant).

    ``scopes``: layer names by node (:func:`permsparse.ir.weights.node_scopes`), for reports."""
    pattern = pattern or NMPattern()
    unnamed = [n.op for n in graph.nodes if not n.name]
    if unnamed:
        raise PermsparseError(f"internal: analyze needs named nodes ({len(unnamed)} unnamed); run passes.names first")
    weights = classify_weights(graph, pattern, prune_head=prune_head, exclude=exclude, scopes=scopes)
    chains = weight_chains(graph)
    skip = chain_nodes(graph, chains)
    ctx = Ctx(graph, probe, chains)
    nodes = list(graph.nodes)
    rules: list[NodeRule] = []
    touching: dict[Item, list[int]] = {}
    for idx, node in enumerate(nodes):
        rule = NodeRule() if id(node) in skip else node_rule(node, ctx)
        rules.append(rule)
        for it in set(rule.items()):
            touching.setdefault(it, []).append(idx)
    const_shapes = {name: ref.shape for name, ref in const_index(graph).items()}
    graph_inputs = {t.name for t in graph.inputs}
    graph_outputs = {t.name for t in graph.outputs}
    seen: dict[Item, int] = {}
    closures: list[Closure] = []
    weight_closure: dict[str, int] = {}
    for w in weights.values():
        seed = TensorItem(w.input)
        if seed in seen:
            weight_closure[w.name] = seen[seed]
            continue
        cid = len(closures)
        items, node_ids, boundaries = walk(seed, rules, touching, nodes, graph_inputs, graph_outputs, seen, cid)
        closures.append(build_closure(cid, items, node_ids, boundaries, rules, nodes, chains, weights, ctx,
                                      pattern.m, const_shapes))
        weight_closure[w.name] = cid
    plan = Plan(weights=weights, closures=closures, weight_closure=weight_closure, pattern=pattern)
    _postconditions(plan)
    return plan


def _postconditions(plan: Plan) -> None:
    for name, w in plan.weights.items():
        c = plan.closure_of(name)
        if c is None:
            raise AssertionError(f"analysis: weight {name} has no closure")
        if w.prunable and c.problem is None and not any(mb.const == w.const and mb.axis == w.k_axis and mb.role == "rows"
                                         for mb in c.members):
            raise AssertionError(f"analysis: closure {c.id} lacks the rows of weight {name}")
        if c.problem is None and c.block % plan.m:
            raise AssertionError(f"analysis: closure {c.id} has block {c.block}, not a multiple of M={plan.m}")
    claimed: dict[tuple[str, int], list[tuple[set[int], int]]] = {}  # (constant, axis) -> (channels, closure)
    for c in plan.closures:
        if c.problem is not None:
            continue
        for mb in c.members:
            claimed.setdefault((mb.const, mb.axis), []).append(
                (set(range(len(mb.block_map) * c.block)) if mb.part is None else set(mb.part.ravel().tolist()), c.id))
    for (const, axis), owners in claimed.items():
        for i in range(1, len(owners)):
            for j in range(i):
                if owners[i][0] & owners[j][0]:
                    raise AssertionError(f"analysis: channels of {const} axis {axis} are members of closures "
                                         f"{owners[j][1]} and {owners[i][1]}")


__all__ = [
    "Boundary",
    "Closure",
    "ConstAxis",
    "ConstPart",
    "Item",
    "Member",
    "Plan",
    "TensorItem",
    "WeightInfo",
    "analyze",
]

"""Blocks pass: cut the graph into Transformer blocks at residual-stream tensors (read-only).

The residual stream is the closure that feeds the most sibling groups (embeddings, every norm, every residual Add).
*Stream* tensors are the descendants of its first tensor (except through ``Shape`` of the first tensor itself, whose
value the prefix computes: legacy exports build the attention mask from it). A stream tensor ``t`` is a *cut* if, right after the node
that writes it (in topological order), ``t`` is the only stream tensor still to be read: everything after depends on
the stream only through ``t``. Tensors that stream nodes read but that do not descend from the stream (attention
masks, RoPE tables, positions) are *side* tensors: they depend on the graph inputs alone, so they are the same for the
dense and the pruned model and are computed once per batch.

Invariant: block ``l`` (between cuts ``t_l`` and ``t_{l+1}``) is a function of ``t_l`` and side tensors only, so
running the blocks one after another from ``t_0`` reproduces ``t_L`` exactly, and a block can be run with changed
weights on inputs produced by earlier changed blocks (sequential calibration). Blocks hold at least one prunable
weight (segments without one are merged into the next).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import onnx_graphsurgeon as gs

from permsparse.passes.analysis import Plan

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Block:
    index: int
    input: str  # the cut tensor entering the block
    output: str  # the cut tensor leaving it (or a graph output for the last block)
    weights: tuple[str, ...]  # prunable weights (MatMul/Gemm node names) inside, in graph order


@dataclass
class BlockPlan:
    blocks: list[Block]
    side: list[str]  # side tensors read by stream nodes
    first: str  # the first stream tensor (input of block 0)
    outside: list[str] = field(default_factory=list)  # prunable weights not inside any block (learned up front)

    def pieces(self, graph_inputs: list[str], outputs: list[str]) -> list[tuple[str, list[str], list[str]]]:
        """The model as pieces run one after another, ``(label, inputs, outputs)``: the prefix (graph inputs -> first
        stream tensor and side tensors), every block, and the suffix when the graph outputs are not the last block's
        output. By the partition's invariant they compose to the whole model."""
        pieces = [("prefix", list(graph_inputs), list(dict.fromkeys([self.first, *self.side])))]
        pieces += [(f"block {b.index}", [b.input, *self.side], [b.output]) for b in self.blocks]
        last = self.blocks[-1].output
        if set(outputs) != {last}:
            pieces.append(("suffix", list(dict.fromkeys([last, *self.side, *graph_inputs])), list(outputs)))
        return pieces

    def block_of(self, weight: str) -> int | None:
        for b in self.blocks:
            if weight in b.weights:
                return b.index
        return None


def _stream_closure(plan: Plan) -> list[str]:
    best, best_groups = None, -1
    for c in plan.closures:
        groups = sum(1 for ws in c.groups.values() if any(plan.weights[w].prunable for w in ws))
        if groups > best_groups:
            best, best_groups = c, groups
    return [] if best is None else best.tensors


def partition(graph: gs.Graph, plan: Plan) -> BlockPlan | None:
    """The blocks of ``graph`` (``None`` when no cut is found: the model is then one block)."""
    graph.toposort()
    nodes = list(graph.nodes)
    producer: dict[str, int] = {}
    for i, n in enumerate(nodes):
        for o in n.outputs:
            producer[o.name] = i
    candidates = [t for t in _stream_closure(plan) if t in producer]
    if not candidates:
        return None
    first = min(candidates, key=lambda t: producer[t])
    # stream tensors: descendants of ``first``
    stream: set[str] = {first}
    stream_nodes: set[int] = set()
    for i in range(producer[first] + 1, len(nodes)):
        n = nodes[i]
        if n.op in ("Shape", "Size") and n.inputs and n.inputs[0].name == first:
            continue  # the first tensor's shape is known to the prefix: its descendants are side tensors
        if any(t.name in stream for t in n.inputs):
            stream_nodes.add(i)
            stream.update(o.name for o in n.outputs)
    last_use: dict[str, int] = {}
    for i, n in enumerate(nodes):
        for t in n.inputs:
            if t.name in stream:
                last_use[t.name] = i
    graph_outputs = {t.name for t in graph.outputs}
    for name in graph_outputs & stream:
        last_use[name] = len(nodes)
    # live stream tensors after each position (sweep)
    delta = [0] * (len(nodes) + 2)
    for t in stream:
        p = producer.get(t, -1)
        u = last_use.get(t, p)
        if u > p:
            delta[p + 1] += 1
            delta[u + 1] -= 1
    live = []
    run = 0
    for i in range(len(nodes) + 1):
        run += delta[i]
        live.append(run)  # live[i]: tensors produced before i that are read at or after i
    cand = set(candidates)
    cuts = [first] + [t for t in sorted(cand - {first}, key=lambda t: producer[t])
                      if live[producer[t] + 1] == 1 and last_use.get(t, -1) > producer[t]]
    weight_node = {w.name: i for i, n in enumerate(nodes) for w in [plan.weights.get(n.name)] if w is not None}
    bounds = [producer[t] for t in cuts] + [len(nodes)]
    blocks: list[Block] = []
    start_cut = 0
    for k in range(len(cuts)):
        lo, hi = bounds[k], bounds[k + 1]
        inside = tuple(w for w, i in sorted(weight_node.items(), key=lambda x: x[1])
                       if lo < i <= hi and plan.weights[w].prunable and i in stream_nodes)
        if not inside:
            continue  # merge this segment into the next block (its input cut stays the earlier one)
        output = cuts[k + 1] if k + 1 < len(cuts) else _last_output(graph, stream)
        blocks.append(Block(len(blocks), cuts[start_cut], output, inside))
        start_cut = k + 1
    if not blocks:
        return None
    in_blocks = {w for b in blocks for w in b.weights}
    outside = [w for w in plan.prunable if w not in in_blocks]
    side = sorted({t.name for i in stream_nodes for t in nodes[i].inputs
                   if t.name and t.name not in stream and not isinstance(t, gs.Constant)
                   and not (len(t.inputs) == 1 and t.inputs[0].op == "Constant")})
    log.info("blocks: %d cuts, %d blocks, %d side tensors, %d weights outside blocks", len(cuts), len(blocks),
             len(side), len(outside))
    return BlockPlan(blocks, side, first, outside)


def _last_output(graph: gs.Graph, stream: set[str]) -> str:
    outs = [t.name for t in graph.outputs if t.name in stream]
    return outs[0] if outs else graph.outputs[0].name

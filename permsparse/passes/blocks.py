"""Blocks pass: cut the graph into Transformer blocks at residual-stream tensors (read-only).

The residual stream is the closure that feeds the most sibling groups (embeddings, every norm, every residual Add).
Its tensors that depend on a graph input are the *candidates* (tensors computed from constants alone, e.g. the
``Identity`` of a norm weight the legacy exporter writes, are not part of the stream: taking one as the first stream
tensor left HF legacy exports with no block at all). *Stream* tensors are the descendants of the first candidate,
except through nodes that read it only for its shape, size or element type (``Shape``, ``Size``, ``CastLike``'s
second input, ``EyeLike``; :data:`SHAPE_TYPE_READS`). Exports also build the attention masks and RoPE tables "like"
the *scaled* or position-added embeddings (Gemma, CLIP text, GPT-2 legacy exports): counting such a shape read as a
use of the stream keeps the embeddings live through every layer (1-2 blocks for the whole model). So each node that
reads only shapes or types of stream tensors computed without any weight (:func:`shape_readers`) is tried as a side
reader: the stream then starts at the first cut after what it reads (the prefix computes those tensors cheaply), and
the exemption is kept when it gives more blocks (:func:`sweep`). A candidate ``t`` is a *cut* if, right after the node that
writes it (in topological order), ``t`` is the only stream tensor still to be read: everything after depends on the
stream only through ``t`` (:meth:`StreamSweep.live_after` names what keeps a candidate from being one, and whether it
is read only for its shape). Tensors that stream nodes read but that do not descend from the stream (attention masks,
RoPE tables, positions) are *side* tensors: they depend on the graph inputs alone, so they are the same for the
dense and the pruned model and are computed once per batch.

Invariant: block ``l`` (between cuts ``t_l`` and ``t_{l+1}``) is a function of ``t_l`` and side tensors only, so
running the blocks one after another from ``t_0`` reproduces ``t_L`` exactly, and a block can be run with changed
weights on inputs produced by earlier changed blocks (sequential calibration). Blocks hold at least one prunable
weight (segments without one are merged into the next).
"""

from __future__ import annotations

import itertools
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
    attention: bool = False  # holds a MatMul of two activations (attention): it starts a layer


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

    def layers(self) -> list[list[int]]:
        """Blocks grouped into Transformer layers: a layer starts at a block holding attention and takes the blocks
        after it that hold none (the MLP half of a pre-norm layer); blocks before the first attention are their own
        layers. A model of L Transformer layers has L layers here."""
        out: list[list[int]] = []
        for b in self.blocks:
            if b.attention or not out:
                out.append([b.index])
            else:
                out[-1].append(b.index)
        return out

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


#: (op, input index) pairs that read only the shape or the element type of a tensor, never its values.
SHAPE_TYPE_READS = frozenset({("Shape", 0), ("Size", 0), ("CastLike", 1), ("EyeLike", 0)})


def value_inputs(node: gs.Node) -> list[gs.Tensor]:
    """The inputs whose *values* ``node`` reads (not those it reads only for their shape or element type)."""
    return [t for i, t in enumerate(node.inputs) if t.name and (node.op, i) not in SHAPE_TYPE_READS]


def input_dependent(graph: gs.Graph) -> set[str]:
    """Tensors whose value or shape depends on a graph input (the rest are constants, e.g. ``Identity`` of a
    parameter, which the legacy exporter emits for norm weights)."""
    dep = {t.name for t in graph.inputs}
    for n in graph.nodes:
        if any(t.name in dep for t in n.inputs):
            dep.update(o.name for o in n.outputs)
    return dep


def stream_tensors(nodes: list[gs.Node], first: str, start: int, exempt: set[int] = frozenset()  # type: ignore[assignment]
                   ) -> tuple[set[str], set[int]]:
    """Descendants of ``first`` and the indices of the nodes that compute them. Left out of the stream: nodes that
    read ``first`` only for its shape, size or type, and the ``exempt`` nodes (see :func:`sweep`)."""
    stream: set[str] = {first}
    stream_nodes: set[int] = set()
    for i in range(start + 1, len(nodes)):
        n = nodes[i]
        reads = [t.name for t in n.inputs if t.name in stream]
        if not reads or i in exempt:
            continue
        if set(reads) == {first} and not any(t.name == first for t in value_inputs(n)):
            continue
        stream_nodes.add(i)
        stream.update(o.name for o in n.outputs)
    return stream, stream_nodes


def shape_readers(nodes: list[gs.Node], first: str, start: int, weight_nodes: set[str]) -> list[int]:
    """Nodes that read stream tensors only for their shape, size or type, all of them computed from ``first``
    without any weight (scaled embeddings, position Adds): what masks and RoPE tables built "like" the embeddings
    read. Their outputs can be side tensors the prefix computes."""
    stream: set[str] = {first}
    weightless: set[str] = {first}
    out = []
    for i in range(start + 1, len(nodes)):
        n = nodes[i]
        reads = [t.name for t in n.inputs if t.name in stream]
        if not reads:
            continue
        if not any(t.name in stream for t in value_inputs(n)) and all(r in weightless for r in reads):
            if set(reads) != {first}:
                out.append(i)
            continue
        outs = [o.name for o in n.outputs]
        stream.update(outs)
        if n.name not in weight_nodes and all(r in weightless for r in reads):
            weightless.update(outs)
    return out


@dataclass
class StreamSweep:
    """What the partition sees: the stream, each candidate cut, and what else is live right after each."""

    nodes: list[gs.Node]
    producer: dict[str, int]
    first: str
    stream: set[str]
    stream_nodes: set[int]
    last_use: dict[str, int]
    candidates: list[str]  # stream-closure tensors in graph order (first included)
    cuts: list[str]

    def live_after(self, t: str) -> list[tuple[str, str, bool]]:
        """``(tensor, last reader, shape_only)`` of the stream tensors other than ``t`` still to be read right after
        ``t`` is written: why ``t`` is not a cut. ``shape_only``: that reader reads the tensor only for its shape,
        size or element type (a mask or table built "like" the hidden state)."""
        p = self.producer[t]
        out = []
        for s in sorted(self.stream, key=lambda x: self.producer.get(x, -1)):
            q = self.producer.get(s, -1)
            u = self.last_use.get(s, q)
            if s != t and q <= p < u:
                if u >= len(self.nodes):
                    out.append((s, "graph output", False))
                    continue
                reader = self.nodes[u]
                shape_only = not any(x.name == s for x in value_inputs(reader))
                out.append((s, reader.name, shape_only))
        return out


def sweep(graph: gs.Graph, plan: Plan) -> StreamSweep | None:
    """The stream and its cuts (see the module docstring); ``None`` when the stream closure has no activation."""
    graph.toposort()
    nodes = list(graph.nodes)
    producer: dict[str, int] = {}
    for i, n in enumerate(nodes):
        for o in n.outputs:
            producer[o.name] = i
    dynamic = input_dependent(graph)
    candidates = [t for t in _stream_closure(plan) if t in producer and t in dynamic]
    if not candidates:
        return None
    candidates.sort(key=lambda t: producer[t])
    best = _sweep_from(graph, plan, nodes, producer, candidates, set())
    # Shape/type reads of the weightless head of the stream (the embeddings): exempt each one that gives more blocks
    # (the stream then starts after what it reads, so the prefix computes it and no weight is left before the start).
    exempt: set[int] = set()
    for i in shape_readers(nodes, best.first, producer[best.first], set(plan.weights)):
        trial = _sweep_from(graph, plan, nodes, producer, candidates, exempt | {i})
        if trial is not None and _n_blocks(trial, plan) > _n_blocks(best, plan):
            best, exempt = trial, exempt | {i}
    return best


def _n_blocks(sw: StreamSweep, plan: Plan) -> int:
    """Blocks the cuts give (segments holding a prunable weight); 0 when a prunable weight comes before the start."""
    pos = {n.name: i for i, n in enumerate(sw.nodes)}
    bounds = [sw.producer[t] for t in sw.cuts] + [len(sw.nodes)]
    idx = sorted(pos[w] for w in plan.prunable if w in pos)
    if idx and idx[0] < bounds[0]:
        return 0
    return sum(1 for lo, hi in itertools.pairwise(bounds) if any(lo < i <= hi for i in idx))


def _sweep_from(graph: gs.Graph, plan: Plan, nodes: list[gs.Node], producer: dict[str, int], candidates: list[str],
                exempt: set[int]) -> StreamSweep | None:
    first = candidates[0]
    if exempt:  # start after every tensor an exempt node reads, so the prefix computes it
        last = max(producer.get(t.name, -1) for i in exempt for t in nodes[i].inputs)
        stream, stream_nodes = stream_tensors(nodes, first, producer[first], exempt)
        sw = _cuts(graph, nodes, producer, candidates, first, stream, stream_nodes)
        first = next((t for t in sw.cuts if producer[t] >= last), None)
        if first is None:
            return None
        candidates = [t for t in candidates if producer[t] >= producer[first]]
    stream, stream_nodes = stream_tensors(nodes, first, producer[first], exempt)
    return _cuts(graph, nodes, producer, candidates, first, stream, stream_nodes)


def _cuts(graph: gs.Graph, nodes: list[gs.Node], producer: dict[str, int], candidates: list[str], first: str,
          stream: set[str], stream_nodes: set[int]) -> StreamSweep:
    last_use: dict[str, int] = {}
    for i in sorted(stream_nodes):
        for t in nodes[i].inputs:
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
    cuts = [first] + [t for t in candidates[1:] if live[producer[t] + 1] == 1 and last_use.get(t, -1) > producer[t]]
    return StreamSweep(nodes, producer, first, stream, stream_nodes, last_use, candidates, cuts)


def _is_attention(node: gs.Node) -> bool:
    """A MatMul of two activations (scores ``Q @ Kᵀ`` or ``probs @ V``)."""
    return node.op == "MatMul" and all(not isinstance(t, gs.Constant) and not (len(t.inputs) == 1
                                       and t.inputs[0].op == "Constant") for t in node.inputs[:2])


def partition(graph: gs.Graph, plan: Plan) -> BlockPlan | None:
    """The blocks of ``graph`` (``None`` when no cut is found: the model is then one block)."""
    sw = sweep(graph, plan)
    if sw is None:
        return None
    nodes, producer, cuts, stream, stream_nodes = sw.nodes, sw.producer, sw.cuts, sw.stream, sw.stream_nodes
    first = sw.first
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
        lo0 = bounds[start_cut]
        attention = any(_is_attention(nodes[i]) for i in stream_nodes if lo0 < i <= hi)
        blocks.append(Block(len(blocks), cuts[start_cut], output, inside, attention))
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

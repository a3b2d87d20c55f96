"""Which weights may be pruned, and why not: the analysis' verdict on each weight the model layer found."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import replace

import onnx_graphsurgeon as gs

from permsparse.ir.graph import WeightChain, const_of, resolve_weight
from permsparse.ir.weights import WeightInfo, find_weights
from permsparse.pattern import NMPattern

#: Stored weight types permsparse masks (numeric work runs in float32/float64; masks are exact).
MASKABLE_DTYPES = ("float32", "float16", "bfloat16")


def weight_chains(graph: gs.Graph) -> dict[str, WeightChain]:
    """For every MatMul/Gemm node reading a constant weight: how it reads it (node name -> chain)."""
    chains: dict[str, WeightChain] = {}
    for node in graph.nodes:
        if node.op not in ("MatMul", "Gemm") or len(node.inputs) < 2:
            continue
        if node.op == "Gemm" and int(node.attrs.get("transA", 0)):
            continue
        chain = resolve_weight(node.inputs[1], trans=node.op == "Gemm" and bool(int(node.attrs.get("transB", 0))))
        if chain is not None:
            chains[node.name] = chain
    return chains


def chain_nodes(graph: gs.Graph, chains: dict[str, WeightChain]) -> set[int]:
    """ids of the Transpose/Cast/Identity nodes on a weight's way to MatMul (accounted for by the MatMul's rule)."""
    found: set[int] = set()
    for node in graph.nodes:
        if node.name not in chains:
            continue
        cur = node.inputs[1]
        while const_of(cur) is None and len(cur.inputs) == 1:
            found.add(id(cur.inputs[0]))
            cur = cur.inputs[0].inputs[0]
    return found


#: ops a head's output may pass through on its way to a graph output (bias, reshapes, casts, soft-capping
#: ``tanh(x / c) * c``, a final scale): unary ops, or binary ops whose other operand is a constant.
_HEAD_PASS = frozenset({"Add", "Sub", "Mul", "Div", "Identity", "Reshape", "Cast", "Squeeze", "Flatten", "Tanh",
                        "Sigmoid", "Softmax", "LogSoftmax", "Unsqueeze"})


def feeds_graph_output(t: gs.Tensor, graph_outputs: set[str], depth: int = 6) -> bool:
    """True if ``t`` is a graph output, directly or through a short chain of ops that read no other activation
    (a bias Add, reshapes, casts, logit soft-capping): a head."""
    frontier = [t]
    for _ in range(depth):
        nxt = []
        for x in frontier:
            if x.name in graph_outputs:
                return True
            for c in x.outputs:
                others = [i for i in c.inputs if i is not x and i.name and const_of(i) is None
                          and not (len(i.inputs) == 1 and i.inputs[0].op in ("Constant", "Shape"))]
                if c.op in _HEAD_PASS and (not others or c.op in ("Reshape", "Unsqueeze", "Squeeze")):
                    nxt.extend(c.outputs)
        frontier = nxt
    return False


def classify_weights(
    graph: gs.Graph, pattern: NMPattern, *, prune_head: bool = False, exclude: Iterable[str] = (),
    scopes: dict[str, str] | None = None,
) -> dict[str, WeightInfo]:
    """Every weight of ``graph`` with ``prunable``/``reason``/``head`` filled in."""
    excludes = [re.compile(p) for p in exclude]
    graph_outputs = {t.name for t in graph.outputs}
    tensors = graph.tensors()
    readers: dict[str, int] = {}
    for node in graph.nodes:
        for t in node.inputs:
            ref = const_of(t)
            if ref is not None:
                readers[ref.name] = readers.get(ref.name, 0) + 1
    out: dict[str, WeightInfo] = {}
    for w in find_weights(graph, scopes):
        reason = None
        if w.dtype not in MASKABLE_DTYPES:
            reason = f"weight dtype {w.dtype} (float32/float16/bfloat16 weights are masked)"
        elif w.k % pattern.m:
            reason = f"K={w.k} is not divisible by M={pattern.m}"
        elif readers.get(w.const, 0) > 1:
            reason = f"the weight is shared by {readers[w.const]} readers"
        head = feeds_graph_output(tensors[w.output], graph_outputs)
        if reason is None and head and not prune_head:
            reason = "writes a graph output (head); use --prune-head to prune it"
        if reason is None and any(p.search(w.name) or p.search(w.const) or p.search(w.label) for p in excludes):
            reason = "excluded by --exclude"
        out[w.name] = replace(w, prunable=reason is None, reason=reason, head=head)
    return out

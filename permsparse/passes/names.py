"""Names pass: give every unnamed node a unique name, so later passes and reports can refer to it.

Rewrite: ``node.name = f"{op}_{index}"`` (index in graph order, made unique) for nodes without a name; named nodes
are untouched, and duplicate names get a ``_<k>`` suffix. Invariant: node names are unique and non-empty; nothing else
changes, so the model computes the same function.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_graphsurgeon as gs


@dataclass(frozen=True)
class NamesResult:
    renamed: int


def name_nodes(graph: gs.Graph) -> NamesResult:
    used = {n.name for n in graph.nodes if n.name}
    seen: set[str] = set()
    renamed = 0
    for i, node in enumerate(graph.nodes):
        if node.name and node.name not in seen:
            seen.add(node.name)
            continue
        base = node.name or f"{node.op}_{i}"
        name, k = base, 1
        while name in used and (name in seen or not node.name):
            name = f"{base}_{k}"
            k += 1
        node.name = name
        used.add(name)
        seen.add(name)
        renamed += 1
    assert len(seen) == len(graph.nodes), "names: node names must be unique"
    return NamesResult(renamed)

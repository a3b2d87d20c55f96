"""Fold pass: apply one permutation per *unit* to the graph, so the permuted dense model computes the same function.

Rewrite. A unit is either a whole closure or (policy ``local``) one sibling group cut out of a closure. For a whole
closure with canonical permutation ``perm`` (``new[i] = old[perm[i]]`` over ``classes × block`` channels), every member
constant (weight rows and columns, biases, norm parameters, embedding tables) is re-indexed along its permuted axis:
block ``t`` of class ``c`` takes ``perm``'s block ``c``; a member that is one part of a fused projection's columns
(:class:`~permsparse.passes.analysis.ConstPart`) re-indexes only the columns it holds, row by row of the part. Under policy ``global`` a closure with blocked boundaries gets
a ``Gather`` on the channel axis at each boundary: the inverse permutation where a permuted tensor leaves the closure
(e.g. before ``last_hidden_state``), the permutation where an unpermuted tensor enters it. Under ``local`` a group's
input ``X`` is replaced, for that group's MatMuls only, by ``Gather(X, perm)``, and the group's weight rows are permuted
by the same ``perm``; the rest of its closure is left as it was.

Invariant. See :mod:`permsparse.passes.analysis`: permuting all members of a closure consistently commutes with every
node inside it; a Gather at a boundary undoes the permutation exactly where it meets a node that does not commute.
``MatMul(Gather(X, p), W[p, :]) == MatMul(X, W)`` for a cut group. ``verify`` checks the result numerically.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import onnx_graphsurgeon as gs

from permsparse.ir.graph import const_index
from permsparse.passes.analysis import Closure, Member, Plan

log = logging.getLogger(__name__)

Policy = Literal["fold", "global", "local"]
POLICIES: tuple[str, ...] = ("fold", "global", "local")


@dataclass(frozen=True)
class Unit:
    """One permutation to find: a whole closure (``group is None``) or a group cut out of one."""

    name: str
    closure: int
    group: str | None  # the activation tensor cut by a Gather (policy local)
    weights: tuple[str, ...]  # prunable weights whose importance the permutation serves
    k: int
    block: int


@dataclass
class UnitPlan:
    """What a policy decided for every closure."""

    policy: str
    units: list[Unit]
    identity: dict[int, str]  # closure id -> why it keeps the identity
    gathers_planned: int


@dataclass
class FoldResult:
    """What the fold pass changed."""

    gathers: list[str] = field(default_factory=list)  # names of Gather nodes added
    indices: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)  # (constant, axis) -> new[i] = old[idx[i]]
    units_applied: int = 0

    def record(self, const: str, axis: int, idx: np.ndarray) -> None:
        prev = self.indices.get((const, axis))
        self.indices[(const, axis)] = idx if prev is None else prev[idx]


def block_perm(perm: np.ndarray, block_map: np.ndarray, block: int) -> np.ndarray:
    """Index permutation of an axis of ``len(block_map) * block`` channels whose block ``t`` has class ``block_map[t]``."""
    nb = len(block_map)
    t = np.repeat(np.arange(nb), block)
    i = np.tile(np.arange(block), nb)
    c = np.asarray(block_map)[t]
    return t * block + perm[c * block + i] - c * block


def part_perm(perm: np.ndarray, mb: Member, block: int, length: int) -> np.ndarray:
    """Index permutation of a whole axis of ``length`` channels of which member ``mb`` holds a fused projection's
    part: each row of the part (its channels at one head, say) is permuted like a channel axis with that row's block
    classes; channels outside the part keep their place."""
    pos = mb.part.reshape(-1, mb.part.shape[-1])
    bm = mb.block_map.reshape(-1, mb.block_map.shape[-1])
    full = np.arange(length)
    for r in range(len(pos)):
        full[pos[r]] = pos[r][block_perm(perm, bm[r], block)]
    return full


def _uniform_blocks(labels: np.ndarray) -> np.ndarray | None:
    """Class of each channel block if it is the same at every position of the other axes, else ``None``."""
    flat = labels.reshape(-1, labels.shape[-1])
    return flat[0] if (flat == flat[0]).all() else None


def plan_units(plan: Plan, policy: str) -> UnitPlan:
    """Decide, per closure, which permutations to learn under ``policy`` (fold | global | local)."""
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    units: list[Unit] = []
    identity: dict[int, str] = {}
    gathers = 0
    for c in plan.closures:
        prunable = [w for w in c.siblings if plan.weights[w].prunable]
        if not prunable:
            identity[c.id] = "no prunable weight reads it"
            continue
        if c.problem:
            identity[c.id] = c.problem
            continue
        groups = {x: [w for w in ws if plan.weights[w].prunable] for x, ws in c.groups.items()}
        groups = {x: ws for x, ws in groups.items() if ws}
        whole = Unit(f"closure{c.id}", c.id, None, tuple(prunable), c.k, c.block)
        if policy == "fold":
            if c.boundaries:
                identity[c.id] = c.describe()
            else:
                units.append(whole)
        elif policy == "global":
            why = _global_obstacle(c)
            if why:
                identity[c.id] = why
            else:
                units.append(whole)
                gathers += sum(len(x) for x in boundary_tensors(c))
        else:  # local
            if not c.boundaries and len(groups) == 1:
                units.append(whole)
                continue
            for x, ws in groups.items():
                k = plan.weights[ws[0]].k
                units.append(Unit(f"closure{c.id}:{x}", c.id, x, tuple(ws), k, k))
                gathers += 1
    return UnitPlan(policy, units, identity, gathers)


def _global_obstacle(c: Closure) -> str | None:
    for b in c.boundaries:
        if b.side == "constant":
            return f"a constant of it cannot be permuted: {b.reason}"
        if _uniform_blocks(c.labels[b.tensor]) is None:
            return f"boundary tensor {b.tensor!r} has a per-head channel structure a Gather cannot undo"
    return None


def apply_fold(
    graph: gs.Graph, plan: Plan, units: list[Unit], perms: Mapping[str, np.ndarray]
) -> FoldResult:
    """Permute ``graph`` in place: every unit's permutation is applied to its members, with Gathers where needed."""
    result = FoldResult()
    tensors = graph.tensors()
    consts = const_index(graph)
    for unit in units:
        perm = np.asarray(perms[unit.name], dtype=np.int64)
        if np.array_equal(perm, np.arange(len(perm))):
            continue
        closure = plan.closures[unit.closure]
        if unit.group is None:
            for mb in closure.members:
                ref = consts[mb.const]
                if mb.part is None:
                    idx = block_perm(perm, mb.block_map, closure.block)
                else:  # a fused projection's part: its columns only
                    idx = part_perm(perm, mb, closure.block, ref.shape[mb.axis])
                ref.set_values(np.take(ref.values, idx, axis=mb.axis))
                result.record(mb.const, mb.axis, idx)
            for name in _boundary_gathers(graph, tensors, closure, perm):
                result.gathers.append(name)
        else:
            x = tensors[unit.group]
            readers = [plan.weights[w] for w in closure.groups[unit.group]]
            name = f"permsparse/local_gather_{len(result.gathers)}"
            xp = _gather(graph, x, perm, name, x.name + "_permuted")
            result.gathers.append(name)
            for w in readers:
                node = next(n for n in x.outputs if n.name == w.name)
                node.inputs[0] = xp
                ref = consts[w.const]
                ref.set_values(np.take(ref.values, perm, axis=w.k_axis))
                result.record(w.const, w.k_axis, perm)
        result.units_applied += 1
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    return result


def _gather(graph: gs.Graph, x: gs.Variable, idx: np.ndarray, node_name: str, out_name: str) -> gs.Variable:
    out = gs.Variable(out_name, dtype=x.dtype, shape=x.shape)
    indices = gs.Constant(node_name + "/indices", np.ascontiguousarray(idx, dtype=np.int64))
    graph.nodes.append(gs.Node("Gather", node_name, attrs={"axis": -1}, inputs=[x, indices], outputs=[out]))
    return out


def boundary_tensors(closure: Closure) -> tuple[list[str], list[str]]:
    """Tensors needing a Gather under policy global: (entering unpermuted, leaving permuted)."""
    entering = sorted({b.tensor for b in closure.boundaries if b.side == "producer" and b.tensor})
    leaving = sorted({b.tensor for b in closure.boundaries if b.side == "consumer" and b.tensor} - set(entering))
    return entering, leaving


def _boundary_gathers(graph: gs.Graph, tensors, closure: Closure, perm: np.ndarray) -> list[str]:
    """Insert the Gathers that keep a globally permuted closure equal to the original at its boundaries."""
    added: list[str] = []
    entering, leaving = boundary_tensors(closure)

    def sigma_of(tname: str) -> np.ndarray:
        return block_perm(perm, _uniform_blocks(closure.labels[tname]), closure.block)

    for tname in entering:
        # t enters unpermuted (graph input, or written by a node that does not commute): permute it for the
        # nodes inside the closure; nodes outside keep reading t.
        t = tensors[tname]
        name = f"permsparse/boundary_gather_{closure.id}_{len(added)}"
        inside = [n for n in list(t.outputs) if n.name in closure.nodes]
        tp = _gather(graph, t, sigma_of(tname), name, tname + "_permuted")
        for n in inside:
            n.inputs[n.inputs.index(t)] = tp
        added.append(name)
    for tname in leaving:
        # t is written permuted: its producer writes a twin that the closure's nodes read, and a Gather restores t
        # (same name, so graph outputs keep their names) for everything outside.
        t = tensors[tname]
        name = f"permsparse/boundary_gather_{closure.id}_{len(added)}"
        twin = gs.Variable(tname + "_permuted", dtype=t.dtype, shape=t.shape)
        producer = t.inputs[0]
        producer.outputs[producer.outputs.index(t)] = twin
        for n in list(t.outputs):
            if n.name in closure.nodes:
                n.inputs[n.inputs.index(t)] = twin
        indices = gs.Constant(name + "/indices", np.argsort(sigma_of(tname)).astype(np.int64))
        graph.nodes.append(gs.Node("Gather", name, attrs={"axis": -1}, inputs=[twin, indices], outputs=[t]))
        added.append(name)
    return added

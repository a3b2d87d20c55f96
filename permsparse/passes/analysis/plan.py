"""The analysis' result types: items, boundaries, members, closures and the plan.

An *item* is something whose channel axis can carry a permutation: an activation tensor (its last axis) or one axis
of a constant. A *closure* is a set of items that must carry the same permutation (see
:mod:`permsparse.passes.analysis` for the rules and the invariant).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import numpy as np

from permsparse.ir.weights import WeightInfo
from permsparse.pattern import NMPattern


class TensorItem(NamedTuple):
    """An activation tensor; its channel axis is the last one."""

    name: str


class ConstAxis(NamedTuple):
    """One axis of a constant (weight rows/columns, a bias, norm parameters, an embedding table's columns)."""

    const: str
    axis: int


class ConstPart(NamedTuple):
    """Some channels of one axis of a constant, laid out as one part of a fused projection's output: the columns of
    the fused weight (or channels of a bias after it) that one cut of the projection's output reads. ``positions``
    (row-major, of ``shape``) are the channels of ``axis``; the last axis of ``shape`` is the part's channel axis,
    its other axes those along which the part's channels differ (heads, when the cut follows a head reshape), of size
    1 elsewhere. The other channels of the axis are not members."""

    const: str
    axis: int
    shape: tuple[int, ...]
    positions: tuple[int, ...]


Item = TensorItem | ConstAxis | ConstPart


@dataclass(frozen=True)
class Boundary:
    """Where a closure meets something that does not commute with a channel permutation."""

    item: Item
    node: str | None  # node name, or None for a graph input/output
    side: Literal["consumer", "producer", "constant"]
    reason: str

    @property
    def tensor(self) -> str | None:
        return self.item.name if isinstance(self.item, TensorItem) else None


@dataclass(frozen=True)
class Member:
    """A constant axis (or one part of it) that is permuted when the closure is: weight rows/cols, bias, norm
    parameters, tables."""

    const: str
    axis: int
    role: Literal["rows", "cols", "param", "table"]
    block_map: np.ndarray  # canonical class of each block of ``block`` along ``axis`` (of a part: shaped as ``part``)
    part: np.ndarray | None = None  # a fused projection's part: the channels of ``axis`` it holds (ConstPart)


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

    @property
    def tensors(self) -> list[str]:
        return [it.name for it in self.items if isinstance(it, TensorItem)]

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
    """Result of the analysis: every weight (prunable or not, and why) and every closure of a prunable weight."""

    weights: dict[str, WeightInfo]
    closures: list[Closure]
    weight_closure: dict[str, int]  # weight name -> closure id of its rows
    pattern: NMPattern

    @property
    def n(self) -> int:
        return self.pattern.n

    @property
    def m(self) -> int:
        return self.pattern.m

    def closure_of(self, weight: str) -> Closure | None:
        cid = self.weight_closure.get(weight)
        return None if cid is None else self.closures[cid]

    @property
    def prunable(self) -> list[str]:
        return [w.name for w in self.weights.values() if w.prunable]

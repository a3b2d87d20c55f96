"""The permutation-method interface: a closure's problem in, one input-channel permutation out.

A :class:`PermutationProblem` is everything a method may look at. It is expressed in the closure's *canonical
channel space* of size ``k``: the analysis (``permsparse.passes.analysis``) maps every sibling weight's input rows onto
it (heads that share a KV head are tied, so their rows appear as extra columns). A method returns ``perm``, an int array
of length ``k`` with ``new[i] = old[perm[i]]``: after folding, canonical channel ``perm[i]`` sits at position ``i``.

Constraint: ``perm`` must keep every aligned block of ``block`` channels in place (``perm[i] // block == i // block``);
``block == k`` means any permutation. N:M groups (``m`` consecutive channels) never straddle a block because the
analysis only produces blocks that are multiples of ``m``.

Objective (the one all built-in methods maximize unless they say otherwise): the sum over siblings of the share of each
sibling's total importance that survives N:M masking along K after permuting rows; see :func:`retained_share`.

Output objective (optional, ``problem.outputs``): one :class:`OutputTerm` per sibling with its dense weight, the Gram
matrix ``H = XᵀX`` of its input and the masking score really applied, in the weight's *actual* row order; a canonical
permutation reorders sibling i's rows by ``σ_i(r) = r + perm[row_map[r]] − row_map[r]`` (exactly what the fold pass
does to tied head blocks, see :func:`sibling_rows`). The loss is in :mod:`permsparse.optimizer.objectives`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

# the optimizer's mask rule is the pattern's (re-exported here for the solvers)
from permsparse.pattern import nm_keep_mask


@dataclass(frozen=True)
class OutputTerm:
    """One sibling weight's data for the output objective (arrays in the weight's ACTUAL row order).

    Attributes:
        weight: ``[K_i, N_i]`` dense weight (K-major).
        hessian: ``[K_i, K_i]`` ``XᵀX`` of the weight's input over calibration tokens (siblings reading one tensor may
            share one array).
        score: ``[K_i, N_i]`` the masking importance really applied (wanda / ria / obs / magnitude).
        row_map: ``[K_i]`` canonical channel of each actual row (None: identity, ``K_i == problem.k``). Rows must map
            block-wise: ``row_map[r] − r`` is a multiple of the problem's block (head blocks keep their offsets).
    """

    weight: np.ndarray
    hessian: np.ndarray
    score: np.ndarray
    row_map: np.ndarray | None = None


def sibling_rows(perm: np.ndarray, row_map: np.ndarray | None) -> np.ndarray:
    """``σ`` with ``new[r] = old[σ[r]]`` for a sibling's actual rows: ``σ(r) = r + perm[row_map[r]] − row_map[r]``."""
    perm = np.asarray(perm, dtype=np.int64)
    if row_map is None:
        return perm
    rm = np.asarray(row_map, dtype=np.int64)
    return np.arange(rm.size) + perm[rm] - rm


@dataclass(frozen=True)
class PermutationProblem:
    """One permutation to find.

    Attributes:
        name: human-readable name of the closure/group (for logs and progress bars).
        importances: one non-negative array ``[k, n_i]`` per sibling weight, rows in canonical channel order.
        block: permutations must map each aligned block of ``block`` channels to itself (``block == k``: free).
        n: kept elements per group (2 for 2:4).
        m: group size along K (4 for 2:4).
        outputs: optional, one :class:`OutputTerm` per sibling (same order as ``importances``) for the output
            objective (:func:`permsparse.optimizer.objectives.output_loss`).
    """

    name: str
    importances: tuple[np.ndarray, ...]
    block: int
    n: int = 2
    m: int = 4
    outputs: tuple[OutputTerm, ...] | None = None

    def __post_init__(self) -> None:
        if not self.importances:
            raise ValueError(f"{self.name}: a permutation problem needs at least one sibling importance array")
        k = self.importances[0].shape[0]
        for imp in self.importances:
            if imp.ndim != 2 or imp.shape[0] != k:
                raise ValueError(f"{self.name}: every importance must be [k={k}, n_i], got {imp.shape}")
        if self.block <= 0 or k % self.block or self.block % self.m:
            raise ValueError(f"{self.name}: block {self.block} must divide k={k} and be a multiple of m={self.m}")
        if self.outputs is not None:
            self._check_outputs(k)

    def _check_outputs(self, k: int) -> None:
        if len(self.outputs) != len(self.importances):
            raise ValueError(f"{self.name}: {len(self.outputs)} output terms for {len(self.importances)} siblings")
        for i, t in enumerate(self.outputs):
            w, h, sc = np.shape(t.weight), np.shape(t.hessian), np.shape(t.score)
            if len(w) != 2 or sc != w or h != (w[0], w[0]):
                raise ValueError(f"{self.name}: output term {i}: weight {w}, score {sc} and hessian {h} must be "
                                 "[K_i, N_i], [K_i, N_i] and [K_i, K_i]")
            if w[0] % self.m:
                raise ValueError(f"{self.name}: output term {i}: K_i={w[0]} is not divisible by m={self.m}")
            if t.row_map is None:
                if w[0] != k:
                    raise ValueError(f"{self.name}: output term {i} has K_i={w[0]} rows but no row_map (k={k})")
                continue
            rm = np.asarray(t.row_map)
            if rm.shape != (w[0],) or rm.min(initial=0) < 0 or rm.max(initial=0) >= k:
                raise ValueError(f"{self.name}: output term {i}: row_map must be [K_i={w[0]}] canonical channels < {k}")
            if np.any((rm - np.arange(w[0])) % self.block):
                raise ValueError(f"{self.name}: output term {i}: row_map must move whole blocks of {self.block} "
                                 "rows (row_map[r] - r a multiple of the block)")

    @property
    def k(self) -> int:
        return int(self.importances[0].shape[0])


@runtime_checkable
class PermutationMethod(Protocol):
    """Anything with a ``name`` and ``solve(problem) -> perm`` is a permutation method."""

    name: str

    def solve(self, problem: PermutationProblem) -> np.ndarray: ...


@dataclass
class SolveStats:
    """What a method may report about one solve (filled in by methods that track it)."""

    seconds: float = 0.0
    retained_identity: float = 0.0
    retained: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)


def retained_share(problem: PermutationProblem, perm: np.ndarray | None = None) -> float:
    """Mean over siblings of (importance kept by N:M after permuting rows by ``perm``) / (total importance).

    Lies in [n/m, 1]; identity is ``perm=None``.
    """
    shares = []
    for imp in problem.importances:
        x = imp if perm is None else imp[perm]
        total = float(x.sum(dtype=np.float64))
        if total <= 0.0:
            continue
        keep = nm_keep_mask(x, problem.n, problem.m)
        shares.append(float(x[keep].sum(dtype=np.float64)) / total)
    return float(np.mean(shares)) if shares else 1.0


def unstructured_bound(problem: PermutationProblem) -> float:
    """Retained share if each column kept its best ``n/m`` share of rows anywhere (the 'unstructured 50%' bound)."""
    shares = []
    for imp in problem.importances:
        total = float(imp.sum())
        if total <= 0.0:
            continue
        k_keep = imp.shape[0] * problem.n // problem.m
        top = -np.sort(-imp, axis=0)[:k_keep]
        shares.append(float(top.sum()) / total)
    return float(np.mean(shares)) if shares else 1.0


def efficacy(identity: float, permuted: float, bound: float) -> float:
    """Share of the gap between plain N:M (identity) and the unstructured bound that a permutation recovers."""
    gap = bound - identity
    return 0.0 if gap <= 1e-12 else (permuted - identity) / gap


def check_permutation(perm: np.ndarray, k: int, block: int) -> None:
    """Raise ``ValueError`` unless ``perm`` is a permutation of ``range(k)`` that keeps every ``block`` in place."""
    perm = np.asarray(perm)
    if perm.shape != (k,) or not np.array_equal(np.sort(perm), np.arange(k)):
        raise ValueError(f"not a permutation of {k} channels")
    if block < k and not np.array_equal(perm // block, np.arange(k) // block):
        raise ValueError(f"permutation moves channels across blocks of {block}")


@dataclass(frozen=True)
class SolveResult:
    """One problem's answer: ``perm`` (``new[i] = old[perm[i]]``) and how good it is.

    ``seconds``: solver time when it was solved (for a reused checkpoint: the original time); ``reused``: taken from
    a checkpoint instead of solved in this call.
    """

    name: str
    perm: np.ndarray
    seconds: float
    retained_identity: float
    retained: float
    bound: float
    efficacy: float
    reused: bool = False

"""From a plan's units to permutation problems, solved by a method (the learning steps' numerics glue).

A unit's problem lives in its *canonical channel space* (``classes × block`` channels of its closure, or the K rows of
a cut sibling group): every sibling weight's importance is mapped there — rows already in canonical order are used as
they are; head blocks tied to one class (GQA) become extra columns. A method returns ``perm`` over that space
(``new[i] = old[perm[i]]``), which the fold pass applies to every member of the unit.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Executor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from permsparse.ir.graph import ConstRef
from permsparse.optimizer.base import PermutationProblem, SolveResult
from permsparse.passes.analysis import Closure, Plan
from permsparse.passes.fold import Unit
from permsparse.pattern import NMPattern

if TYPE_CHECKING:
    from permsparse.optimizer.checkpoint import CheckpointStore
    from permsparse.pipeline.config import ResolvedConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UnitReport:
    """A unit and its solver's :class:`~permsparse.optimizer.base.SolveResult`, which holds the figures once: importance
    kept by plain N:M (``retained_identity``) vs permuted (``retained``), the unstructured ``bound``, ``efficacy``
    (share of the gap between plain N:M and the bound that the permutation closes), ``seconds``; read through."""

    unit: Unit
    result: SolveResult

    @property
    def retained_identity(self) -> float:
        return self.result.retained_identity

    @property
    def retained(self) -> float:
        return self.result.retained

    @property
    def bound(self) -> float:
        return self.result.bound

    @property
    def efficacy(self) -> float:
        return self.result.efficacy

    @property
    def seconds(self) -> float:
        return self.result.seconds


def weight_values(consts: Mapping[str, ConstRef], plan: Plan, name: str) -> np.ndarray:
    """The weight as ``[K, N]`` float32 (fp16/bf16 widened once)."""
    w = plan.weights[name]
    return np.asarray(w.k_major(consts[w.const].values), dtype=np.float32)


def row_classes(closure: Closure, const: str, k_axis: int) -> np.ndarray:
    """Canonical class of each block of a weight's rows."""
    return next(mb.block_map for mb in closure.members if mb.const == const and mb.axis == k_axis)


def is_canonical(block_map: np.ndarray, closure: Closure) -> bool:
    return len(block_map) == closure.n_classes and np.array_equal(block_map, np.arange(len(block_map)))


def canonical_importance(plan: Plan, unit: Unit, name: str, imp: np.ndarray) -> np.ndarray:
    """``imp [K, N]`` of weight ``name`` in the unit's canonical row space (tied head blocks as extra columns)."""
    if unit.group is not None:
        return imp
    closure = plan.closures[unit.closure]
    w = plan.weights[name]
    b = closure.block
    bm = row_classes(closure, w.const, w.k_axis)
    if is_canonical(bm, closure):
        return imp
    per_class: list[list[np.ndarray]] = [[] for _ in range(closure.n_classes)]
    for t, c in enumerate(bm):
        per_class[c].append(imp[t * b:(t + 1) * b])
    width = max(len(x) for x in per_class) * imp.shape[1]
    canon = np.zeros((closure.k, width), dtype=imp.dtype)
    for c, blocks in enumerate(per_class):
        if blocks:
            row = np.concatenate(blocks, axis=1)
            canon[c * b:(c + 1) * b, : row.shape[1]] = row
    return canon


def row_map(plan: Plan, unit: Unit, name: str) -> np.ndarray | None:
    """Canonical channel of each actual row of weight ``name`` (``None``: rows are already canonical)."""
    if unit.group is not None:
        return None
    closure = plan.closures[unit.closure]
    w = plan.weights[name]
    bm = row_classes(closure, w.const, w.k_axis)
    if is_canonical(bm, closure):
        return None
    b = closure.block
    r = np.arange(len(bm) * b)
    return np.asarray(bm)[r // b] * b + r % b


ImportanceFn = Callable[[str, np.ndarray], np.ndarray]


def build_problem(plan: Plan, unit: Unit, importances: Mapping[str, np.ndarray], pattern: NMPattern) -> PermutationProblem:
    mats = tuple(canonical_importance(plan, unit, w, importances[w]) for w in unit.weights)
    return PermutationProblem(name=unit.name, importances=mats, block=unit.block, n=pattern.n, m=pattern.m)


@dataclass
class Solver:
    """Where units are solved and where solved units are kept: ``executor`` None is this process's reusable local
    pool (:func:`permsparse.optimizer.executors.shared_pool`); ``checkpoint`` None keeps nothing."""

    executor: Executor | None = None
    checkpoint: CheckpointStore | None = None


@contextmanager
def open_solver(cluster: str | None, work_dir: str | os.PathLike[str] | None,
                workers: int | None = None) -> Iterator[Solver]:
    """The :class:`Solver` of ``--cluster`` / ``--work-dir``; a Ray executor is shut down on exit."""
    from permsparse.optimizer.checkpoint import CheckpointStore
    from permsparse.optimizer.executors import make_executor

    checkpoint = CheckpointStore(work_dir) if work_dir is not None else None
    executor = make_executor(cluster, workers)
    try:
        yield Solver(executor, checkpoint)
    finally:
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)


def solve_problems(plan: Plan, problems: list[tuple[Unit, tuple, object]], cfg: ResolvedConfig,
                   solver: Solver | None = None) -> tuple[dict[str, np.ndarray], list[UnitReport]]:
    """Solve ``(unit, canonical importances, output terms or None)`` triples with the configured method."""
    from permsparse.optimizer.solve import solve_all

    solver = solver or Solver()

    p = cfg.permutation
    if p.method == "identity" or not problems:
        return {u.name: np.arange(u.k) for u, _, _ in problems}, []
    built = []
    for u, mats, outputs in problems:
        kw = {"outputs": outputs} if outputs is not None else {}
        built.append(PermutationProblem(name=u.name, importances=mats, block=u.block, n=plan.n, m=plan.m, **kw))
    results = solve_all(built, p.method, workers=p.workers, seed=cfg.seed, budget_s=None,
                        learned_config=learned_config(cfg), progress=False, executor=solver.executor,
                        checkpoint=solver.checkpoint)
    perms = {u.name: np.asarray(r.perm) for (u, _, _), r in zip(problems, results)}
    reports = [UnitReport(u, r) for (u, _, _), r in zip(problems, results)]
    return perms, reports


def learned_config(cfg: ResolvedConfig):
    """The :class:`~permsparse.optimizer.learned.LearnedConfig` of a ``--method learned`` run (None for the other
    methods): the user's knobs (or the defaults), the output objective when asked, on ``--device``."""
    from dataclasses import replace

    from permsparse.optimizer.learned import LearnedConfig

    p = cfg.permutation
    if p.method != "learned":
        return None
    learned = p.learned if p.learned is not None else LearnedConfig()
    if p.objective == "output":
        learned = replace(learned, objective="output")
    return replace(learned, device=cfg.device)


def solve_units(
    plan: Plan,
    units: list[Unit],
    consts: Mapping[str, ConstRef],
    importance: ImportanceFn,
    *,
    method: str,
    seed: int,
    budget_s: float | None,
    workers: int | None,
    learned_config: object | None,
    progress: bool,
    solver: Solver | None = None,
) -> tuple[dict[str, np.ndarray], list[UnitReport]]:
    """Every unit's permutation, a chunk of units at a time so the importances of a big model are never all held."""
    from permsparse.optimizer.solve import solve_all

    if method == "identity":
        return {u.name: np.arange(u.k) for u in units}, []
    solver = solver or Solver()
    n_workers = workers or os.cpu_count() or 1
    chunk = max(4, 2 * n_workers)
    perms: dict[str, np.ndarray] = {}
    reports: list[UnitReport] = []
    per_unit = None if budget_s is None else budget_s / max(1, len(units))
    for start in range(0, len(units), chunk):
        part = units[start:start + chunk]
        names = {w for u in part for w in u.weights}
        imps = {n: importance(n, weight_values(consts, plan, n)) for n in names}
        problems = [build_problem(plan, u, imps, plan.pattern) for u in part]
        del imps
        results = solve_all(
            problems, method, workers=workers, seed=seed,
            budget_s=None if per_unit is None else per_unit * len(part),
            learned_config=learned_config, progress=progress, executor=solver.executor,
            checkpoint=solver.checkpoint,
        )
        for u, r in zip(part, results):
            perms[u.name] = np.asarray(r.perm)
            reports.append(UnitReport(u, r))
    return perms, reports

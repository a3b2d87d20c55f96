"""Solve many independent permutation problems (closures), in-process or over a process pool."""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from permsparse.optimizer.base import (
    PermutationProblem,
    check_permutation,
    efficacy,
    retained_share,
    unstructured_bound,
)
from permsparse.optimizer.learned import LearnedConfig
from permsparse.optimizer.methods import make_method


@dataclass(frozen=True)
class SolveResult:
    """One problem's answer: ``perm`` (``new[i] = old[perm[i]]``) and how good it is."""

    name: str
    perm: np.ndarray
    seconds: float
    retained_identity: float
    retained: float
    bound: float
    efficacy: float


def _solve_one(problem: PermutationProblem, method_name: str, seed: int, budget_s: float | None,
               learned_config: LearnedConfig | None, threads: int | None) -> SolveResult:
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    method = make_method(method_name, seed=seed, budget_s=budget_s, learned=learned_config)
    t0 = time.perf_counter()
    perm = np.asarray(method.solve(problem), dtype=np.int64)
    seconds = time.perf_counter() - t0
    check_permutation(perm, problem.k, problem.block)
    ident = retained_share(problem, None)
    kept = retained_share(problem, perm)
    if kept < ident:  # belt and braces: never hand back something worse than plain N:M
        perm, kept = np.arange(problem.k), ident
    bound = unstructured_bound(problem)
    return SolveResult(problem.name, perm, seconds, ident, kept, bound, efficacy(ident, kept, bound))


def solve_all(problems: list[PermutationProblem], method_name: str, *, workers: int | None = None, seed: int = 0,
              budget_s: float | None = None, learned_config: LearnedConfig | None = None,
              progress: bool = True) -> list[SolveResult]:
    """Solve every problem independently with ``method_name``; results in input order.

    ``workers``: processes (None: ``os.cpu_count()``; 1: in this process). ``budget_s``: total seconds for all problems,
    split across them in proportion to their size (``k * columns``) and scaled by the number of workers.
    """
    problems = list(problems)
    if not problems:
        return []
    workers = (os.cpu_count() or 1) if workers is None else max(1, int(workers))
    workers = min(workers, len(problems))
    sizes = np.array([p.k * sum(imp.shape[1] for imp in p.importances) for p in problems], dtype=np.float64)
    if budget_s is None:
        budgets = [None] * len(problems)
    else:
        share = sizes / sizes.sum() * float(budget_s) * workers
        budgets = [float(b) for b in share]
    bar = tqdm(total=len(problems), desc=f"permutations ({method_name})", disable=not progress, unit="closure")
    results: list[SolveResult | None] = [None] * len(problems)
    try:
        if workers == 1:
            for i, prob in enumerate(problems):
                results[i] = _solve_one(prob, method_name, seed, budgets[i], learned_config, None)
                bar.update(1)
        else:
            threads = max(1, (os.cpu_count() or 1) // workers)
            ctx = mp.get_context("spawn")
            with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
                futs = {pool.submit(_solve_one, prob, method_name, seed, budgets[i], learned_config, threads): i
                        for i, prob in enumerate(problems)}
                from concurrent.futures import as_completed

                for fut in as_completed(futs):
                    results[futs[fut]] = fut.result()
                    bar.update(1)
    finally:
        bar.close()
    out = [r for r in results if r is not None]
    for prob, res in zip(problems, out):
        check_permutation(res.perm, prob.k, prob.block)
    return out

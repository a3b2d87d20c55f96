"""Classical permutation baselines: identity, RIA-style linear-sum-assignment (the Apex-style channel swap is in
:mod:`permsparse.optimizer.swap`).

All of them maximize :func:`permsparse.optimizer.base.retained_share`; when ``problem.outputs`` is set their final pick
among candidates (identity always one of them) is by the exact output loss instead (:func:`best_of`). They work on the *normalized stacked*
importance ``A = concat_i(imp_i / total_i) / S`` (``[k, sum n_i]``), whose kept N:M sum equals the retained share
exactly. Blocks are independent (an N:M group never straddles a block), so every method solves each block of
``problem.block`` channels as a free problem and concatenates the answers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from permsparse.optimizer.base import (
    PermutationProblem,
    check_permutation,
    retained_share,
)

# ----------------------------------------------------------------------------------------------- shared helpers


def stacked_importance(problem: PermutationProblem, dtype=np.float64) -> np.ndarray:
    """``[k, sum n_i]``: siblings divided by their total and by the number of non-empty siblings.

    ``kept_sum(A[perm]) == retained_share(problem, perm)`` (up to rounding); an all-zero problem gives ``[k, 1]`` zeros.
    """
    parts = []
    for imp in problem.importances:
        total = float(np.asarray(imp, dtype=np.float64).sum())
        if total > 0.0:
            parts.append(np.asarray(imp, dtype=np.float64) / total)
    if not parts:
        return np.zeros((problem.k, 1), dtype=dtype)
    return (np.concatenate(parts, axis=1) / len(parts)).astype(dtype)


def group_kept(a: np.ndarray, n: int, m: int) -> np.ndarray:
    """Kept N:M importance per group: ``[rows // m]`` for rows already in group order."""
    g = a.reshape(a.shape[0] // m, m, a.shape[1])
    if n == 2 and m == 4:  # sorting network: much faster than np.partition along a length-4 axis
        x0, x1, x2, x3 = g[:, 0], g[:, 1], g[:, 2], g[:, 3]
        hi1, lo1 = np.maximum(x0, x1), np.minimum(x0, x1)
        hi2, lo2 = np.maximum(x2, x3), np.minimum(x2, x3)
        top = np.maximum(hi1, hi2) + np.maximum(np.minimum(hi1, hi2), np.maximum(lo1, lo2))
        return top.sum(axis=1)
    part = -np.partition(-g, n - 1, axis=1)[:, :n, :] if n < m else g
    return part.sum(axis=(1, 2))


def kept_sum(a: np.ndarray, n: int, m: int) -> float:
    return float(group_kept(a, n, m).sum())


def pick_window_channels(block: int, cols: int, m: int, window_elems: int | None, min_window: int = 128) -> int:
    """Channels per search window for a block with ``cols`` importance columns (a multiple of m, at most ``block``).

    The exact moves (LSA re-placement, pairwise swap gains) cost ~window^2 * cols per window, so the window is chosen
    as ``window_elems / cols`` channels (at least ``min_window``): per sweep the cost is ~K * window_elems, linear in K.
    ``window_elems=None`` (or a window >= block) means the whole block.
    """
    if window_elems is None:
        return block
    w = max(min_window, int(window_elems) // max(1, cols))
    w = max(m, w - w % m)
    return min(block, w)


def group_windows(G: int, gw: int, rng: np.random.Generator | None) -> list[np.ndarray]:
    """Partition ``G`` groups into ~equal windows of about ``gw`` groups (random membership when ``rng`` is given)."""
    order = np.arange(G) if rng is None else rng.permutation(G)
    nwin = max(1, -(-G // max(1, gw)))
    return [np.sort(c) for c in np.array_split(order, nwin)]


def block_starts(problem: PermutationProblem) -> list[int]:
    return list(range(0, problem.k, problem.block))


def best_of(problem: PermutationProblem, candidates: list[np.ndarray]) -> np.ndarray:
    """The best candidate; identity wins ties (never worse than identity).

    Best = highest retained share, or, when ``problem.outputs`` is set, lowest exact output loss
    (:func:`~permsparse.optimizer.objectives.output_loss`), the error the mask really causes.
    """
    cands = [np.asarray(c, dtype=np.int64) for c in candidates]
    for cand in cands:
        check_permutation(cand, problem.k, problem.block)
    if problem.outputs is not None:
        from permsparse.optimizer.objectives import output_losses

        scores = [-v for v in output_losses(problem, [None, *cands])]
    else:
        scores = [retained_share(problem, p) for p in [None, *cands]]
    best, best_score = np.arange(problem.k), scores[0]
    for cand, val in zip(cands, scores[1:]):
        if val > best_score + 1e-12 * max(1.0, abs(best_score)):
            best, best_score = cand, val
    return best


def _others_topn(g: np.ndarray, n: int, slots=None) -> tuple[np.ndarray, np.ndarray]:
    """For groups ``g [G, m, N]``, per slot s: kept sum of the other m-1 members (top n of them) and their n-th largest.

    Returns ``base [G, m]`` (summed over columns) and ``thr [G, m, N]``, so that putting channel x into slot s of
    group h keeps ``base[h, s] + sum_c relu(x_c - thr[h, s, c])``.
    """
    G, m, N = g.shape
    base = np.zeros((G, m))
    thr = np.zeros((G, m, N), dtype=g.dtype)
    for s in range(m) if slots is None else slots:
        others = np.delete(g, s, axis=1)  # [G, m-1, N]
        if n == 2 and m == 4:  # three others: top-2 sum = total - min, 2nd largest = total - max - min
            tot = others.sum(axis=1)
            mn = others.min(axis=1)
            base[:, s] = (tot - mn).sum(axis=1)
            thr[:, s, :] = tot - mn - others.max(axis=1)
            continue
        part = -np.partition(-others, n - 1, axis=1)[:, :n, :]  # top n, the n-th largest last
        base[:, s] = part.sum(axis=(1, 2))
        thr[:, s, :] = part.min(axis=1)
    return base, thr


def _relu_gain(x: np.ndarray, thr: np.ndarray) -> np.ndarray:
    """``out[i, j] = sum_c relu(x[i, c] - thr[j, c])`` for ``x [I, N]``, ``thr [J, N]`` (float32 torch, chunked).

    Inputs are rescaled by their mean so float32 never meets denormals; the result is scaled back (float64).
    """
    scale = float(np.abs(x).mean()) or 1.0
    xt = torch.as_tensor(np.asarray(x, dtype=np.float64) / scale, dtype=torch.float32)
    tt = torch.as_tensor(np.asarray(thr, dtype=np.float64) / scale, dtype=torch.float32)
    out = torch.empty((xt.shape[0], tt.shape[0]), dtype=torch.float32)
    step = max(1, int(2**22 // max(1, tt.numel())))
    for i0 in range(0, xt.shape[0], step):
        out[i0 : i0 + step] = torch.clamp_min(xt[i0 : i0 + step, None, :] - tt[None, :, :], 0.0).sum(dim=2)
    return out.double().numpy() * scale


# ----------------------------------------------------------------------------------------------- identity


@dataclass
class IdentityMethod:
    """Plain N:M: keep the channel order."""

    name: str = "identity"

    def solve(self, problem: PermutationProblem) -> np.ndarray:
        return np.arange(problem.k)


# ----------------------------------------------------------------------------------------------- LSA (RIA-style)


def lsa_block(a: np.ndarray, n: int, m: int, *, rng: np.random.Generator, refine_rounds: int = 8,
              deadline: float | None = None, window: int | None = None) -> np.ndarray:
    """RIA-style channel reallocation of one free block ``a [b, N]``; returns a local permutation.

    Channels sorted by total importance; the top ``G = b/m`` go one per group; every next tranche of G channels is
    assigned to groups by LSA on the marginal kept importance (for the first n tranches every channel is kept whole, so
    the marginal uses the per-column max instead, which favours complementary channels). Then refine: repeatedly take
    one member out of every group and re-place the G removed channels optimally by LSA (never decreases the objective).
    """
    b = a.shape[0]
    G = b // m
    if G <= 1 or n >= m:
        return np.arange(b)
    if window is not None and window < b:
        return _lsa_block_windowed(a, n, m, rng=rng, refine_rounds=refine_rounds, deadline=deadline, window=window)
    order = np.argsort(-a.sum(axis=1), kind="stable")
    groups = np.empty((G, m), dtype=np.int64)
    groups[:, 0] = order[:G]
    for t in range(1, m):
        tranche = order[t * G : (t + 1) * G]
        members = a[groups[:, :t]]  # [G, t, N]
        x = a[tranche]  # [G, N]
        if t < n:
            cur = members.max(axis=1)  # [G, N]
            gain = _relu_gain(x, cur)  # complementary: gain where the group is weak
        else:
            srt = -np.sort(-members, axis=1)
            thr = srt[:, n - 1, :]
            gain = _relu_gain(x, thr)
        rows, cols = linear_sum_assignment(gain, maximize=True)
        groups[cols, t] = tranche[rows]
    _refine_groups(a, groups, n, m, rng=rng, rounds=refine_rounds, deadline=deadline)
    return groups.reshape(-1)


def _lsa_block_windowed(a: np.ndarray, n: int, m: int, *, rng: np.random.Generator, refine_rounds: int,
                        deadline: float | None, window: int) -> np.ndarray:
    """LSA for a big free block: a global stripe assignment, exact LSA inside windows, windowed refinement.

    Channels are sorted by total importance and cut into m tranches of G; group h starts with the channels of rank
    h, G+h, 2G+h, ... (a global stripe, so every group gets one channel of every importance level). Windows of ``gw``
    consecutive groups then hold ``gw`` consecutive ranks of every tranche, and the RIA tranche-by-tranche LSA is run
    exactly on each window (it would pair ranks from the same neighbourhoods anyway). The refinement re-draws the window
    membership every sweep (random groups of groups) so channels can move between any two groups of the block.
    Cost ~ K * window * N per sweep instead of K^2 * N.
    """
    b = a.shape[0]
    G = b // m
    gw = max(2, window // m)
    order = np.argsort(-a.sum(axis=1), kind="stable")
    groups = np.empty((G, m), dtype=np.int64)
    for win in group_windows(G, gw, None):
        sel = np.concatenate([order[t * G + win] for t in range(m)])
        local = lsa_block(a[sel], n, m, rng=rng, refine_rounds=0)
        groups[win] = sel[local].reshape(-1, m)
    refine_groups_windowed(a, groups, n, m, rng=rng, rounds=refine_rounds, deadline=deadline, window=window)
    return groups.reshape(-1)


def refine_groups_windowed(a: np.ndarray, groups: np.ndarray, n: int, m: int, *, rng: np.random.Generator,
                           rounds: int, deadline: float | None, window: int | None) -> None:
    """In place: slot-wise LSA refinement over random windows of ``window`` channels (never decreases kept sum)."""
    G = groups.shape[0]
    if window is None or window >= G * m:
        _refine_groups(a, groups, n, m, rng=rng, rounds=rounds, deadline=deadline)
        return
    gw = max(2, window // m)
    for _ in range(rounds):
        before = kept_sum(a[groups.reshape(-1)], n, m)
        for win in group_windows(G, gw, rng):
            if deadline is not None and time.perf_counter() > deadline:
                return
            sub = groups[win]
            _refine_groups(a, sub, n, m, rng=rng, rounds=1, deadline=deadline)
            groups[win] = sub
        if kept_sum(a[groups.reshape(-1)], n, m) <= before + 1e-12 * max(1.0, abs(before)):
            return


def refine_block(a: np.ndarray, local: np.ndarray, n: int, m: int, *, rng: np.random.Generator, rounds: int = 8,
                 deadline: float | None = None, window: int | None = None) -> np.ndarray:
    """Slot-wise LSA refinement of a local permutation of one free block ``a [b, N]`` (never decreases kept sum).

    ``window``: channels per refinement window (None: the whole block; see :func:`refine_groups_windowed`).
    """
    if a.shape[0] // m <= 1 or n >= m:
        return np.asarray(local).copy()
    groups = np.asarray(local, dtype=np.int64).reshape(-1, m).copy()
    refine_groups_windowed(a, groups, n, m, rng=rng, rounds=rounds, deadline=deadline, window=window)
    return groups.reshape(-1)


def _refine_groups(a: np.ndarray, groups: np.ndarray, n: int, m: int, *, rng: np.random.Generator,
                   rounds: int, deadline: float | None) -> None:
    """In place: slot-wise LSA re-placement until a full round brings no gain (or ``rounds``/``deadline``)."""
    G = groups.shape[0]
    current = kept_sum(a[groups.reshape(-1)], n, m)
    for _ in range(rounds):
        improved = False
        # shuffle members within each group so "slot s" is a different member each round
        for h in range(G):
            groups[h] = groups[h, rng.permutation(m)]
        for s in range(m):
            if deadline is not None and time.perf_counter() > deadline:
                return
            g = a[groups]  # [G, m, N]
            base, thr = _others_topn(g, n, slots=(s,))
            removed = groups[:, s].copy()
            gain = base[None, :, s] + _relu_gain(a[removed], thr[:, s, :])  # [i removed, h group]
            rows, cols = linear_sum_assignment(gain, maximize=True)
            trial = groups.copy()
            trial[cols, s] = removed[rows]
            new_val = kept_sum(a[trial.reshape(-1)], n, m)  # exact (the gains are float32)
            if new_val > current + 1e-12 * max(1.0, abs(current)):
                groups[:] = trial
                current = new_val
                improved = True
        if not improved:
            return


@dataclass
class LsaMethod:
    """RIA-style channel reallocation by linear sum assignment, refined slot by slot (per block)."""

    name: str = "lsa"
    seed: int = 0
    refine_rounds: int = 8
    budget_s: float | None = None
    window_elems: int | None = 2**20  # window channels ~ window_elems / columns (see pick_window_channels)

    def solve(self, problem: PermutationProblem) -> np.ndarray:
        a = stacked_importance(problem)
        rng = np.random.default_rng(self.seed)
        deadline = None if self.budget_s is None else time.perf_counter() + self.budget_s
        window = pick_window_channels(problem.block, a.shape[1], problem.m, self.window_elems)
        perm = np.empty(problem.k, dtype=np.int64)
        for s0 in block_starts(problem):
            local = lsa_block(a[s0 : s0 + problem.block], problem.n, problem.m, rng=rng,
                              refine_rounds=self.refine_rounds, deadline=deadline, window=window)
            perm[s0 : s0 + problem.block] = s0 + local
        return best_of(problem, [perm])

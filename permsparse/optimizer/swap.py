"""Apex ASP-style channel swap: greedy pairwise swaps between N:M groups that raise the kept importance.

Works on the normalized stacked importance of :mod:`permsparse.optimizer.baselines` (whose kept N:M sum is the
retained share), per free block. Invariant: a swap is applied only when its exactly recomputed kept sum is higher, and
the method returns the best of its result, its LSA start and identity (:func:`~permsparse.optimizer.baselines.best_of`),
so it is never worse than either.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from permsparse.optimizer.base import PermutationProblem
from permsparse.optimizer.baselines import (
    LsaMethod,
    _others_topn,
    _relu_gain,
    best_of,
    block_starts,
    group_kept,
    group_windows,
    kept_sum,
    pick_window_channels,
    stacked_importance,
)

# ----------------------------------------------------------------------------------------------- channel swap (Apex)


class _SwapState:
    """Greedy pairwise-swap search on one free block, with the swap-gain matrix kept up to date incrementally.

    ``R[i, p]`` = change of the kept sum of the group at position p if channel i replaced the channel at position p.
    The gain of swapping the channels at positions p and q (different groups) is ``R[ch[q], p] + R[ch[p], q]``;
    swaps between disjoint group pairs are independent, so several are applied per iteration.
    """

    def __init__(self, a: np.ndarray, pos: np.ndarray, n: int, m: int):
        self.a, self.n, self.m = a, n, m
        self.b = a.shape[0]
        self.G = self.b // m
        self.pos = pos.copy()  # pos[p] = channel at position p
        self.group_of_pos = np.arange(self.b) // m
        self.R = np.empty((self.b, self.b))  # rows: channels, cols: positions
        # gains are float32 sums: only trust gains clearly above rounding (else swaps could cycle)
        self.eps = 1e-6 * float(a.sum()) / max(1, self.G)
        self._update_groups(np.arange(self.G))

    def _update_groups(self, hs: np.ndarray) -> None:
        m = self.m
        g = self.a[self.pos.reshape(self.G, m)[hs]]  # [H, m, N]
        base, thr = _others_topn(g, self.n)
        cur = group_kept(g.reshape(-1, g.shape[-1]), self.n, m)  # [H]
        cols = (hs[:, None] * m + np.arange(m)[None, :]).reshape(-1)
        gain = _relu_gain(self.a, thr.reshape(-1, thr.shape[-1]))  # [b, H*m]
        self.R[:, cols] = gain + (base - cur[:, None]).reshape(-1)[None, :]

    def value(self) -> float:
        return kept_sum(self.a[self.pos], self.n, self.m)

    def step(self, max_swaps: int) -> float:
        """Apply up to ``max_swaps`` improving swaps between disjoint group pairs; returns the total gain."""
        Rp = self.R[self.pos]  # rows by position: Rp[q, p] = R[ch[q], p]
        gain = Rp + Rp.T
        same = self.group_of_pos[:, None] == self.group_of_pos[None, :]
        gain[same] = -np.inf
        gain[np.tril_indices(self.b)] = -np.inf
        flat = gain.reshape(-1)
        cand = min(flat.size, max(4 * max_swaps, 16))
        top = np.argpartition(-flat, cand - 1)[:cand]
        top = top[np.argsort(-flat[top], kind="stable")]
        used: set[int] = set()
        total = 0.0
        touched = []
        for f in top:
            val = flat[f]
            if not val > self.eps:
                break
            p, q = divmod(int(f), self.b)
            gp, gq = int(self.group_of_pos[p]), int(self.group_of_pos[q])
            if gp in used or gq in used:
                continue
            used.update((gp, gq))
            self.pos[p], self.pos[q] = self.pos[q], self.pos[p]
            total += float(val)
            touched += [gp, gq]
            if len(touched) >= 2 * max_swaps:
                break
        if touched:
            self._update_groups(np.array(sorted(set(touched))))
        return total

    def kick(self, rng: np.random.Generator, swaps: int) -> None:
        """Random swaps between groups (to leave a local optimum)."""
        touched = set()
        for _ in range(swaps):
            p, q = rng.choice(self.b, size=2, replace=False)
            if self.group_of_pos[p] == self.group_of_pos[q]:
                continue
            self.pos[p], self.pos[q] = self.pos[q], self.pos[p]
            touched.update((int(self.group_of_pos[p]), int(self.group_of_pos[q])))
        if touched:
            self._update_groups(np.array(sorted(touched)))


def channel_swap_block(a: np.ndarray, init: np.ndarray, n: int, m: int, *, rng: np.random.Generator,
                       max_iters: int, deadline: float | None, kicks: int, swaps_per_iter: int) -> np.ndarray:
    """Greedy swap search (plus ``kicks`` perturbation restarts while time remains); returns the best local perm."""
    if a.shape[0] // m <= 1 or n >= m:
        return init.copy()
    st = _SwapState(a, init, n, m)
    best_pos, best_val = st.pos.copy(), st.value()
    it = 0
    for restart in range(kicks + 1):
        if restart:
            if deadline is None or time.perf_counter() > deadline:
                break
            st.pos = best_pos.copy()
            st._update_groups(np.arange(st.G))
            st.kick(rng, max(2, st.G // 8))
        val = st.value()
        while it < max_iters:
            if deadline is not None and time.perf_counter() > deadline:
                break
            it += 1
            before = st.pos.copy()
            if st.step(swaps_per_iter) <= 0.0:
                break
            new_val = st.value()
            if new_val <= val:  # rounding fooled the gains: undo and stop
                st.pos = before
                st._update_groups(np.arange(st.G))
                break
            val = new_val
        val = st.value()
        if val > best_val + 1e-12:
            best_pos, best_val = st.pos.copy(), val
    return best_pos


def channel_swap_windowed(a: np.ndarray, init: np.ndarray, n: int, m: int, *, rng: np.random.Generator,
                          window: int, max_iters: int, deadline: float | None, kicks: int, swaps_per_iter: int,
                          rounds: int = 6) -> np.ndarray:
    """Channel swap on a big free block: converge inside windows of ``window`` channels (random groups of groups,
    re-drawn every round so channels can travel across the block); while a deadline leaves time after ``rounds``
    converged sweeps (or a sweep without gain), keep sweeping with perturbation kicks inside the windows.
    Never decreases the kept sum; cost ~ K * window * N per sweep."""
    b = a.shape[0]
    G = b // m
    if G <= 1 or n >= m:
        return init.copy()
    gw = max(2, window // m)
    pos = np.asarray(init, dtype=np.int64).copy()
    r = 0
    while True:
        use_kicks = r >= rounds
        if use_kicks and (deadline is None or kicks <= 0 or time.perf_counter() > deadline):
            break
        before = kept_sum(a[pos], n, m)
        wins = group_windows(G, gw, rng)
        for wi, win in enumerate(wins):
            if deadline is not None and time.perf_counter() > deadline:
                break
            P = (win[:, None] * m + np.arange(m)[None, :]).reshape(-1)
            ch = pos[P]
            sub_deadline = None
            if use_kicks:
                sub_deadline = time.perf_counter() + max(0.0, deadline - time.perf_counter()) / (len(wins) - wi) / 4
            local = channel_swap_block(a[ch], np.arange(ch.size), n, m, rng=rng, max_iters=max_iters,
                                       deadline=sub_deadline, kicks=kicks if use_kicks else 0,
                                       swaps_per_iter=swaps_per_iter)
            pos[P] = ch[local]
        r += 1
        if not use_kicks and kept_sum(a[pos], n, m) <= before + 1e-12 * max(1.0, abs(before)):
            r = max(r, rounds)  # converged: go on with kicks if time is left
    return pos


@dataclass
class ChannelSwapMethod:
    """Apex ASP-style channel swap: greedy pairwise swaps between groups that raise the kept N:M importance.

    Starts from the LSA solution (``init="lsa"``) or the stripe/identity order (``init="identity"``). Every iteration
    evaluates all pairwise swaps of a block at once and applies the best ones between disjoint group pairs. When it
    converges and time (``budget_s``) is left, it perturbs the best solution with random swaps and searches again
    (at most ``kicks`` times). Deterministic for a given seed when no deadline cuts it short.
    """

    name: str = "channel_swap"
    seed: int = 0
    budget_s: float | None = None
    max_iters: int = 100_000
    kicks: int = 1_000_000
    init: str = "lsa"
    swaps_per_iter: int = 16
    window_elems: int | None = 2**20  # window channels ~ window_elems / columns (see pick_window_channels)

    def solve(self, problem: PermutationProblem) -> np.ndarray:
        t0 = time.perf_counter()
        a = stacked_importance(problem)
        rng = np.random.default_rng(self.seed)
        window = pick_window_channels(problem.block, a.shape[1], problem.m, self.window_elems)
        if self.init == "lsa":
            init = LsaMethod(seed=self.seed, window_elems=self.window_elems).solve(problem)
        else:
            init = np.arange(problem.k)
        nblocks = problem.k // problem.block
        perm = np.empty(problem.k, dtype=np.int64)
        for bi, s0 in enumerate(block_starts(problem)):
            deadline = None
            if self.budget_s is not None:
                left = self.budget_s - (time.perf_counter() - t0)
                deadline = time.perf_counter() + max(0.0, left) / (nblocks - bi)
            loc_init = init[s0 : s0 + problem.block] - s0
            if window < problem.block:
                local = channel_swap_windowed(a[s0 : s0 + problem.block], loc_init, problem.n, problem.m, rng=rng,
                                              window=window, max_iters=self.max_iters, deadline=deadline,
                                              kicks=self.kicks if self.budget_s is not None else 0,
                                              swaps_per_iter=self.swaps_per_iter)
                perm[s0 : s0 + problem.block] = s0 + local
                continue
            local = channel_swap_block(a[s0 : s0 + problem.block], loc_init, problem.n, problem.m, rng=rng,
                                       max_iters=self.max_iters, deadline=deadline,
                                       kicks=self.kicks if self.budget_s is not None else 0,
                                       swaps_per_iter=self.swaps_per_iter)
            perm[s0 : s0 + problem.block] = s0 + local
        return best_of(problem, [perm, init])

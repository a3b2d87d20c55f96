"""The learned permutation under the output objective (``LearnedConfig(objective="output")`` with ``problem.outputs``).

Works for every kind of unit: free closures, block-diagonal head blocks, GQA-tied classes (every tied copy of a
canonical channel moves with it) and multi-sibling groups (losses summed), because it only ever moves channels inside
windows of whole N:M groups of one constraint block, and scores every move on the rows it really changes
(:class:`~permsparse.optimizer.objectives.OutputState`).

Per round (``sinkhorn=True``): windows of ``out_window`` channels (random groups of the current permutation, per block; consecutive groups
in round 0). For all windows at once, a learnable cost matrix ``C [w, w]`` gives the soft permutation
``P = Sinkhorn((C + Gumbel·τ)/τ)``; the permuted scores ``P S`` are masked by a soft top-n-of-m, the pruned share is
mapped back to channels (``Pᵀ(1 − M)``) and the loss is the exact quadratic form of the window's error change with the
rest of the permutation fixed (``2⟨Δ, G⟩ + ⟨Δ, H_SS Δ⟩``, cross terms to other windows through ``G``). Every
``eval_every`` steps ``samples`` Hungarian roundings of ``C`` (Gumbel-perturbed, the first plain) are scored exactly
and each window keeps its best; the improving windows are applied together if their exact joint change is negative,
else one at a time, each re-checked against the current G (:meth:`~permsparse.optimizer.objectives.OutputState.
apply_greedy`). After the round an exact local search (:func:`pair_search`: every re-split of two groups, scored for
all pairs of a random pairing at once) polishes the result. ``sinkhorn=False`` (the default) runs only that local
search, which at equal time was the better of the two on SmolLM2 layers (numbers in ``LearnedConfig``).
``out_rounds`` rounds, fewer without a budget when ``patience`` rounds bring no gain; with a budget, rounds go on
until it is spent.

Invariant: every applied move lowered the incremental loss; E and G are recomputed from scratch at the end, and the
caller keeps the result only if its exact loss is not above the initialisation's.
"""

from __future__ import annotations

import itertools
import logging
import time

import numpy as np
import torch

from permsparse.optimizer.base import PermutationProblem
from permsparse.optimizer.objectives import OutputState, WindowBatch

log = logging.getLogger(__name__)


def split_assignments(m: int, groups: int = 2) -> np.ndarray:
    """Every split of ``groups * m`` window channels into ``groups`` unordered groups (``[S, groups*m]`` slot→channel;
    channel 0 always in the first group, so mirrored splits are not repeated). Only ``groups == 2`` is supported."""
    if groups != 2:
        raise ValueError("split_assignments supports 2 groups")
    out = []
    for rest in itertools.combinations(range(1, 2 * m), m - 1):
        first = (0, *rest)
        second = tuple(c for c in range(2 * m) if c not in first)
        out.append(first + second)
    return np.asarray(out, dtype=np.int64)


def random_group_windows(problem: PermutationProblem, groups_per_window: int, rng: np.random.Generator | None
                         ) -> np.ndarray:
    """Window positions ``[W, groups_per_window * m]`` (ascending): random groups of one block each (consecutive
    groups when ``rng`` is None); leftover groups of a block are left out."""
    m = problem.m
    gpb = problem.block // m
    rows = []
    for s0 in range(0, problem.k, problem.block):
        order = np.arange(gpb) if rng is None else rng.permutation(gpb)
        for j in range(0, gpb - groups_per_window + 1, groups_per_window):
            gs = np.sort(order[j : j + groups_per_window])
            rows.append((s0 + gs[:, None] * m + np.arange(m)[None, :]).reshape(-1))
    return np.stack(rows) if rows else np.zeros((0, groups_per_window * m), dtype=np.int64)


def pair_search(state: OutputState, *, rng: np.random.Generator, sweeps: int = 4, deadline: float | None = None,
                chunk_elems: int = 2**22) -> int:
    """Exact local search on the output loss: random pairs of groups (per block), every split of their 2m channels
    scored exactly with the rest fixed, the best improving splits applied (jointly re-checked, see
    :meth:`OutputState.apply_greedy`). Runs ``sweeps`` sweeps (each a fresh random pairing) or until ``deadline``.
    Returns the number of applied moves."""
    p = state.problem
    if p.n >= p.m or p.block // p.m < 2:
        return 0
    splits = torch.as_tensor(split_assignments(p.m), device=state.device)  # [S, 2m]
    applied = 0
    size = sum(t.w.shape[1] * t.rows.shape[1] for t in state.terms) * 2 * p.m
    for _ in range(sweeps):
        pos = random_group_windows(p, 2, rng)
        if pos.shape[0] == 0:
            break
        moved = 0
        step = max(1, int(chunk_elems // max(1, size * splits.shape[0])))
        for c0 in range(0, pos.shape[0], step):
            if deadline is not None and time.perf_counter() > deadline:
                return applied + moved
            pw = pos[c0 : c0 + step]
            src = state.perm[pw]
            wb = WindowBatch(state, src)
            with torch.no_grad():
                vals = wb.exact_splits(splits, p.n, p.m)  # [S, nw]
            best = vals.argmin(dim=0)
            bval = vals.gather(0, best[None])[0]
            sel = torch.nonzero(bval < -1e-7).reshape(-1).cpu().numpy()
            if sel.size:
                moved += state.apply_greedy(pw[sel], src[sel], splits[best[sel]].cpu().numpy(),
                                            bval[sel].cpu().numpy())
        applied += moved
    return applied


def _learn_windows(state: OutputState, pos: np.ndarray, cfg, gen: torch.Generator, rng: np.random.Generator,
                   deadline: float | None) -> tuple[int, int]:
    """One round of Sinkhorn learning on the windows ``pos [W, w]``; returns (steps, applied moves)."""
    from permsparse.optimizer.relax import log_sinkhorn, sample_roundings

    p = state.problem
    n, m = p.n, p.m
    src = state.perm[pos]
    nw, w = src.shape
    wb = WindowBatch(state, src)
    dev = state.device
    elems = sum(part[1].numel() for part in wb.parts)  # score elements of all windows
    chunk = max(1, min(4, int(2**25 // max(1, elems))))  # samples scored at once: ~128 MB per temporary
    eye = torch.eye(w, device=dev).expand(nw, w, w)
    noise = torch.randn((nw, w, w), generator=gen).to(dev) * cfg.init_noise
    cost = (cfg.init_scale * eye + noise).clone().requires_grad_(True)
    opt = torch.optim.Adam([cost], lr=cfg.lr)
    best_sig = np.tile(np.arange(w), (nw, 1))
    best_val = np.zeros(nw)
    stale = 0
    steps = 0
    for it in range(cfg.iterations):
        frac = it / max(1, cfg.iterations - 1)
        tau = cfg.tau_start + (cfg.tau_end - cfg.tau_start) * frac
        gum = -torch.log(-torch.log(torch.rand((nw, w, w), generator=gen).clamp(1e-10, 1 - 1e-10))).to(dev)
        soft = log_sinkhorn((cost + cfg.sample_noise * tau * gum) / tau, cfg.sinkhorn_iters).exp()
        loss = wb.relaxed(soft, n, m, cfg.select_temp).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        steps += 1
        if (it + 1) % cfg.eval_every == 0 or it == cfg.iterations - 1:
            sigs = sample_roundings(cost.detach().cpu().numpy(), cfg.samples, cfg.sample_noise, rng)  # [S, W, w]
            with torch.no_grad():
                vals = torch.cat([wb.exact(torch.as_tensor(sigs[i : i + chunk], device=dev), n, m)
                                  for i in range(0, cfg.samples, chunk)]).double().cpu().numpy()  # [S, W]
            top = vals.argmin(axis=0)
            val = vals[top, np.arange(nw)]
            better = val < best_val - 1e-9
            best_sig[better] = sigs[top, np.arange(nw)][better]
            best_val = np.where(better, val, best_val)
            stale = 0 if better.any() else stale + 1
            if stale >= cfg.patience:
                break
        if deadline is not None and time.perf_counter() > deadline:
            break
    sel = np.nonzero(best_val < -1e-9)[0]
    applied = state.apply_greedy(pos[sel], src[sel], best_sig[sel], best_val[sel]) if sel.size else 0
    return steps, applied


def learn_output(problem: PermutationProblem, perm: np.ndarray, cfg, *, deadline: float | None,
                 device: torch.device) -> tuple[np.ndarray, dict]:
    """Improve ``perm`` under the output objective; returns (perm, stats). See the module doc."""
    k, m = problem.k, problem.m
    state = OutputState(problem, perm, device)
    start = state.loss()
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    gpb = problem.block // m
    gpw = max(1, min(gpb, cfg.out_window // m))
    steps = learned_moves = search_moves = 0
    rounds = 0
    max_rounds = cfg.out_rounds
    if cfg.work_cap is not None:
        cols = sum(t.w.shape[1] * t.rows.shape[1] for t in state.terms)
        max_rounds = max(1, min(cfg.out_rounds, int(cfg.work_cap // max(1, k * cols))))
    stale = 0
    can_move = gpb >= 2 and problem.n < problem.m and (cfg.refine or cfg.sinkhorn)
    while can_move:
        if deadline is not None and time.perf_counter() > deadline:
            break
        if deadline is None and (rounds >= max_rounds or stale >= cfg.patience):
            break
        before = state.loss()
        if cfg.sinkhorn and gpw >= 2:
            pos = random_group_windows(problem, gpw, None if rounds == 0 else rng)
            if pos.shape[0]:
                s, a = _learn_windows(state, pos, cfg, gen, rng, deadline)
                steps += s
                learned_moves += a
        if cfg.refine:
            search_moves += pair_search(state, rng=rng, sweeps=cfg.refine_rounds, deadline=deadline)
        rounds += 1
        stale = 0 if state.loss() < before - 1e-9 * max(1.0, abs(before)) else stale + 1
    if rounds:
        state.reset()  # drop float32 drift of the incremental updates (one K²N product per sibling)
    stats = {"rounds": rounds, "steps": steps, "learned_moves": learned_moves, "search_moves": search_moves,
             "loss_start": start, "loss_end": state.loss()}
    return state.perm.copy(), stats


__all__ = ["learn_output", "pair_search", "random_group_windows", "split_assignments"]

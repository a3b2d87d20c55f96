"""The output objective of a permutation problem: exact loss, incremental window deltas, exact local search.

For sibling i (an :class:`~permsparse.optimizer.base.OutputTerm`: dense ``W_i``, ``H_i = XᵀX``, masking score
``S_i``, all in actual row order) a canonical permutation ``perm`` reorders rows by ``σ_i`` (see
:func:`~permsparse.optimizer.base.sibling_rows`); the N:M mask ``M_i`` is the top-n-of-m of ``S_i[σ_i]`` mapped back to
actual rows, ``E_i = W_i ⊙ (1 − M_i)``, and

    loss(perm) = Σ_i tr(E_iᵀ H_i E_i) / tr(W_iᵀ H_i W_i)

(the relative output error of the pruned weights on the calibration activations, without reconstruction).

Incremental form (what the learners optimize): the loss depends on perm only through which rows are pruned in each
column. With ``G_i = H_i E_i`` kept up to date, changing ``E_i`` by ``Δ`` on a set of rows S changes the loss by
``2⟨Δ, G_i[S]⟩ + ⟨Δ, H_i[S, S] Δ⟩`` exactly (cross terms with every other row are in ``G``). A *window* is a set of
whole N:M groups of one block; re-assigning its channels only changes rows in S (every copy of those canonical channels
in every sibling), so its delta with the rest fixed is exact and cheap (``|S|² N``); accepting it updates ``G`` with
``H[:, S] Δ`` (``K |S| N``). Windows are scored in parallel (each with the others fixed) and the improving ones are
applied together only if their exact joint change (cross terms included, ``⟨D, G_old⟩ + ⟨D, G_new⟩``) is negative,
else one at a time, each re-checked against the current ``G``; so every accepted move lowers the (float32) loss, and
callers guard the end result with :func:`output_loss`. Ties between equal scores are broken towards the lower position
everywhere, as :func:`~permsparse.optimizer.base.nm_keep_mask` does, so incremental and exact losses agree.
"""

from __future__ import annotations

import numpy as np
import torch

from permsparse.optimizer.base import (
    OutputTerm,
    PermutationProblem,
    nm_keep_mask,
    sibling_rows,
)
from permsparse.optimizer.hessian import DEFAULT_DAMP


def term_masks(term: OutputTerm, perm: np.ndarray, n: int, m: int) -> np.ndarray:
    """Kept mask ``[K_i, N_i]`` (actual row order) of one sibling under canonical ``perm``."""
    sig = sibling_rows(perm, term.row_map)
    keep_p = nm_keep_mask(np.asarray(term.score)[sig], n, m)
    keep = np.empty_like(keep_p)
    keep[sig] = keep_p
    return keep


def _quad(h: torch.Tensor, x: torch.Tensor) -> float:
    """``tr(xᵀ h x)``."""
    return float((x * (h @ x)).sum(dtype=torch.float64))


def _precision(term: OutputTerm) -> torch.dtype:
    """float64 up to ``K²N = 2³¹`` multiply-adds per product, float32 above (float64 would take minutes at LLM scale)."""
    k, cols = np.shape(term.weight)
    return torch.float64 if k * k * cols <= 2**31 else torch.float32


def exact_in_float64(problem: PermutationProblem) -> bool:
    """Whether :func:`output_loss` runs in float64 for every sibling of ``problem``."""
    return problem.outputs is not None and all(_precision(t) == torch.float64 for t in problem.outputs)


def term_losses(term: OutputTerm, keeps: list[np.ndarray], den: float | None = None) -> list[float]:
    """``tr(EᵀHE) / tr(WᵀHW)`` for each kept mask in ``keeps`` (0 when the weight has no output energy); ``den``:
    ``tr(WᵀHW)/mean|diag H|`` when already known (see :func:`output_losses`)."""
    dt = _precision(term)
    h64 = np.asarray(term.hessian, dtype=np.float64)
    hscale = float(np.mean(np.abs(np.diag(h64)))) or 1.0
    h = torch.as_tensor(h64 / hscale, dtype=dt)
    w = torch.as_tensor(np.array(term.weight, dtype=np.float64), dtype=dt)  # a copy: inputs may be read-only
    if den is None:
        den = _quad(h, w)
    if den <= 0.0:
        return [0.0 for _ in keeps]
    return [_quad(h, torch.where(torch.as_tensor(keep), torch.zeros((), dtype=dt), w)) / den for keep in keeps]


def term_loss(term: OutputTerm, keep: np.ndarray) -> float:
    """``tr(EᵀHE) / tr(WᵀHW)`` for the kept mask ``keep``."""
    return term_losses(term, [keep])[0]


def output_losses(problem: PermutationProblem, perms: list[np.ndarray | None], cache: dict | None = None
                  ) -> list[float]:
    """:func:`output_loss` of several permutations (each sibling's normalizer computed once; pass the same ``cache``
    dict to later calls on the same problem to reuse it)."""
    if problem.outputs is None:
        raise ValueError(f"{problem.name}: output_loss needs problem.outputs")
    ps = [np.arange(problem.k) if p is None else np.asarray(p, dtype=np.int64) for p in perms]
    cache = {} if cache is None else cache
    total = np.zeros(len(ps))
    for i, t in enumerate(problem.outputs):
        if i not in cache:
            dt = _precision(t)
            h64 = np.asarray(t.hessian, dtype=np.float64)
            h = torch.as_tensor(h64 / (float(np.mean(np.abs(np.diag(h64)))) or 1.0), dtype=dt)
            cache[i] = _quad(h, torch.as_tensor(np.array(t.weight, dtype=np.float64), dtype=dt))
            del h
        total += np.asarray(term_losses(t, [term_masks(t, p, problem.n, problem.m) for p in ps], den=cache[i]))
    return [float(v) for v in total]


def output_loss(problem: PermutationProblem, perm: np.ndarray | None = None) -> float:
    """Exact output loss of ``perm`` (None: identity), summed over siblings; see the module doc. Float64 (float32 for
    siblings with ``K²N > 2³¹``)."""
    return output_losses(problem, [perm])[0]


def reconstructed_loss(problem: PermutationProblem, perm: np.ndarray | None = None, *, damp: float = DEFAULT_DAMP,
                       block_size: int = 128) -> float:
    """Σ_i relative output error after SparseGPT N:M (mask choice and update, :func:`~permsparse.optimizer.sparsegpt.
    sparsegpt_nm`) of each sibling in the order ``σ_i(perm)``: the exact objective when ``--reconstruct sparsegpt``
    follows the permutation. One SparseGPT run per sibling (seconds at K ≈ 1–2k): meant for choosing among a few
    candidate permutations, not inside a search. Its cheap diagonal surrogate is the importance objective on ``obs``
    scores (pruned ``Σ w²/[H⁻¹]_kk``)."""
    from permsparse.optimizer.sparsegpt import sparsegpt_nm

    if problem.outputs is None:
        raise ValueError(f"{problem.name}: reconstructed_loss needs problem.outputs")
    p = np.arange(problem.k) if perm is None else np.asarray(perm, dtype=np.int64)
    total = 0.0
    for t in problem.outputs:
        res = sparsegpt_nm(np.asarray(t.weight, dtype=np.float32), t.hessian, problem.n, problem.m,
                           perm=sibling_rows(p, t.row_map), damp=damp, block_size=block_size)
        total += res.rel_error
    return float(total)


def _copies(row_map: np.ndarray | None, k: int) -> np.ndarray:
    """``rows [k, C]``: actual rows holding canonical channel q (one per tied copy), −1 where a class has fewer."""
    if row_map is None:
        return np.arange(k)[:, None]
    rm = np.asarray(row_map, dtype=np.int64)
    order = np.argsort(rm, kind="stable")
    counts = np.bincount(rm, minlength=k)
    out = -np.ones((k, max(1, int(counts.max()))), dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    slot = np.arange(rm.size) - np.repeat(starts, counts)
    out[rm[order], slot] = order
    return out


class _Term:
    """One sibling on the torch side: scaled W, H, score and the current E and G = H E (float32)."""

    def __init__(self, t: OutputTerm, k: int, device: torch.device, hcache: dict):
        w = np.array(t.weight, dtype=np.float64)  # a copy: inputs may be read-only
        harr = np.asarray(t.hessian)
        key = (harr.__array_interface__["data"][0], harr.shape, harr.strides)  # siblings' views of one H: one copy
        if key not in hcache:
            h64 = np.asarray(t.hessian, dtype=np.float64)
            hs = float(np.mean(np.abs(np.diag(h64)))) or 1.0
            hcache[key] = (torch.as_tensor(h64 / hs, dtype=torch.float32, device=device), hs)
        self.h, hs = hcache[key]
        w_t = torch.as_tensor(w, dtype=torch.float32, device=device)
        den = float((w_t * (self.h @ w_t)).sum())
        self.w = w_t / np.sqrt(den) if den > 0 else torch.zeros_like(w_t)  # loss is relative: tr(EᵀHE) directly
        sc = np.asarray(t.score, dtype=np.float64)
        self.score = torch.as_tensor(sc / (float(sc.mean()) or 1.0), dtype=torch.float32, device=device)
        self.colscale = self.score.mean(dim=0).clamp_min(1e-12)  # [N_i]
        rows = _copies(t.row_map, k)
        self.valid = torch.as_tensor(rows >= 0, device=device)  # [k, C]
        self.rows = torch.as_tensor(np.where(rows >= 0, rows, 0), device=device)  # [k, C]
        self.row_map = t.row_map
        self.keep = torch.ones_like(self.w, dtype=torch.bool)
        self.e = torch.zeros_like(self.w)
        self.g = torch.zeros_like(self.w)

    def reset(self, perm: np.ndarray, n: int, m: int) -> None:
        sig = torch.as_tensor(sibling_rows(perm, self.row_map), device=self.w.device)
        keep_p = _hard_keep(self.score[sig], n, m)
        self.keep = torch.empty_like(keep_p)
        self.keep[sig] = keep_p
        self.e = torch.where(self.keep, torch.zeros((), device=self.w.device), self.w)
        self.g = self.h @ self.e

    def loss(self) -> float:
        return float((self.e.double() * self.g.double()).sum())


def _hard_keep(x: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Top-n-of-m keep mask of ``x [..., K, N]`` along K (groups of m consecutive rows); among equal values the lower
    row wins, exactly as :func:`~permsparse.optimizer.base.nm_keep_mask` (a stable sort) decides."""
    shp = x.shape
    g = x.reshape(*shp[:-2], shp[-2] // m, m, shp[-1])
    rank = torch.zeros(g.shape, dtype=torch.uint8, device=x.device)
    for j in range(m):
        gj = g[..., j : j + 1, :]
        rank += gj > g
        if j + 1 < m:
            rank[..., j + 1 :, :] += gj == g[..., j + 1 :, :]
    return (rank < n).reshape(shp)


class WindowBatch:
    """The data of ``nw`` windows (channels ``src [nw, w]`` at positions in ascending order), per sibling."""

    def __init__(self, state: OutputState, src: np.ndarray):
        self.src = torch.as_tensor(src, device=state.device)
        self.nw, self.w = src.shape
        self.parts = []
        for t in state.terms:
            rows = t.rows[self.src]  # [nw, w, C]
            valid = t.valid[self.src]  # [nw, w, C]
            flat = rows.reshape(self.nw, -1)  # [nw, w*C]
            vflat = valid.reshape(self.nw, -1, 1).float()
            c = rows.shape[-1]
            ncol = t.w.shape[1]
            wg = t.w[flat] * vflat  # [nw, wC, N]
            sg = (t.score[flat] * vflat).reshape(self.nw, self.w, c * ncol)
            eg = t.e[flat] * vflat
            gg = t.g[flat] * vflat
            hg = t.h[flat[:, :, None], flat[:, None, :]] * vflat * vflat.transpose(1, 2)  # [nw, wC, wC]
            colscale = t.colscale.repeat(c)  # [C*N]
            self.parts.append((wg, sg, eg, gg, hg, c, ncol, colscale))

    def _delta(self, prune_ch: list[torch.Tensor]) -> torch.Tensor:
        """Loss change ``[..., nw]`` for pruned amounts per channel ``[..., nw, w, C*N]`` (one per sibling)."""
        total = None
        for (wg, _sg, eg, gg, hg, c, ncol, _cs), pr in zip(self.parts, prune_ch):
            e_new = wg * pr.reshape(*pr.shape[:-2], self.w * c, ncol)
            d = e_new - eg
            val = 2.0 * (d * gg).sum(dim=(-2, -1)) + (d * torch.matmul(hg, d)).sum(dim=(-2, -1))
            total = val if total is None else total + val
        return total

    def exact(self, sig: torch.Tensor, n: int, m: int) -> torch.Tensor:
        """Exact loss change (rest fixed) of hard assignments ``sig [..., nw, w]`` (slot a gets channel sig[a])."""
        inv = torch.argsort(sig, dim=-1)
        prunes = []
        for wg, sg, eg, gg, hg, c, ncol, _cs in self.parts:
            cols = sg.shape[-1]
            sp = torch.gather(sg.expand(*sig.shape[:-1], self.w, cols), -2, sig[..., None].expand(*sig.shape, cols))
            keep_pos = _hard_keep(sp, n, m).float()
            keep_ch = torch.gather(keep_pos, -2, inv[..., None].expand(*sig.shape, cols))
            prunes.append(1.0 - keep_ch)
        return self._delta(prunes)

    def exact_splits(self, splits: torch.Tensor, n: int, m: int) -> torch.Tensor:
        """Exact loss change ``[S, nw]`` of re-splitting each window's channels into groups of m, for every split in
        ``splits [S, w]`` (slot → channel, channels ascending inside each group, as
        :func:`~permsparse.optimizer.outlearn.split_assignments` makes them). Ties keep the lower channel index, as
        ``nm_keep_mask`` keeps the lower position. The ranks come from one batched matmul,
        ``rank[c] = Σ_d same_group[c, d] · beats[d, c]``, instead of a top-k per split."""
        w = self.w
        slot_group = (torch.arange(w, device=splits.device) // m).expand_as(splits)
        group_of = torch.empty_like(splits).scatter_(1, splits, slot_group)  # [S, w]: group of each channel
        same = (group_of[:, :, None] == group_of[:, None, :]).float().permute(1, 0, 2)[None]  # [1, c, S, d]
        lower = torch.tril(torch.ones((w, w), dtype=torch.bool, device=splits.device), diagonal=-1)  # [c, d]: d < c
        prunes = []
        for _wg, sg, _eg, _gg, _hg, _c, _ncol, _cs in self.parts:
            x_c = sg[:, :, None, :]  # [nw, c, 1, cols]
            x_d = sg[:, None, :, :]  # [nw, 1, d, cols]
            beats = (x_d > x_c) | ((x_d == x_c) & lower[None, :, :, None])  # [nw, c, d, cols]
            rank = torch.matmul(same, beats.float())  # [nw, c, S, cols]
            prunes.append((rank >= n - 0.5).float().permute(2, 0, 1, 3))  # [S, nw, c, cols]
        return self._delta(prunes)

    def relaxed(self, p: torch.Tensor, n: int, m: int, temp: float) -> torch.Tensor:
        """Differentiable loss change ``[nw]`` for soft permutations ``p [nw, w(slot), w(channel)]``."""
        from permsparse.optimizer.relax import soft_topn

        prunes = []
        for wg, sg, eg, gg, hg, c, ncol, colscale in self.parts:
            sp = torch.bmm(p, sg)  # permuted scores by slot
            mask = soft_topn(sp.reshape(self.nw, self.w // m, m, -1), n, temp * colscale).reshape(sp.shape)
            prunes.append(torch.bmm(p.transpose(1, 2), 1.0 - mask))  # back to channels
        return self._delta(prunes)


class OutputState:
    """The current permutation with every sibling's E and G, for exact incremental moves."""

    def __init__(self, problem: PermutationProblem, perm: np.ndarray, device: torch.device | str = "cpu"):
        if problem.outputs is None:
            raise ValueError(f"{problem.name}: the output objective needs problem.outputs")
        self.problem = problem
        self.device = torch.device(device)
        hcache: dict = {}
        self.terms = [_Term(t, problem.k, self.device, hcache) for t in problem.outputs]
        self.perm = np.asarray(perm, dtype=np.int64).copy()
        self.reset()

    def reset(self) -> None:
        """Recompute every E and G from ``perm`` (also clears float32 drift of the incremental updates)."""
        for t in self.terms:
            t.reset(self.perm, self.problem.n, self.problem.m)

    def loss(self) -> float:
        return float(sum(t.loss() for t in self.terms))

    def _changes(self, wb: WindowBatch, sig: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per sibling ``(rows, keep_rows, e_new)`` of the rows changed by hard assignments ``sig [nw, w]``."""
        n, m = self.problem.n, self.problem.m
        inv = torch.argsort(sig, dim=-1)
        out = []
        for t, (wg, sg, eg, gg, hg, c, ncol, _cs) in zip(self.terms, wb.parts):
            cols = sg.shape[-1]
            sp = torch.gather(sg, -2, sig[..., None].expand(wb.nw, wb.w, cols))
            keep_ch = torch.gather(_hard_keep(sp, n, m), -2, inv[..., None].expand(wb.nw, wb.w, cols))
            valid = t.valid[wb.src].reshape(-1)
            rows = t.rows[wb.src].reshape(-1)[valid]
            keep_rows = keep_ch.reshape(wb.nw * wb.w * c, ncol)[valid]
            out.append((rows, keep_rows, torch.where(keep_rows, torch.zeros((), device=self.device), t.w[rows])))
        return out

    def apply(self, pos: np.ndarray, src: np.ndarray, sig: np.ndarray, *, tol: float = 1e-7) -> float:
        """Apply window moves ``[J, w]`` (disjoint windows; positions ascending per window, ``src`` the channels there,
        slot a gets ``src[sig[a]]``) if together they lower the loss; returns the exact (float32) joint change applied,
        or 0.0 when rejected (nothing changes). Uses ``L(E + D) − L(E) = ⟨D, G_old⟩ + ⟨D, G_new⟩`` on the changed
        rows, so the check costs the G update it needs anyway."""
        if len(pos) == 0:
            return 0.0
        wb = WindowBatch(self, np.asarray(src))
        changes = self._changes(wb, torch.as_tensor(np.asarray(sig), device=self.device))
        delta = 0.0
        new_g = []
        for t, (rows, _keep, e_new) in zip(self.terms, changes):
            d = e_new - t.e[rows]
            g_new = t.g + t.h[:, rows] @ d
            delta += float((d.double() * (t.g[rows].double() + g_new[rows].double())).sum())
            new_g.append(g_new)
        if not delta < -tol:
            return 0.0
        for t, (rows, keep_rows, e_new), g_new in zip(self.terms, changes, new_g):
            t.keep[rows] = keep_rows
            t.e[rows] = e_new
            t.g = g_new
        pos = np.asarray(pos)
        self.perm[pos] = np.take_along_axis(np.asarray(src), np.asarray(sig), axis=1)
        return delta

    def apply_greedy(self, pos: np.ndarray, src: np.ndarray, sig: np.ndarray, gains: np.ndarray) -> int:
        """Apply improving window moves: all at once when their exact joint change is negative, else one at a time
        (best predicted first, each re-checked). Returns the number of windows applied."""
        if len(pos) == 0:
            return 0
        if self.apply(pos, src, sig) < 0.0:
            return len(pos)
        applied = 0
        for j in np.argsort(gains):
            if self.apply(pos[j : j + 1], self.perm[pos[j : j + 1]], sig[j : j + 1]) < 0.0:
                applied += 1
        return applied


__all__ = [
    "OutputState",
    "WindowBatch",
    "exact_in_float64",
    "output_loss",
    "output_losses",
    "reconstructed_loss",
    "term_loss",
    "term_losses",
    "term_masks",
]

"""Differentiable relaxations shared by the learners: Sinkhorn soft permutations, their Hungarian rounding, and soft
N-of-M masks (exact 0/1 as the temperature goes to 0)."""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment


def log_sinkhorn(logits: torch.Tensor, iters: int) -> torch.Tensor:
    """Log of a (nearly) doubly-stochastic matrix from ``logits [..., w, w]`` (rows, then columns, ``iters`` times)."""
    z = logits
    for _ in range(iters):
        z = z - torch.logsumexp(z, dim=-1, keepdim=True)
        z = z - torch.logsumexp(z, dim=-2, keepdim=True)
    return z


def hungarian(cost: np.ndarray) -> np.ndarray:
    """``sigma`` maximizing ``sum cost[a, sigma[a]]`` for each ``[..., w, w]`` matrix (``sigma[a]``: source row of slot a)."""
    cost = np.asarray(cost, dtype=np.float64)
    flat = cost.reshape(-1, cost.shape[-2], cost.shape[-1])
    out = np.empty(flat.shape[:2], dtype=np.int64)
    for i, c in enumerate(flat):
        rows, cols = linear_sum_assignment(c, maximize=True)
        out[i, rows] = cols
    return out.reshape(cost.shape[:-1])


def soft_topn(x: torch.Tensor, n: int, temp: torch.Tensor) -> torch.Tensor:
    """Soft N-of-M mask of ``x [..., m, N]`` along the m axis: sigmoid((x − thr) / temp), thr between the n-th and
    (n+1)-th largest value of each group (exactly 0/1 as temp → 0)."""
    top = torch.topk(x, n + 1, dim=-2).values
    thr = 0.5 * (top[..., n - 1 : n, :] + top[..., n : n + 1, :])
    return torch.sigmoid((x - thr) / temp)


def hard_topn(x: torch.Tensor, n: int) -> torch.Tensor:
    idx = torch.topk(x, n, dim=-2).indices
    return torch.zeros_like(x).scatter_(-2, idx, 1.0)


def sample_roundings(cost: np.ndarray, samples: int, noise: float, rng: np.random.Generator) -> np.ndarray:
    """``samples`` hard roundings of learned costs ``[W, w, w]`` by Hungarian: the plain one first, then with Gumbel
    noise on the costs at graded levels (up to ``noise`` × each window's cost spread). Returns ``sigma [S, W, w]``."""
    c = np.asarray(cost, dtype=np.float64)
    spread = c.max(axis=(1, 2), keepdims=True) - c.min(axis=(1, 2), keepdims=True) + 1e-12
    levels = (np.arange(samples) / max(1, samples - 1))[:, None, None, None]
    gum = rng.gumbel(size=(samples, *c.shape)) * (noise * spread * levels)
    gum[0] = 0.0
    return hungarian(c[None] + gum)

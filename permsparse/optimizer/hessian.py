"""The dampened Hessian shared by SparseGPT's solve and the OBS score, and the one default dampening.

``H_d = H + λI`` with ``λ = damp · mean(diag H)`` (dead channels, whose row and column of the Gram matrix are zero,
get ``1 + λ`` on the diagonal so they decouple). :data:`DEFAULT_DAMP` is the default of ``--damp``
(:class:`permsparse.pipeline.config.OptimizeConfig`), of :func:`permsparse.optimizer.sparsegpt.sparsegpt_nm`, of the OBS
importance and of the reconstruction objective. Light at import (numpy; torch only when a factorization runs).

Invariant: ``H_d`` is symmetric positive definite whenever ``H`` is a Gram matrix XᵀX and ``damp > 0``.
"""

from __future__ import annotations

import numpy as np

from permsparse.errors import PermsparseError

DEFAULT_DAMP = 0.1
"""SparseGPT/OBS dampening, a share of mean(diag H). 0.01 (SparseGPT's paper value) overfits the few calibration
tokens: MiniLM pooled cosine 0.848 at 0.01 vs 0.859 at 0.1."""


def dampened_hessian(hessian: np.ndarray, damp: float = DEFAULT_DAMP) -> tuple[np.ndarray, float, np.ndarray]:
    """``(H + λI with dead diagonals set to 1 + λ, λ, dead)`` in float64, ``λ = damp · mean(diag H)``.

    A dead channel's row and column of a Gram matrix are zero, so giving it any positive diagonal decouples it. When H
    is all zero, λ = damp (so the factorization still exists).
    """
    h = np.array(hessian, dtype=np.float64, copy=True)
    if h.ndim != 2 or h.shape[0] != h.shape[1]:
        raise PermsparseError(f"the Hessian must be square [K, K], got {h.shape}")
    if not np.all(np.isfinite(h)):
        raise PermsparseError("the Hessian has NaN/inf entries; recollect calibration statistics (fp16 overflow?)")
    diag = np.diag(h).copy()
    if np.any(diag < 0.0):
        raise PermsparseError("the Hessian has negative diagonal entries, so it is not a Gram matrix XᵀX; pass the "
                              "sum of xᵀx over calibration tokens of the weight's input")
    dead = diag == 0.0
    lam = float(damp) * float(diag.mean()) if diag.size else 0.0
    if lam <= 0.0:
        lam = float(damp) if damp > 0 else 1e-8
    idx = np.arange(h.shape[0])
    h[idx, idx] += lam
    h[idx[dead], idx[dead]] = 1.0 + lam
    return h, lam, dead


def inverse_hessian_diag(hessian: np.ndarray, damp: float = DEFAULT_DAMP) -> np.ndarray:
    """``diag((H + λI)⁻¹)`` (float64, the OBS denominator), λ and dead channels as in :func:`dampened_hessian`."""
    import torch

    hd, _, _ = dampened_hessian(hessian, damp)
    h = torch.as_tensor(hd, dtype=torch.float64)
    lower, info = torch.linalg.cholesky_ex(h)
    if int(info) != 0:
        raise PermsparseError("OBS importance: the dampened Hessian is not positive definite; raise the dampening")
    return torch.cholesky_inverse(lower).diagonal().numpy().copy()

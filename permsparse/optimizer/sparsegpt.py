"""SparseGPT N:M (Frantar & Alistarh 2023): OBS mask choice and update of the kept weights, in a permuted channel order.

Layout: ``w [K, N]`` is K-major (ONNX ``MatMul`` B layout): rows are input channels, the axis the N:M groups run along
and the axis a permutation reorders; ``hessian [K, K] = XᵀX`` over the calibration tokens of the weight's input, in the
original row order. With ``perm`` (``new[i] = old[perm[i]]``) the algorithm runs on ``w[perm]`` with
``H[perm][:, perm]`` so that the groups of ``m`` are consecutive in the permuted order; weight and mask come back in the
original row order (``result.weight[perm]`` is N:M).

Algorithm (per weight, rows in the permuted order): ``H_d = H + λI`` with ``λ = damp · mean(diag H)``;
``U = chol(H_d⁻¹)`` upper (``H_d⁻¹ = UᵀU``, float64). Rows are walked in blocks of ``block_size`` (a multiple of m);
at the first row of every group of m the ``n`` rows with the largest ``w²/U_kk²`` (per column, on the weights already
updated by the errors of earlier rows) are kept; for every row k the pruned entries are zeroed and the error
``err = (w_k − ŵ_k)/U_kk`` is moved onto the later rows (``W[k+1:] −= U[k, k+1:]ᵀ ⊗ err``): at once inside its group
of m, lazily (one matmul per group) for the rest of the block, lazily (one matmul per block) for the rows after the
block. The result is the same as the row-by-row order of the reference (every row sees every earlier error before it is
used); only memory traffic changes. Updates run as float32 torch matmuls, the factorization in float64.

Dead channels (``H_kk = 0``: the channel is zero on every calibration token, so its row of H is zero too) are decoupled
from the others; they are pruned first (free on the calibration data) but, unlike the reference implementation, a
*kept* dead row is left unchanged rather than zeroed, since zeroing it would change outputs on inputs where the channel
is live.

Invariant that makes it correct: for a fixed mask, row k's update is the optimal (OBS) compensation of its pruning by
the rows after it, given rows before it are frozen, under ``H_d``; hence the result never has a larger damped error
than applying the same mask without update, and ``Σ err_k² = tr((W−Ŵ)ᵀ H_d (W−Ŵ))``. Pruned entries are exactly 0.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from permsparse.errors import PermsparseError
from permsparse.optimizer.hessian import (
    DEFAULT_DAMP,
    dampened_hessian,
    inverse_hessian_diag,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SparseGPTResult:
    """What :func:`sparsegpt_nm` returns (arrays in the ORIGINAL row order).

    Attributes:
        weight: ``[K, N]`` in the input's dtype; pruned entries are exactly 0.
        mask: ``[K, N]`` bool, True where kept.
        rel_error: ``tr((W−Ŵ)ᵀ H (W−Ŵ)) / tr(Wᵀ H W)`` with the undamped H (NaN when not computed).
        rel_error_masked: the same for ``W ⊙ mask`` (the mask without the update) (NaN when not computed).
        damp_lambda: the λ added to the diagonal.
        dead: number of dead input channels (``H_kk == 0``).
        seconds: wall time of the factorization and the sweep (errors excluded).
    """

    weight: np.ndarray
    mask: np.ndarray
    rel_error: float
    rel_error_masked: float
    damp_lambda: float
    dead: int
    seconds: float


def _cholesky_inverse_upper(hd: np.ndarray) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``H_d⁻¹`` (``H_d⁻¹ = UᵀU``, float64 torch) from ONE factorization.

    With ``J`` the order reversal and ``L = chol(J H_d J)`` (lower), ``H_d⁻¹ = (J L⁻¹ J)ᵀ (J L⁻¹ J)`` and ``J L⁻¹ J`` is
    upper triangular with a positive diagonal, so it is that factor: one Cholesky and one triangular inverse (LAPACK
    ``dtrtri``) instead of the reference's Cholesky, ``cholesky_inverse`` and a second Cholesky (about half the flops).
    """
    from scipy.linalg import lapack

    rev = np.ascontiguousarray(hd[::-1, ::-1])
    lower, info = torch.linalg.cholesky_ex(torch.as_tensor(rev, dtype=torch.float64))
    if int(info) != 0:
        raise PermsparseError(
            "SparseGPT: the dampened Hessian is not positive definite (calibration statistics are not a Gram matrix "
            "XᵀX, or badly conditioned); raise the dampening (e.g. damp=0.1) or recollect statistics")
    inv, info = lapack.dtrtri(lower.numpy(), lower=1, overwrite_c=1)
    if info != 0:
        raise PermsparseError("SparseGPT: the Cholesky factor of the Hessian is singular; raise the dampening")
    # the strict upper triangle of ``inv`` is the (zero) upper triangle torch's factor came with
    return torch.as_tensor(np.ascontiguousarray(inv[::-1, ::-1]))


def _check_perm(perm: np.ndarray | None, k: int) -> np.ndarray:
    if perm is None:
        return np.arange(k)
    p = np.asarray(perm, dtype=np.int64).reshape(-1)
    if p.shape != (k,) or not np.array_equal(np.sort(p), np.arange(k)):
        raise PermsparseError(f"SparseGPT: perm must be a permutation of the K={k} input channels")
    return p


def relative_error(w: np.ndarray, w_hat: np.ndarray, hessian: np.ndarray) -> float:
    """``tr((W−Ŵ)ᵀ H (W−Ŵ)) / tr(Wᵀ H W)`` in float64 (0/0 → 0)."""
    w64 = np.asarray(w, dtype=np.float64)
    d = w64 - np.asarray(w_hat, dtype=np.float64)
    h = np.asarray(hessian, dtype=np.float64)
    num = float(np.einsum("kn,kn->", d, h @ d))
    den = float(np.einsum("kn,kn->", w64, h @ w64))
    return 0.0 if den <= 0.0 else num / den


def _errors(h: np.ndarray, w: np.ndarray, w_hat: torch.Tensor, keep: torch.Tensor, dev: torch.device
            ) -> tuple[float, float]:
    """``(rel_error, rel_error_masked)`` (see :class:`SparseGPTResult`), all in the same (permuted) row order."""
    k, cols = w.shape
    dt = torch.float64 if k * k * cols <= 2**31 else torch.float32
    scale = float(np.mean(np.abs(np.diag(h)))) or 1.0  # keep float32 far from overflow/denormals
    ht = torch.as_tensor(h / scale, dtype=dt).to(dev)
    wd = torch.as_tensor(w, dtype=dt).to(dev)
    den = float((wd * (ht @ wd)).sum())
    d1 = wd - w_hat.to(dt) * keep
    num1 = float((d1 * (ht @ d1)).sum())
    d0 = wd * ~keep
    num0 = float((d0 * (ht @ d0)).sum())
    if den <= 0.0:
        return 0.0, 0.0
    return num1 / den, num0 / den


def masked_least_squares(h: torch.Tensor, w: torch.Tensor, keep: torch.Tensor, x0: torch.Tensor,
                         iters: int) -> torch.Tensor:
    """``iters`` preconditioned CG steps, all columns at once, on ``min_x tr((x−w)ᵀ h (x−w))`` with ``x`` zero off
    ``keep`` (a convex quadratic on the kept entries, so every step lowers it), from ``x0`` (zero off ``keep``)."""
    km = keep.to(h.dtype)
    dinv = 1.0 / h.diagonal().clamp_min(1e-30)[:, None]
    x = x0 * km
    r = -(km * (h @ (x - w)))
    z = dinv * r
    d = z.clone()
    rz = (r * z).sum(dim=0)
    for _ in range(int(iters)):
        hd = km * (h @ d)
        curv = (d * hd).sum(dim=0)
        alpha = torch.where(curv > 0, rz / curv.clamp_min(1e-30), torch.zeros_like(curv))
        x = x + alpha * d
        r = r - alpha * hd
        z = dinv * r
        rz_new = (r * z).sum(dim=0)
        beta = torch.where(rz > 0, rz_new / rz.clamp_min(1e-30), torch.zeros_like(rz))
        d = z + beta * d
        rz = rz_new
    return x * km


def sparsegpt_nm(w: np.ndarray, hessian: np.ndarray, n: int, m: int, *, perm: np.ndarray | None = None,
                 damp: float = DEFAULT_DAMP, block_size: int = 128, mask: np.ndarray | None = None,
                 refine_iters: int = 0, compute_error: bool = True,
                 device: str | torch.device = "cpu") -> SparseGPTResult:
    """SparseGPT N:M on ``w [K, N]`` (K-major) with ``hessian [K, K] = XᵀX`` (original row order); see the module doc.

    Args:
        n, m: keep ``n`` of every ``m`` consecutive rows (in the permuted order), per column.
        perm: ``new[i] = old[perm[i]]``; None: identity.
        damp: relative dampening λ = damp · mean(diag H).
        block_size: rows per lazy-update block (rounded down to a multiple of m, at least m).
        mask: ``[K, N]`` bool in the original row order: use this mask (no choice), only update the kept weights.
        refine_iters: after the sweep, this many conjugate-gradient steps (Jacobi-preconditioned, float32, one
            ``K²N`` product each) on the kept weights towards the exact least-squares optimum for the chosen mask
            under ``H_d`` (SparseGPT freezes earlier rows, so it stops short of it); 0: plain SparseGPT.
        compute_error: compute the relative output errors (three ``K²N`` products: float64 up to ``K²N = 2³¹``,
            float32 above, where float64 would cost more than the sweep).
        device: torch device of the sweep (the factorization always runs on the CPU in float64).

    Raises:
        PermsparseError: shapes that do not match, K not divisible by m, a Hessian that is not a Gram matrix.
    """
    w_np = np.asarray(w)
    if w_np.ndim != 2:
        raise PermsparseError(f"SparseGPT needs a 2-D weight [K, N] (MatMul layout), got shape {w_np.shape}")
    if not np.issubdtype(w_np.dtype, np.floating):
        raise PermsparseError(f"SparseGPT needs a float weight, got {w_np.dtype}")
    k, cols = w_np.shape
    h_np = np.asarray(hessian)
    if h_np.shape != (k, k):
        raise PermsparseError(f"SparseGPT: the Hessian is {h_np.shape} but the weight has K={k} input rows; "
                              "pass XᵀX of the tensor this weight reads")
    if not 0 < n <= m:
        raise PermsparseError(f"SparseGPT: need 0 < n <= m, got {n}:{m}")
    choose = mask is None
    if choose and k % m:
        raise PermsparseError(f"SparseGPT: K={k} is not divisible by M={m}")
    p = _check_perm(perm, k)
    t0 = time.perf_counter()
    hp = h_np[np.ix_(p, p)]
    hd, lam, dead = dampened_hessian(hp, damp)
    u = _cholesky_inverse_upper(hd)
    dev = torch.device(device)
    u32 = u.to(device=dev, dtype=torch.float32)
    del u, hd
    wt = torch.as_tensor(np.ascontiguousarray(w_np[p]), dtype=torch.float32).to(dev)
    if choose:
        keep = torch.zeros((k, cols), dtype=torch.bool, device=dev)
    else:
        mk = np.asarray(mask, dtype=bool)
        if mk.shape != (k, cols):
            raise PermsparseError(f"SparseGPT: mask shape {mk.shape} does not match the weight {w_np.shape}")
        keep = torch.as_tensor(np.ascontiguousarray(mk[p])).to(dev)
    dead_t = torch.as_tensor(dead).to(dev)
    bs = max(m, int(block_size) - int(block_size) % m)
    g = m if choose else min(m, bs)
    zero = torch.zeros((), dtype=torch.float32, device=dev)
    for i1 in range(0, k, bs):
        i2 = min(i1 + bs, k)
        w1 = wt[i1:i2].clone()
        err1 = torch.empty_like(w1)
        u1 = u32[i1:i2, i1:i2]
        d1 = u1.diagonal()
        for j1 in range(0, i2 - i1, g):  # one group of m rows: exact sequential updates inside it
            j2 = min(j1 + g, i2 - i1)
            if choose:
                if n < m:
                    score = w1[j1:j2] ** 2 / (d1[j1:j2, None] ** 2)
                    score[dead_t[i1 + j1 : i1 + j2]] = -1.0  # dead channels are pruned first
                    idx = torch.topk(score, n, dim=0).indices
                    keep[i1 + j1 : i1 + j2].scatter_(0, idx, True)
                else:
                    keep[i1 + j1 : i1 + j2] = True
            for i in range(j1, j2):
                row = w1[i]
                q = torch.where(keep[i1 + i], row, zero)
                err = (row - q) / d1[i]
                if i + 1 < j2:
                    w1[i + 1 : j2] -= u1[i, i + 1 : j2, None] * err[None, :]
                w1[i] = q
                err1[i] = err
            if j2 < i2 - i1:  # the group's errors onto the rest of the block
                w1[j2:] -= u1[j1:j2, j2:].T @ err1[j1:j2]
        wt[i1:i2] = w1
        if i2 < k:  # lazily onto the rows after the block
            wt[i2:] -= u32[i1:i2, i2:].T @ err1
    if refine_iters > 0:
        hd_t = torch.as_tensor(hp, dtype=torch.float32).to(dev)
        hd_t.diagonal().add_(lam)
        hd_t.diagonal()[dead_t] = 1.0 + lam
        w_ref = torch.as_tensor(np.ascontiguousarray(w_np[p]), dtype=torch.float32).to(dev)
        w_ref[dead_t] = wt[dead_t]  # kept dead rows stay as they are (their target is themselves)
        wt = masked_least_squares(hd_t, w_ref, keep, wt, refine_iters)
        del hd_t, w_ref
    seconds = time.perf_counter() - t0
    rel, rel_masked = float("nan"), float("nan")
    if compute_error:
        rel, rel_masked = _errors(hp, w_np[p], wt, keep, dev)
    del hp
    inv = np.argsort(p)
    keep_orig = keep.cpu().numpy()[inv]
    w_hat = wt.cpu().numpy()[inv]
    w_hat[~keep_orig] = 0.0
    out = w_hat.astype(w_np.dtype, copy=False)
    log.debug("sparsegpt %dx%d %d:%d: %.2fs, rel err %.4g (mask only %.4g), %d dead", k, cols, n, m, seconds, rel,
              rel_masked, int(dead.sum()))
    return SparseGPTResult(weight=out, mask=keep_orig, rel_error=rel, rel_error_masked=rel_masked,
                           damp_lambda=lam, dead=int(dead.sum()), seconds=seconds)


__all__ = ["SparseGPTResult", "dampened_hessian", "inverse_hessian_diag", "masked_least_squares", "relative_error",
           "sparsegpt_nm"]

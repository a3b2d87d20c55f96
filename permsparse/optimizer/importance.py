"""Per-element importance scores for a prunable weight.

All functions take a weight in ONNX ``MatMul`` layout ``W [K, N]``: rows are the K input (reduction) channels, the
axis along which 2:4 groups run and the axis the learned permutation reorders; columns are the N output channels.
``x_norm [K]`` is the per-input-channel activation norm ``||X_k||_2`` over all calibration tokens
(:attr:`permsparse.optimizer.calibration.ActivationStats.norm`).

Scores are non-negative ``float32`` arrays shaped like ``W`` (sums are taken in ``float64``).

- ``magnitude``: ``|W|``.
- ``wanda`` (Sun et al. 2023): ``|W_kn| * ||X_k||``.
- ``ria`` (Zhang et al. 2024, "Plug-and-Play"): relative importance times activation norm to the power ``a``.
  In their ``[out, in]`` convention ``RI_ij = |W_ij| / sum_j |W_ij| + |W_ij| / sum_i |W_ij|``: the first term
  normalizes by everything feeding output ``i``, the second by everything fed by input ``j``. In our ``[K, N]``
  layout output ``n`` is column ``n`` (sum over axis 0) and input ``k`` is row ``k`` (sum over axis 1), so
  ``RI[k, n] = |W| / colsum_n + |W| / rowsum_k``; the activation factor ``||X_k||^a`` multiplies rows.
- ``obs`` (Optimal Brain Surgeon, as SparseGPT's mask rule): ``W_kn² / [H⁻¹]_kk`` with ``H = XᵀX + λI``
  (``λ = damp · mean(diag H)``, :func:`permsparse.optimizer.hessian.dampened_hessian`): the output error of
  removing ``W_kn`` alone when every other weight of column n is re-fitted. Needs the Hessian ``XᵀX [K, K]`` (or the
  diagonal of its dampened inverse) instead of ``x_norm``. It is equivariant under row permutations, so it can serve
  as the masking score of a permutation problem (the diagonal surrogate of the error after reconstruction).

The registry: :data:`IMPORTANCE_REGISTRY` maps each name to an :class:`Importance` (its score function, which
statistics it needs, whether ``--importance`` offers it), filled by the :func:`register` decorator below; the CLI
choices and :class:`permsparse.pipeline.config.OptimizeConfig`'s validation read it. Adding an importance: one registered
function here plus a test. :func:`masking_score` is the one entry point of the pipeline (whole-model, block-wise and
the plain N:M comparison): it derives ``‖X_k‖ = sqrt(H_kk)`` from a Hessian when that is what the caller holds.

Invariant: every score is a function of ``(W_kn, statistics of input channel k)`` only (plus the row/column sums of
``|W|`` for RIA), so permuting the rows of ``W`` and the channel statistics together permutes the scores.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from permsparse.errors import PermsparseError
from permsparse.optimizer.hessian import DEFAULT_DAMP, inverse_hessian_diag

logger = logging.getLogger(__name__)

RIA_DEFAULT_A = 0.5


def _as_weight(W: Any) -> np.ndarray:
    w = np.asarray(W)
    if w.ndim != 2:
        raise PermsparseError(f"importance needs a 2-D weight [K, N] (MatMul layout), got shape {w.shape}")
    if not np.issubdtype(w.dtype, np.floating):
        w = w.astype(np.float32)
    return w


def _as_norm(x_norm: Any, k: int, method: str) -> np.ndarray:
    x = np.asarray(x_norm, dtype=np.float64).reshape(-1)
    if x.shape != (k,):
        raise PermsparseError(
            f"{method}: activation norms have {x.shape[0]} channels but the weight has K={k} input rows; "
            "pass the norms of the tensor this weight reads (its MatMul A input)"
        )
    if not np.all(np.isfinite(x)) or np.any(x < 0):
        raise PermsparseError(
            f"{method}: activation norms must be finite and non-negative; recollect calibration statistics "
            "(NaN/inf usually means the model overflows in fp16 on the calibration data)"
        )
    return x


def magnitude(W: np.ndarray) -> np.ndarray:
    """``|W|`` as ``float32`` ``[K, N]``."""
    return np.abs(_as_weight(W)).astype(np.float32, copy=False)


def wanda(W: np.ndarray, x_norm: np.ndarray) -> np.ndarray:
    """Wanda score ``|W[k, n]| * x_norm[k]`` (``x_norm[k] = ||X_k||_2`` over calibration tokens), ``float32 [K, N]``."""
    w = _as_weight(W)
    x = _as_norm(x_norm, w.shape[0], "wanda")
    return (np.abs(w).astype(np.float64) * x[:, None]).astype(np.float32)


def ria(W: np.ndarray, x_norm: np.ndarray, a: float = RIA_DEFAULT_A) -> np.ndarray:
    """RIA score ``(|W|/sum_row|W| + |W|/sum_col|W|) * x_norm[:, None] ** a`` for ``W [K, N]``, ``float32``.

    ``sum_row`` is the sum over a row (all outputs fed by input channel ``k``), ``sum_col`` over a column (all inputs
    of output ``n``); the relative-importance term is symmetric in the two, so it equals the paper's
    ``|W_ij|/sum_j|W_ij| + |W_ij|/sum_i|W_ij|`` for their ``[out, in]`` matrix. All-zero rows/columns contribute 0.
    """
    w = np.abs(_as_weight(W)).astype(np.float64)
    x = _as_norm(x_norm, w.shape[0], "ria")
    row = w.sum(axis=1, keepdims=True)  # [K, 1]
    col = w.sum(axis=0, keepdims=True)  # [1, N]
    rel = np.divide(w, row, out=np.zeros_like(w), where=row > 0)
    rel += np.divide(w, col, out=np.zeros_like(w), where=col > 0)
    return (rel * (x[:, None] ** float(a))).astype(np.float32)


def obs(W: np.ndarray, hessian: np.ndarray | None = None, *, hinv_diag: np.ndarray | None = None,
        damp: float = DEFAULT_DAMP) -> np.ndarray:
    """OBS score ``W[k, n]² / [(XᵀX + λI)⁻¹]_kk`` as ``float32 [K, N]``.

    Pass ``hessian [K, K] = XᵀX`` (original row order; dampened here with ``damp``) or ``hinv_diag [K]`` (already the
    diagonal of the dampened inverse, e.g. shared by siblings reading one tensor).
    """
    w = _as_weight(W)
    k = w.shape[0]
    if hinv_diag is None:
        if hessian is None:
            raise PermsparseError("obs importance needs the Hessian XᵀX of the weight's input (or its inverse diagonal)")
        h = np.asarray(hessian)
        if h.shape != (k, k):
            raise PermsparseError(f"obs: the Hessian is {h.shape} but the weight has K={k} input rows; pass XᵀX "
                                  "of the tensor this weight reads (its MatMul A input)")
        hinv_diag = inverse_hessian_diag(h, damp)
    d = np.asarray(hinv_diag, dtype=np.float64).reshape(-1)
    if d.shape != (k,) or not np.all(np.isfinite(d)) or np.any(d <= 0):
        raise PermsparseError(f"obs: the inverse-Hessian diagonal must be {k} finite positive values; "
                              "recollect calibration statistics or raise the dampening")
    return (np.square(w.astype(np.float64)) / d[:, None]).astype(np.float32)


@dataclass(frozen=True)
class Statistics:
    """What a score may read besides the weight: activation norms ``x_norm [K]``, the Hessian ``XᵀX [K, K]`` or the
    diagonal of its dampened inverse ``hinv_diag [K]``, RIA's exponent ``a``, the dampening ``damp``."""

    x_norm: np.ndarray | None = None
    hessian: np.ndarray | None = None
    hinv_diag: np.ndarray | None = None
    a: float = RIA_DEFAULT_A
    damp: float = DEFAULT_DAMP


@dataclass(frozen=True)
class Importance:
    """A registered importance: ``score(W, stats)``; ``needs``: the statistics it cannot do without (``weights``:
    none, ``x_norm``: calibration norms, ``hessian``: XᵀX or its inverse diagonal); ``offered``: listed by
    ``--importance`` (``obs`` is the block-wise mask rule of SparseGPT, not a user choice)."""

    name: str
    score: Callable[[np.ndarray, Statistics], np.ndarray]
    needs: Literal["weights", "x_norm", "hessian"]
    offered: bool = True


IMPORTANCE_REGISTRY: dict[str, Importance] = {}
"""The registry: importance name -> :class:`Importance` (insertion order is the order the CLI lists)."""


def register(name: str, *, needs: Literal["weights", "x_norm", "hessian"], offered: bool = True
             ) -> Callable[[Callable[[np.ndarray, Statistics], np.ndarray]], Callable[[np.ndarray, Statistics], np.ndarray]]:
    """Decorator: register ``score(W, stats)`` as importance ``name`` (a name registered twice is an error)."""

    def add(score: Callable[[np.ndarray, Statistics], np.ndarray]) -> Callable[[np.ndarray, Statistics], np.ndarray]:
        if name in IMPORTANCE_REGISTRY:
            raise ValueError(f"importance {name!r} is registered twice")
        IMPORTANCE_REGISTRY[name] = Importance(name, score, needs, offered)
        return score

    return add


@register("magnitude", needs="weights")
def _magnitude(W: np.ndarray, s: Statistics) -> np.ndarray:
    return magnitude(W)


@register("wanda", needs="x_norm")
def _wanda(W: np.ndarray, s: Statistics) -> np.ndarray:
    return wanda(W, s.x_norm)


@register("ria", needs="x_norm")
def _ria(W: np.ndarray, s: Statistics) -> np.ndarray:
    return ria(W, s.x_norm, a=s.a)


@register("obs", needs="hessian", offered=False)
def _obs(W: np.ndarray, s: Statistics) -> np.ndarray:
    return obs(W, s.hessian, hinv_diag=s.hinv_diag, damp=s.damp)


IMPORTANCES: tuple[str, ...] = tuple(IMPORTANCE_REGISTRY)
"""The built-in names accepted by :func:`compute_importance` (the registry's names when this module was imported)."""


def compute_importance(name: str, W: np.ndarray, x_norm: np.ndarray | None = None, *, a: float = RIA_DEFAULT_A,
                       hessian: np.ndarray | None = None, hinv_diag: np.ndarray | None = None,
                       damp: float = DEFAULT_DAMP) -> np.ndarray:
    """Importance ``name`` (a key of :data:`IMPORTANCE_REGISTRY`) of ``W [K, N]``; ``x_norm [K]`` for ``wanda``/``ria``;
    ``hessian [K, K]`` (or ``hinv_diag [K]``) for ``obs``.

    Raises:
        PermsparseError: unknown name, wrong shapes, or an activation-aware score without its statistics.
    """
    key = str(name).strip().lower()
    imp = IMPORTANCE_REGISTRY.get(key)
    if imp is None:
        raise PermsparseError(f"unknown importance {name!r}; choose one of {', '.join(IMPORTANCE_REGISTRY)}")
    if imp.needs == "hessian" and hessian is None and hinv_diag is None:
        raise PermsparseError(
            f"importance {key!r} needs calibration data (the Hessian XᵀX of each weight's input); pass --calib DATA "
            "(or omit it to use the built-in texts for text models), or use --importance wanda")
    if imp.needs == "x_norm" and x_norm is None:
        raise PermsparseError(
            f"importance {key!r} needs calibration data (per-channel activation norms); pass --calib DATA "
            "(or omit it to use the built-in texts for text models), or use --importance magnitude"
        )
    return imp.score(W, Statistics(x_norm=x_norm, hessian=hessian, hinv_diag=hinv_diag, a=a, damp=damp))


def masking_score(name: str, wk: np.ndarray, *, x_norm: np.ndarray | None = None, hessian: np.ndarray | None = None,
                  damp: float = DEFAULT_DAMP, missing: Literal["raise", "magnitude"] = "raise") -> np.ndarray:
    """The pipeline's masking score ``float32 [K, N]`` of ``wk`` (MatMul layout) from whatever statistics the caller
    holds: ``x_norm``, or a Hessian ``H = XᵀX`` (then ``‖X_k‖ = sqrt(max(H_kk, 0))``; ``obs`` reads H itself).
    Without the statistics the score needs: ``missing="raise"`` raises :class:`PermsparseError` (as
    :func:`compute_importance`), ``missing="magnitude"`` scores ``|W|``.
    """
    w = np.asarray(wk, dtype=np.float32)
    imp = IMPORTANCE_REGISTRY.get(str(name).strip().lower())
    needs = imp.needs if imp is not None else "weights"
    if needs == "x_norm" and x_norm is None and hessian is not None:
        x_norm = np.sqrt(np.maximum(np.diag(hessian), 0.0))
    if missing == "magnitude" and ((needs == "x_norm" and x_norm is None) or (needs == "hessian" and hessian is None)):
        return np.abs(w)
    if needs == "hessian":
        return np.asarray(compute_importance(name, w, hessian=hessian, damp=damp), dtype=np.float32)
    return np.asarray(compute_importance(name, w, x_norm), dtype=np.float32)

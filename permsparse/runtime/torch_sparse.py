"""Dense vs 2:4 semi-structured linear layers in PyTorch (GPU only): the core of ``bench --backend torch`` and of
``bench/linear_sparse.py``. Imports only torch and numpy (no ONNX), so the microbenchmark runs anywhere torch does.

Methods:
- ``dense``: ``F.linear(x, W)``;
- ``semi``: ``torch.sparse.to_sparse_semi_structured(W)`` (torch's default backend; CUTLASS needs SM 8.x);
- ``cutlass`` / ``cusparselt``: the same with the backend forced;
- ``cslt``: ``torch._cslt_compress`` + ``torch._cslt_sparse_mm`` with the algorithm id from
  ``torch._cslt_sparse_mm_search`` (cuSPARSELt's own search).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from permsparse.runtime.choices import SPARSE_METHODS
from permsparse.runtime.timing import TimingStats, auto_inner, time_callable

logger = logging.getLogger(__name__)

DTYPES: tuple[str, ...] = ("fp16", "bf16")


@dataclass(frozen=True)
class LinearShape:
    """``tokens`` rows of activations through a ``[K, N]`` weight, ``count`` times per model forward."""

    tokens: int
    k: int
    n: int
    count: int = 1
    name: str = ""

    @classmethod
    def parse(cls, text: str) -> LinearShape:
        """``TxKxN`` or ``TxKxN*count`` or ``name=TxKxN*count`` (e.g. ``fc1=197x768x3072*12``)."""
        name = ""
        if "=" in text:
            name, _, text = text.partition("=")
        count = 1
        if "*" in text:
            text, _, c = text.partition("*")
            count = int(c)
        parts = [int(p) for p in text.lower().split("x")]
        if len(parts) != 3 or min(parts) < 1 or count < 1:
            raise ValueError(f"'{text}': expected TOKENSxKxN[*COUNT], e.g. 2048x4096x4096*32")
        return cls(parts[0], parts[1], parts[2], count, name)

    def __str__(self) -> str:
        base = f"{self.tokens}x{self.k}x{self.n}" + (f"*{self.count}" if self.count != 1 else "")
        return f"{self.name}={base}" if self.name else base


@dataclass(frozen=True)
class LinearTiming:
    """Per-call timings of one shape; ``sparse`` maps method → stats (None if it failed; see ``errors``)."""

    shape: LinearShape
    dtype: str
    dense: TimingStats
    sparse: dict[str, TimingStats | None]
    rel_error: dict[str, float] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    alg_id: int | None = None

    def speedup(self, method: str) -> float | None:
        s = self.sparse.get(method)
        return None if s is None or s.median_ms <= 0 else self.dense.median_ms / s.median_ms


def torch_dtype(name: str) -> Any:
    import torch

    try:
        return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[name]
    except KeyError:
        raise ValueError(f"dtype '{name}': choose fp16 or bf16") from None


def cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:
        return False


def env_info() -> dict[str, str]:
    """torch, CUDA, cuSPARSELt versions and GPU name/capability (what a benchmark record must state)."""
    import torch

    info = {"torch": torch.__version__, "cuda": str(torch.version.cuda)}
    try:
        info["cusparselt"] = str(torch.backends.cusparselt.version()) if torch.backends.cusparselt.is_available() else "unavailable"
    except Exception as exc:  # older torch
        info["cusparselt"] = f"unknown ({exc.__class__.__name__})"
    if torch.cuda.is_available():
        idx = torch.cuda.current_device()
        cap = torch.cuda.get_device_capability(idx)
        info["gpu"] = torch.cuda.get_device_name(idx)
        info["capability"] = f"sm_{cap[0]}{cap[1]}"
        try:
            import subprocess

            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=10, check=False,
            )
            info["driver"] = out.stdout.strip().splitlines()[0] if out.stdout.strip() else "?"
        except Exception:
            info["driver"] = "?"
    else:
        info["gpu"] = "none"
    return info


def mask_2to4_rows(w_nk: Any) -> Any:
    """Keep the 2 largest-magnitude of every 4 consecutive K elements of ``W[N, K]`` (a torch tensor)."""
    n, k = w_nk.shape
    g = w_nk.reshape(n, k // 4, 4)
    idx = g.abs().topk(2, dim=-1).indices
    mask = w_nk.new_zeros(g.shape, dtype=bool).scatter_(-1, idx, True)
    return (g * mask).reshape(n, k)


def _to_semi(w_nk: Any, method: str) -> Any:
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    old = SparseSemiStructuredTensor._FORCE_CUTLASS
    try:
        if method == "cutlass":
            SparseSemiStructuredTensor._FORCE_CUTLASS = True
        elif method == "cusparselt":
            SparseSemiStructuredTensor._FORCE_CUTLASS = False
        return to_sparse_semi_structured(w_nk)
    finally:
        SparseSemiStructuredTensor._FORCE_CUTLASS = old


def sparse_linear_fn(w_nk: Any, x: Any, method: str) -> tuple[Callable[[], Any], int | None]:
    """A zero-argument callable computing ``x @ W^T`` with ``method`` (and the cuSPARSELt algorithm id if any)."""
    import torch
    import torch.nn.functional as F

    if method in ("semi", "cutlass", "cusparselt"):
        if method == "cusparselt" and not torch.backends.cusparselt.is_available():
            raise RuntimeError("cuSPARSELt is not available in this torch build")
        ws = _to_semi(w_nk, method)
        return (lambda: F.linear(x, ws)), None
    if method == "cslt":
        wc = torch._cslt_compress(w_nk)
        xt = x.t()
        alg = 0
        try:
            alg = int(torch._cslt_sparse_mm_search(wc, xt, transpose_result=True))
        except Exception as exc:  # search missing or deprecated: default algorithm
            logger.info("cuSPARSELt algorithm search unavailable (%s); using alg 0", exc)
        return (lambda: torch._cslt_sparse_mm(wc, xt, transpose_result=True, alg_id=alg)), alg
    raise ValueError(f"unknown sparse method '{method}'; choose from {', '.join(SPARSE_METHODS)}")


def in_cuda_graph(fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` captured once in a CUDA graph (after warm-up on a side stream); the result replays it and returns the
    captured output tensor. Raises if ``fn`` cannot be captured (host synchronization, host-side allocation...)."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()

    def replay() -> Any:
        g.replay()
        return out

    return replay


def time_linear(
    shape: LinearShape,
    dtype: str = "fp16",
    methods: Sequence[str] = ("semi",),
    weight_nk: np.ndarray | None = None,
    iters: int = 50,
    warmup: int = 10,
    seed: int = 0,
    device: str = "cuda",
    graph: bool = False,
) -> LinearTiming:
    """Time dense vs sparse ``x[T, K] @ W[K, N]`` on ``device`` (the current CUDA device by default).

    ``weight_nk`` (``[N, K]``, already 2:4 along K) is used when given; otherwise a random weight is 2:4-masked.
    Relative errors are ‖y − y_dense‖ / ‖y_dense‖ with the same masked weight, so they measure the kernel only.
    On ``device="cpu"`` (the CPU rehearsal) only the dense product is timed; every 2:4 method is recorded as failed
    ("2:4 kernels need CUDA"). ``graph``: time each call replayed from a CUDA graph (what the whole-model evaluator
    does), which leaves out per-call host work such as cuSPARSELt's plan set-up inside ``torch._cslt_sparse_mm``.
    """
    import torch
    import torch.nn.functional as F

    cuda = device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise RuntimeError("time_linear needs a CUDA GPU (or device='cpu' for a dense-only rehearsal)")
    dev = torch.device(device)
    dt = torch_dtype(dtype)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    if weight_nk is None:
        w = mask_2to4_rows(torch.randn(shape.n, shape.k, generator=gen)).to(dev, dt)
    else:
        w = torch.from_numpy(np.ascontiguousarray(weight_nk, dtype=np.float32)).to(dev, dt)
    x = torch.randn(shape.tokens, shape.k, generator=gen).to(dev, dt)
    dense_fn = lambda: F.linear(x, w)
    if graph and cuda:
        dense_fn = in_cuda_graph(dense_fn)
    ref = dense_fn().float()
    inner = auto_inner(dense_fn, cuda=cuda)
    dense = time_callable(dense_fn, iters=iters, warmup=warmup, cuda=cuda, inner=inner)
    sparse: dict[str, TimingStats | None] = {}
    errors: dict[str, str] = {}
    rel: dict[str, float] = {}
    alg_id = None
    for method in methods:
        if not cuda:
            sparse[method] = None
            errors[method] = "not run: 2:4 kernels need CUDA (CPU rehearsal)"
            continue
        try:
            fn, alg = sparse_linear_fn(w, x, method)
            if graph:
                fn = in_cuda_graph(fn)
            out = fn().float()
            if out.shape != ref.shape:
                raise RuntimeError(f"output shape {tuple(out.shape)} != {tuple(ref.shape)}")
            rel[method] = float((out - ref).norm() / ref.norm().clamp_min(1e-12))
            sparse[method] = time_callable(fn, iters=iters, warmup=warmup, cuda=True, inner=inner)
            alg_id = alg if alg is not None else alg_id
        except Exception as exc:  # a backend refusing a shape/GPU is a result, not a crash
            sparse[method] = None
            errors[method] = f"{exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
            logger.info("%s %s %s failed: %s", shape, dtype, method, errors[method])
    return LinearTiming(shape, dtype, dense, sparse, rel, errors, alg_id)

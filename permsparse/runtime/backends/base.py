"""The bench runner interface and its registry (Polygraphy-style: each backend is a runner class).

A :class:`Runner` runs one model on one backend: :meth:`~Runner.activate` loads it (sessions, engines, compressed
2:4 weights), :meth:`~Runner.infer` runs it once on host feeds and returns host outputs (what correctness checks
read), :meth:`~Runner.bind` stages feeds where the backend computes and returns the zero-argument callable that is
timed, :meth:`~Runner.deactivate` frees what ``activate`` took. Runners are context managers.

Backends register with :func:`register_backend`; :func:`backend_names` is the one list of names (``config.BACKENDS``,
the CLI choices and the docs read it). Adding a backend = one module under ``permsparse/runtime/backends/`` that
defines a registered :class:`Runner` subclass (and is imported by the package ``__init__``), plus its test.

Invariant: a registered name maps to exactly one runner class (registering a name twice raises), and every runner's
``infer`` returns the model's outputs in graph order, so any two runners on the same model and feeds are comparable.
"""

from __future__ import annotations

import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import numpy as np

from permsparse.errors import PermsparseError

if TYPE_CHECKING:
    from permsparse.ir.shapes import ShapeSpec

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BenchConfig:
    """Options of :func:`permsparse.runtime.bench.run_bench`; None means the default.

    Attributes:
        backend: a registered backend (:func:`backend_names`): "ort" (default), "torch" or "tensorrt".
        shapes: input shapes; the ``opt`` shape is timed (and min/max shape the TensorRT profile).
        iters: timed samples (default 50); warmup: untimed calls first (default 10).
        precision: torch: "fp16" (default on CUDA; "fp32" on CPU), "bf16" or "fp32"; tensorrt: "fp16" (default),
            "bf16" or "fp32"; ort: as stored.
        sparse_method: torch backend's 2:4 kernel: "semi" (default: ``to_sparse_semi_structured``), "cutlass",
            "cusparselt" (forced backends of it) or "cslt" (``torch._cslt_sparse_mm`` with cuSPARSELt's search).
        device: torch backend: "auto" (default: cuda when available), "cpu" or "cuda".
        cuda_graphs: torch backend on CUDA: capture the evaluator in a CUDA graph where it applies (default True).
        compile_dense: torch backend: also time the dense model through ``torch.compile`` (default False).
        reference: also run the sparse ONNX on onnxruntime (CPU) and report the agreement (default: when the backend
            is not onnxruntime and the model's files are at most 600 MB).
        threads: onnxruntime intra-op threads (default: onnxruntime's).
        seed: random inputs' seed (default 0).
        plot_path: where to write the PNG (default: none).
        workspace_gb: TensorRT workspace for engines built on the fly.
    """

    backend: str | None = None
    shapes: Mapping[str, ShapeSpec] | None = None
    iters: int | None = None
    warmup: int | None = None
    precision: str | None = None
    sparse_method: str | None = None
    device: str | None = None
    cuda_graphs: bool | None = None
    compile_dense: bool | None = None
    reference: bool | None = None
    threads: int | None = None
    seed: int | None = None
    plot_path: str | os.PathLike[str] | None = None
    workspace_gb: float | None = None


class Runner(ABC):
    """One model on one backend: activate → infer / bind → deactivate (also as a context manager)."""

    #: The registry name (set by :func:`register_backend`).
    name: ClassVar[str] = ""
    #: One line for ``--help`` and the docs.
    summary: ClassVar[str] = ""

    def __init__(self, path: str | os.PathLike[str], config: BenchConfig | None = None, *, label: str = "") -> None:
        self.path = Path(path)
        self.config = config or BenchConfig()
        self.label = label or self.path.stem
        self.notes: list[str] = []
        self.active = False

    # -- lifecycle ------------------------------------------------------------------------------------------
    @abstractmethod
    def activate(self) -> None:
        """Load the model (sessions, engines, compressed weights); idempotent."""

    @abstractmethod
    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One run on host feeds; host outputs in graph order (float outputs as float32)."""

    def bind(self, feeds: Mapping[str, np.ndarray]) -> Callable[[], object]:
        """The zero-argument callable that is timed, with ``feeds`` already staged (default: ``infer``)."""
        return lambda: self.infer(feeds)

    def deactivate(self) -> None:
        """Free what :meth:`activate` took; idempotent."""
        self.active = False

    # -- timing ---------------------------------------------------------------------------------------------
    @property
    def on_cuda(self) -> bool:
        """True when :meth:`bind`'s callable launches CUDA work (timed with CUDA events)."""
        return False

    @property
    def stream(self) -> Any | None:
        """The CUDA stream the callable runs on (None: the current one)."""
        return None

    @property
    def precision(self) -> str:
        """The precision the model runs in (for the table's header)."""
        return self.config.precision or "as stored"

    @property
    def checks(self) -> dict[str, float]:
        """Backend-specific correctness figures (e.g. a kernel's error at load); read while active."""
        return {}

    @classmethod
    def baselines(cls, config: BenchConfig) -> list[tuple[str, dict[str, Any]]]:
        """Extra dense runs beside the plain one: ``(label, keyword arguments of the runner)`` (default none)."""
        return []

    @property
    def device_name(self) -> str:
        import platform

        return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"

    def __enter__(self) -> Runner:
        self.activate()
        return self

    def __exit__(self, *exc: object) -> None:
        self.deactivate()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, active={self.active})"


R = TypeVar("R", bound=type[Runner])
_REGISTRY: dict[str, type[Runner]] = {}


def register_backend(name: str, summary: str = "") -> Callable[[R], R]:
    """Class decorator: register a :class:`Runner` subclass under ``name``."""

    def deco(cls: R) -> R:
        if not (isinstance(cls, type) and issubclass(cls, Runner)):
            raise TypeError(f"@register_backend({name!r}) decorates Runner subclasses, not {cls!r}")
        if name in _REGISTRY:
            raise RuntimeError(f"bench backend {name!r} registered twice ({_REGISTRY[name].__name__}, {cls.__name__})")
        cls.name = name
        cls.summary = summary or (cls.__doc__ or "").strip().splitlines()[0]
        _REGISTRY[name] = cls
        return cls

    return deco


def backend_names() -> tuple[str, ...]:
    """Every registered backend, in registration order."""
    return tuple(_REGISTRY)


def get_backend(name: str) -> type[Runner]:
    """The runner class of backend ``name``; a clear error listing the valid names otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise PermsparseError(f"unknown backend '{name}'; choose one of {', '.join(_REGISTRY)}") from None


def require_cuda(backend: str) -> Any:
    """torch, when it sees a CUDA GPU; a clear error otherwise."""
    try:
        import torch
    except ImportError as exc:
        raise PermsparseError(f"the {backend} backend needs torch with CUDA") from exc
    if not torch.cuda.is_available():
        raise PermsparseError(
            f"the {backend} backend needs a CUDA GPU and torch.cuda.is_available() is False; "
            "use --backend ort (or --backend torch --device cpu) on a machine without a GPU"
        )
    return torch

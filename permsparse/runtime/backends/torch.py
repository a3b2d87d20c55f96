"""``torch``: the whole ONNX model on the project's torch evaluator (:mod:`permsparse.torchgraph`), every 2:4 weight
run by a 2:4 kernel compressed once at load, dense weights by cuBLAS, in a CUDA graph where it applies
(:mod:`permsparse.runtime.torch_eval`). Runs on CPU too (dense kernels, said in the notes), which is how CI tests it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from permsparse.runtime.backends.base import (
    BenchConfig,
    Runner,
    register_backend,
)


def resolve_device(device: str | None) -> str:
    """``auto``/None → cuda when torch sees a GPU, else cpu; ``cuda`` without a GPU is a clear error
    (:func:`permsparse.devices.resolve_device` with ``auto`` as the default)."""
    from permsparse.devices import resolve_device as resolve

    return resolve(device, default="auto").type


@register_backend("torch", "the whole model on permsparse's torch evaluator: 2:4 kernels on CUDA, dense on CPU")
class TorchRunner(Runner):
    """The model on :class:`~permsparse.runtime.torch_eval.SparseEvaluator` (``compiled``: through torch.compile)."""

    def __init__(self, path: Any, config: BenchConfig | None = None, *, label: str = "", compiled: bool = False) -> None:
        super().__init__(path, config, label=label)
        self.compiled = compiled
        self.evaluator: Any = None

    @classmethod
    def baselines(cls, config: BenchConfig) -> list[tuple[str, dict[str, Any]]]:
        """Extra dense runs beside the evaluator: ``torch.compile`` of the dense program when asked."""
        return [("dense, torch.compile", {"compiled": True})] if config.compile_dense else []

    def activate(self) -> None:
        if self.active:
            return
        from permsparse.runtime.torch_eval import SparseEvaluator

        cfg = self.config
        self.evaluator = SparseEvaluator(
            self.path, device=resolve_device(cfg.device), precision=cfg.precision, method=cfg.sparse_method or "semi",
            cuda_graphs=True if cfg.cuda_graphs is None else cfg.cuda_graphs,
        )
        self.active = True

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.activate()
        return self.evaluator.run(feeds)

    def bind(self, feeds: Mapping[str, np.ndarray]) -> Callable[[], object]:
        self.activate()
        if self.compiled:
            from permsparse.runtime.torch_eval import compiled_runner

            return compiled_runner(self.evaluator, feeds)
        return self.evaluator.bind(feeds)

    @property
    def notes_now(self) -> list[str]:
        return list(self.evaluator.notes) if self.evaluator is not None else []

    @property
    def precision(self) -> str:
        return self.evaluator.precision if self.evaluator is not None else (self.config.precision or "?")

    @property
    def checks(self) -> dict[str, float]:
        ev = self.evaluator
        return {"max_rel_err_2to4_kernel_vs_dense": ev.max_kernel_error} if ev is not None and ev.kernels else {}

    @property
    def on_cuda(self) -> bool:
        return self.evaluator is not None and self.evaluator.device.type == "cuda"

    @property
    def device_name(self) -> str:
        if self.on_cuda:
            import torch

            return torch.cuda.get_device_name(torch.cuda.current_device())
        return super().device_name

    def deactivate(self) -> None:
        if self.evaluator is not None:
            self.notes = self.notes_now
            self.evaluator.close()
            self.evaluator = None
        self.active = False

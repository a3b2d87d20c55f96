"""Calibration state carried from block to block: stream activations, side tensors, padding masks, Hessians.

Two streams are kept per calibration batch: ``sparse`` (the input of block l computed by blocks < l already pruned,
reconstructed and tuned — what block l will really see) and ``dense`` (the dense model's own activations — the
teacher's target). Side tensors (masks, RoPE tables) are computed once per batch by the prefix program.

:class:`HessianSet` accumulates H = XᵀX (float64) of each observed tensor's last axis over all non-padding tokens.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx
import torch


@dataclass
class Batch:
    side: dict[str, torch.Tensor]
    sparse: torch.Tensor
    dense: torch.Tensor
    mask: torch.Tensor | None  # [B, S] bool of real tokens (None: all real)


@dataclass
class CalibState:
    batches: list[Batch] = field(default_factory=list)
    stream_name: str = ""

    @property
    def tokens(self) -> int:
        n = 0
        for b in self.batches:
            n += int(b.mask.sum()) if b.mask is not None else int(np.prod(b.sparse.shape[:-1]))
        return n


def graph_inputs(model: onnx.ModelProto) -> list[str]:
    """The model's run-time inputs (graph inputs that are not initializers), in order."""
    inits = {t.name for t in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits]


def half_weights(model: onnx.ModelProto) -> bool:
    """True if some weight is float16/bfloat16: block programs then widen weights to float32 (exactly)."""
    return any(t.data_type in (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16) for t in model.graph.initializer)


def token_rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``x [..., K]`` as rows ``[T, K]`` of real tokens (padding dropped when ``x`` is ``[B, S, K]`` like the mask)."""
    if mask is not None and x.dim() >= 3 and tuple(x.shape[:2]) == tuple(mask.shape):
        return x[mask]
    if mask is not None and x.dim() == 4 and x.shape[0] == mask.shape[0] and x.shape[2] == mask.shape[1]:
        # [B, H, S, D] head-split tensors: padding along axis 2
        return x.transpose(1, 2)[mask].reshape(-1, x.shape[-1])
    return x.reshape(-1, x.shape[-1])


class HessianSet:
    """H = Σ xᵀx over real tokens for each observed tensor (float32 per batch, summed in float64); with
    ``diagonal=True`` only its diagonal Σ x_k² (what Wanda's ‖X_k‖₂ needs, K numbers instead of K²)."""

    def __init__(self, names: set[str], *, diagonal: bool = False):
        self.names = set(names)
        self.diagonal = diagonal
        self.h: dict[str, torch.Tensor] = {}
        self.count: dict[str, int] = {}
        self.mask: torch.Tensor | None = None

    def observe(self, name: str, value: torch.Tensor) -> None:
        if name not in self.names or not value.is_floating_point():
            return
        rows = token_rows(value.detach(), self.mask)
        if self.diagonal:
            rows = rows.double()
            part = (rows * rows).sum(dim=0)
        else:
            rows = rows.float()
            part = (rows.T @ rows).double()
        if name in self.h:
            self.h[name] += part
        else:
            self.h[name] = part
        self.count[name] = self.count.get(name, 0) + rows.shape[0]

    def numpy(self) -> Mapping[str, np.ndarray]:
        return {k: v.cpu().numpy() for k, v in self.h.items()}

"""Block-wise tuning of the kept weights with the N:M masks frozen (the lever left once permutations and OBS are in).

The block's pruned weights become trainable tensors ``V``; the block runs with ``V ⊙ M`` (masks fixed, so every
weight stays N:M with the same pattern) on its sparse-stream inputs, and Adam minimizes the relative squared error
to the teacher's output, ‖y − y_teacher‖² / ‖y_teacher‖², over the calibration batches. The result is kept only if
it lowers that error on the calibration data; otherwise the reconstructed weights stay.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from permsparse.passes.analysis import Plan
from permsparse.passes.blocks import Block
from permsparse.pipeline.blockwise.state import CalibState

if TYPE_CHECKING:
    from permsparse.pipeline.config import ResolvedConfig

log = logging.getLogger(__name__)


def _stored(plan: Plan, name: str, wk: torch.Tensor) -> torch.Tensor:
    return wk if plan.weights[name].k_axis == 0 else wk.T


def block_error(prog: Any, block: Block, state: CalibState, overrides: Mapping[str, torch.Tensor],
                targets: list[torch.Tensor]) -> float:
    """The block's relative output error ‖y − y_teacher‖² / ‖y_teacher‖² over all calibration batches (sums in float64
    Python floats), with the weights in ``overrides`` substituted; the one measure of the engine and of tuning."""
    num = den = 0.0
    with torch.no_grad():
        for b, y in zip(state.batches, targets):
            out = prog.run({block.input: b.sparse, **b.side}, overrides=overrides)[block.output].float()
            num += float(((out - y) ** 2).sum())
            den += float((y**2).sum())
    return num / max(den, 1e-30)


def finetune(
    prog: Any,
    block: Block,
    state: CalibState,
    targets: list[torch.Tensor],
    eff: Mapping[str, np.ndarray],
    masks: Mapping[str, np.ndarray],
    plan: Plan,
    cfg: ResolvedConfig,
    err_before: float,
) -> tuple[dict[str, np.ndarray], float]:
    """Tuned ``[K, N]`` weights (masked) and the block's relative error with them."""
    dev = cfg.torch_device
    params = {w: torch.tensor(np.asarray(eff[w]), dtype=torch.float32, device=dev, requires_grad=True) for w in eff}
    keep = {w: torch.as_tensor(np.asarray(masks[w]), dtype=torch.float32, device=dev) for w in eff}
    opt = torch.optim.Adam(list(params.values()), lr=cfg.reconstruction.finetune_lr)
    gen = torch.Generator().manual_seed(cfg.seed + block.index)
    scales = [float((y**2).mean()) or 1.0 for y in targets]
    steps = cfg.reconstruction.finetune_epochs * len(state.batches)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps))
    for _ in range(cfg.reconstruction.finetune_epochs):
        for i in torch.randperm(len(state.batches), generator=gen).tolist():
            b = state.batches[i]
            overrides = {plan.weights[w].const: _stored(plan, w, p * keep[w]) for w, p in params.items()}
            y = prog.run({block.input: b.sparse, **b.side}, overrides=overrides)[block.output].float()
            loss = ((y - targets[i]) ** 2).mean() / scales[i]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    tuned = {w: (p.detach() * keep[w]).cpu().numpy() for w, p in params.items()}
    overrides = {plan.weights[w].const: _stored(plan, w, torch.as_tensor(v, device=dev)) for w, v in tuned.items()}
    err = block_error(prog, block, state, overrides, targets)
    if not err < err_before:
        log.info("block %d: tuning did not lower the error (%.4g >= %.4g); keeping the reconstruction",
                 block.index, err, err_before)
        return {w: np.asarray(v) for w, v in eff.items()}, err_before
    return tuned, err

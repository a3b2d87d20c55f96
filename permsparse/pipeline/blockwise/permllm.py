"""PermLLM's learner on ONNX blocks: every permutation of a block learned jointly from the block's own output.

For each unit of the block (a sibling group cut by a Gather, an O→V or down→up closure), the permutation is the unit's
initial one (``p0``, from the importance baseline) refined inside windows of ``w`` channels (64, or the head size):
one learnable cost matrix per window; Sinkhorn (``sinkhorn_iters`` iterations, temperature annealed from
``tau_start`` to ``tau_end``) gives the soft permutation, Hungarian the hard one, combined with a straight-through
estimator (forward hard, gradients through the soft one); Sinkhorn, Hungarian and the hard/soft top-n are the
learners' own (:mod:`permsparse.optimizer.relax`). In the forward, each weight's rows are permuted, its N:M
mask is recomputed on the permuted importance (hard mask forward, soft top-n-of-m gradients), and the effective weight
``Pᵀ(M ⊙ P W)`` — the original row order, so the rest of the block is untouched — is substituted into the block's
PyTorch forward. The loss is 1 − cos(block output, teacher output) per token, as PermLLM; AdamW with a cosine
schedule; the hard permutation with the lowest loss seen is kept, and never one worse than ``p0``.

Invariant: each learned permutation is ``p0`` composed with permutations inside aligned windows that divide the unit's
constraint block, so it satisfies the closure's constraint (block-diagonal heads, GQA ties) whenever ``p0`` does.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from permsparse.optimizer.relax import hard_topn, hungarian, log_sinkhorn, soft_topn
from permsparse.passes.analysis import Plan
from permsparse.passes.blocks import Block
from permsparse.passes.fold import Unit
from permsparse.pipeline.blockwise.state import CalibState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PermLLMConfig:
    window: int = 64
    steps: int = 30
    lr: float = 0.05
    tau_start: float = 3.0
    tau_end: float = 0.1
    sinkhorn_iters: int = 5
    select_temp: float = 0.3
    tokens_per_step: int = 2048
    eval_every: int = 5


def _hungarian(cost: torch.Tensor) -> torch.Tensor:
    """One-hot hard permutations ``[W, w, w]`` maximizing the summed cost of each window (:func:`relax.hungarian`)."""
    sigma = hungarian(cost.detach().cpu().numpy())
    return torch.nn.functional.one_hot(torch.as_tensor(sigma, device=cost.device), cost.shape[-1]).to(torch.float32)


@dataclass
class _Member:
    """One weight of a unit: its rows after ``p0`` and which window of the unit each row window belongs to."""

    name: str
    const: str
    k_axis: int
    w0: torch.Tensor  # [K, N] rows in the p0 order
    s0: torch.Tensor  # [K, N] masking importance, p0 order
    sigma0: np.ndarray  # row permutation of p0 (new[i] = old[sigma0[i]])
    win_ids: torch.Tensor  # [K / w] canonical window of each row window


def learn_block_perms(
    prog: Any, block: Block, state: CalibState, targets: list[torch.Tensor], plan: Plan, units: list[Unit],
    p0: Mapping[str, np.ndarray], wk: Mapping[str, np.ndarray], scores: Mapping[str, np.ndarray],
    fixed: Mapping[str, np.ndarray], row_perm, row_map, pcfg: PermLLMConfig, seed: int,
    device: torch.device | str = "cpu",
) -> dict[str, np.ndarray]:
    """Refined canonical permutations for ``units`` (see the module docstring).

    ``fixed``: effective ``[K, N]`` weights of the block's pruned weights that belong to no unit here.
    ``row_perm(unit, perm, weight)`` and ``row_map(unit, weight)`` map canonical permutations to weight rows.
    ``device``: where the costs and weights live (the random start is drawn on the CPU, so it is the same on any
    device).
    """
    dev = torch.device(device)
    n, m = plan.pattern.n, plan.pattern.m
    gen = torch.Generator().manual_seed(seed)
    costs: dict[str, torch.Tensor] = {}
    members: dict[str, list[_Member]] = {}
    wsize: dict[str, int] = {}
    for u in units:
        ws = max(m, min(pcfg.window, u.block))
        while u.block % ws:
            ws -= m
        wsize[u.name] = ws
        nwin = u.k // ws
        eye = torch.eye(ws).expand(nwin, ws, ws)
        start = 4.0 * eye + 0.01 * torch.randn((nwin, ws, ws), generator=gen)
        costs[u.name] = start.to(dev).clone().requires_grad_(True)
        mems = []
        for w in u.weights:
            info = plan.weights[w]
            sigma0 = row_perm(u, p0[u.name], w)
            rm = row_map(u, w)
            canon = np.arange(info.k) if rm is None else rm
            win_ids = torch.as_tensor(canon[::ws] // ws, dtype=torch.long, device=dev)
            mems.append(_Member(w, info.const, info.k_axis, torch.as_tensor(wk[w][sigma0], device=dev),
                                torch.as_tensor(scores[w][sigma0], device=dev), sigma0, win_ids))
        members[u.name] = mems
    opt = torch.optim.AdamW(list(costs.values()), lr=pcfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, pcfg.steps))
    fixed_t = {plan.weights[w].const: _stored(plan.weights[w].k_axis, torch.as_tensor(v, device=dev))
               for w, v in fixed.items()}

    def overrides(hard_only: bool, tau: float) -> dict[str, torch.Tensor]:
        out = dict(fixed_t)
        for u in units:
            c = costs[u.name]
            hard = _hungarian(c)
            if hard_only:
                p = ps = hard
            else:
                ps = log_sinkhorn(c / tau, pcfg.sinkhorn_iters).exp()
                p = hard + ps - ps.detach()
            for mem in members[u.name]:
                k, ncol = mem.w0.shape
                ws = wsize[u.name]
                pw = p[mem.win_ids]  # [K/ws, ws, ws]
                wr = mem.w0.reshape(-1, ws, ncol)
                sr = mem.s0.reshape(-1, ws, ncol)
                wp = torch.bmm(pw, wr).reshape(k, ncol)
                mask = hard_topn(torch.bmm(hard[mem.win_ids], sr).reshape(k // m, m, ncol), n)
                if not hard_only:
                    soft_s = torch.bmm(ps[mem.win_ids], sr).reshape(k // m, m, ncol)
                    scale = soft_s.mean().clamp_min(1e-12) * pcfg.select_temp
                    ms = soft_topn(soft_s, n, scale)
                    mask = mask + ms - ms.detach()
                eff_p = (mask.reshape(k, ncol) * wp).reshape(-1, ws, ncol)
                eff0 = torch.bmm(pw.transpose(1, 2), eff_p).reshape(k, ncol)  # back to the p0 order
                eff = torch.empty_like(eff0)
                eff[torch.as_tensor(mem.sigma0, device=dev)] = eff0
                out[mem.const] = _stored(mem.k_axis, eff)
        return out

    batches = list(range(len(state.batches)))
    t0 = time.perf_counter()
    best_loss = _loss(prog, block, state, targets, overrides(True, pcfg.tau_end), batches)
    start_loss = best_loss
    best = {u.name: _hungarian(costs[u.name]) for u in units}
    order = torch.randperm(len(batches), generator=gen).tolist()
    for step in range(pcfg.steps):
        tau = pcfg.tau_start + (pcfg.tau_end - pcfg.tau_start) * step / max(1, pcfg.steps - 1)
        i = order[step % len(order)]
        b = state.batches[i]
        y = prog.run({block.input: b.sparse, **b.side}, overrides=overrides(False, tau))[block.output].float()
        loss = _cos_loss(y, targets[i])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % pcfg.eval_every == 0 or step == pcfg.steps - 1:
            val = _loss(prog, block, state, targets, overrides(True, tau), batches)
            if val < best_loss:
                best_loss = val
                best = {u.name: _hungarian(costs[u.name]) for u in units}
    log.info("block %d: PermLLM loss %.4g -> %.4g in %.1f s", block.index, start_loss, best_loss,
             time.perf_counter() - t0)
    out = {}
    for u in units:
        ws = wsize[u.name]
        hard = best[u.name].cpu().numpy()
        local = hard.argmax(axis=-1)  # new row i of window takes old row local[i]
        q = (np.arange(u.k // ws)[:, None] * ws + local).reshape(-1)
        out[u.name] = np.asarray(p0[u.name])[q]
    return out


def _stored(k_axis: int, wk: torch.Tensor) -> torch.Tensor:
    return wk if k_axis == 0 else wk.T


def _cos_loss(y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    yf, tf = y.reshape(-1, y.shape[-1]), t.reshape(-1, t.shape[-1])
    return (1.0 - torch.nn.functional.cosine_similarity(yf, tf, dim=-1, eps=1e-8)).mean()


def _loss(prog, block, state, targets, overrides, batches) -> float:
    total = 0.0
    with torch.no_grad():
        for i in batches:
            b = state.batches[i]
            y = prog.run({block.input: b.sparse, **b.side}, overrides=overrides)[block.output].float()
            total += float(_cos_loss(y, targets[i]))
    return total / max(1, len(batches))

"""Sequential block-wise pruning: permutations, N:M masks and reconstructed weights, one Transformer block at a time.

For each block l (:mod:`permsparse.passes.blocks`), on calibration data:

1. run block l (PyTorch, :mod:`permsparse.torchgraph`) on its *sparse-stream* input — the output of blocks < l
   already pruned — and accumulate H = XᵀX of every weight's input (padding excluded); run it on the dense stream
   for the teacher targets;
2. learn each unit's permutation (importance kept, or the output-error objective with H) — or PermLLM's joint block
   learner (:mod:`.permllm`);
3. choose each weight's N:M mask in its permuted row order and rebuild the kept weights (SparseGPT with P H Pᵀ, or
   plain masking);
4. optionally tune the kept weights with the masks frozen so the block's output matches the teacher (:mod:`.finetune`);
5. run the pruned block to get block l+1's sparse-stream input.

Everything is computed in *effective* form: ``W_eff = Pᵀ(M ⊙ P W)`` in the weight's original row order, so the
pruned model with ``W_eff`` substituted computes exactly what the folded model will. The caller folds the
permutations and stores ``W_eff`` re-indexed by the fold; the N:M checker then confirms every stored weight is N:M.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
import torch

from permsparse.errors import PermsparseError
from permsparse.ir.graph import ConstRef
from permsparse.optimizer.base import SolveResult
from permsparse.passes.analysis import Plan
from permsparse.passes.blocks import Block, BlockPlan
from permsparse.passes.fold import Unit, block_perm
from permsparse.pattern import nm_keep_mask
from permsparse.pipeline.blockwise.state import (
    Batch,
    CalibState,
    HessianSet,
    graph_inputs,
    half_weights,
)
from permsparse.pipeline.blockwise.store import WeightStore
from permsparse.pipeline.problems import UnitReport, canonical_importance, row_map

if TYPE_CHECKING:
    from permsparse.pipeline.config import ResolvedConfig

log = logging.getLogger(__name__)


@dataclass
class BlockReport:
    """Relative output error of a block, ‖y − y_teacher‖² / ‖y_teacher‖², after each step."""

    index: int
    weights: int
    err_pruned: float
    err_final: float
    seconds: float


@dataclass
class BlockwiseResult:
    perms: dict[str, np.ndarray]
    store: WeightStore
    unit_reports: list[UnitReport] = field(default_factory=list)
    block_reports: list[BlockReport] = field(default_factory=list)
    tokens: int = 0


def weight_row_perm(plan: Plan, unit: Unit | None, perm: np.ndarray | None, weight: str) -> np.ndarray | None:
    """The row permutation (``new[i] = old[σ[i]]``) a unit's canonical permutation gives one of its weights."""
    if unit is None or perm is None:
        return None
    w = plan.weights[weight]
    if unit.group is not None:
        return np.asarray(perm)
    closure = plan.closures[unit.closure]
    bm = next(mb.block_map for mb in closure.members if mb.const == w.const and mb.axis == w.k_axis)
    return block_perm(np.asarray(perm), bm, closure.block)


def score(kind: str, wk: np.ndarray, h: np.ndarray | None, damp: float) -> np.ndarray:
    """Masking importance ``[K, N]`` from the weight and its input's H (``‖X_k‖ = sqrt(H_kk)``; |W| without H)."""
    from permsparse.optimizer.importance import masking_score

    return masking_score(kind, wk, hessian=h, damp=damp, missing="magnitude")


class Engine:
    """Runs the sequential loop for one model (see the module docstring)."""

    def __init__(self, model: onnx.ModelProto, base_dir: Path, plan: Plan, units: list[Unit], bp: BlockPlan,
                 consts: Mapping[str, ConstRef], cfg: ResolvedConfig, store: WeightStore):
        self.model, self.base_dir, self.plan, self.bp, self.consts, self.cfg = model, base_dir, plan, bp, consts, cfg
        self.store = store
        self.solver = None  # permsparse.pipeline.problems.Solver of the run (executor, checkpoint); None: local pool, no checkpoint
        self.checkpoint = None  # permsparse.pipeline.blockwise.resume.BlockCheckpoint (--work-dir): committed after each block
        self.units = units
        self.unit_of: dict[str, Unit] = {w: u for u in units for w in u.weights}
        self.upcast = half_weights(model)
        self.device = cfg.torch_device  # every tensor of the loop lives there (--device); numpy results come back

    # ------------------------------------------------------------------------------------------------ programs

    def program(self, inputs: list[str], outputs: list[str]):
        from permsparse.torchgraph import GraphProgram, ProgramConfig

        return GraphProgram.from_model(self.model, inputs=inputs, outputs=outputs, base_dir=self.base_dir,
                                       config=ProgramConfig(upcast=self.upcast, device=str(self.device)))

    def prepare(self, feeds: list[dict[str, np.ndarray]]) -> CalibState:
        """Run the prefix (embeddings, masks, RoPE) once per batch: the first stream tensor and the side tensors."""
        inputs = graph_inputs(self.model)
        prefix = self.program(inputs, [self.bp.first, *self.bp.side])
        state = CalibState(stream_name=self.bp.first)
        for feed in feeds:
            with torch.no_grad():
                out = prefix.run({k: feed[k] for k in inputs})
            first = out[self.bp.first].float()
            mask = feed.get("attention_mask")
            m = None if mask is None or np.ndim(mask) != 2 else \
                torch.as_tensor(np.asarray(mask) != 0, device=self.device)
            state.batches.append(Batch({k: out[k] for k in self.bp.side}, first, first, m))
        return state

    # ------------------------------------------------------------------------------------------------ weights

    def dense(self, name: str) -> np.ndarray:
        """Weight ``name`` as ``[K, N]`` float32."""
        w = self.plan.weights[name]
        return np.asarray(w.k_major(np.asarray(self.consts[w.const].values)), dtype=np.float32)

    def stored_tensor(self, name: str, wk: np.ndarray) -> torch.Tensor:
        w = self.plan.weights[name]
        return torch.as_tensor(np.ascontiguousarray(w.stored(wk)), dtype=torch.float32, device=self.device)

    # ------------------------------------------------------------------------------------------------ the loop

    def run(self, feeds: list[dict[str, np.ndarray]], pre_perms: Mapping[str, np.ndarray], progress: bool) -> BlockwiseResult:
        from tqdm.auto import tqdm

        state = self.prepare(feeds)
        result = BlockwiseResult(dict(pre_perms), self.store, tokens=state.tokens)
        start = self.resume(state, result)
        bar = tqdm(total=len(self.bp.blocks), initial=start, desc="blocks", unit="block", disable=not progress)
        try:
            for block in self.bp.blocks[start:]:
                t0 = time.perf_counter()
                report = self.block(block, state, result)
                report.seconds = time.perf_counter() - t0
                result.block_reports.append(report)
                if self.checkpoint is not None:
                    self.commit(block, state, result)
                bar.set_postfix_str(f"block output error {report.err_final:.3g}")
                bar.update(1)
        finally:
            bar.close()
        return result

    def commit(self, block: Block, state: CalibState, result: BlockwiseResult) -> None:
        """Commit the state after ``block`` (:mod:`.resume`): streams, its weights, permutations, reports."""
        units = [{"unit": r.unit.name, **{f.name: (bool if f.name == "reused" else float)(getattr(r.result, f.name))
                                          for f in fields(r.result) if f.name not in ("name", "perm")}}
                 for r in result.unit_reports]
        self.checkpoint.commit(block.index + 1, result.perms, units, [asdict(r) for r in result.block_reports],
                               [(b.sparse, b.dense) for b in state.batches],
                               {w: self.store.get(w) for w in block.weights})

    def resume(self, state: CalibState, result: BlockwiseResult) -> int:
        """Restore the committed state of an interrupted run with the same key (:mod:`.resume`); the number of
        blocks it finished (0 when there is none)."""
        saved = self.checkpoint.load() if self.checkpoint is not None else None
        if saved is None or saved.done == 0:
            return 0
        if saved.done > len(self.bp.blocks) or len(saved.streams) != len(state.batches) or any(
                tuple(s.shape) != tuple(b.sparse.shape) for (s, _), b in zip(saved.streams, state.batches)):
            log.warning("the block-wise checkpoint does not fit this run; starting from the first block")
            return 0
        for (sparse, dense), b in zip(saved.streams, state.batches):
            b.sparse, b.dense = sparse.to(self.device), dense.to(self.device)
        for name, path in saved.weights.items():
            self.store.put(name, np.load(path, allow_pickle=False))
        result.perms.update(saved.perms)
        units = {u.name: u for u in self.units}
        for r in saved.unit_reports:
            name = r.pop("unit")
            result.unit_reports.append(UnitReport(units[name], SolveResult(name, np.asarray(result.perms[name]), **r)))
        result.block_reports.extend(BlockReport(**r) for r in saved.block_reports)
        log.info("resuming after block %d of %d (work dir): %d weights and the calibration streams restored",
                 saved.done, len(self.bp.blocks), len(saved.weights))
        return saved.done

    def block(self, block: Block, state: CalibState, result: BlockwiseResult) -> BlockReport:
        cfg = self.cfg
        side = list(self.bp.side)
        prog = self.program([block.input, *side], [block.output])
        names = list(block.weights)
        inputs_needed = {self.plan.weights[w].input for w in names}
        hs = HessianSet(inputs_needed)
        targets: list[torch.Tensor] = []
        with torch.no_grad():
            for b in state.batches:
                hs.mask = b.mask
                if block.input in inputs_needed:
                    hs.observe(block.input, b.sparse)
                y_local = prog.run({block.input: b.sparse, **b.side}, hook=hs.observe)[block.output].float()
                if cfg.reconstruction.teacher == "dense":
                    y = prog.run({block.input: b.dense, **b.side})[block.output].float()
                else:
                    y = y_local
                targets.append(y)
        hessians = hs.numpy()
        wk = {w: self.dense(w) for w in names}

        # permutations of the units that live in this block
        block_units = [u for u in dict.fromkeys(self.unit_of[w] for w in names if w in self.unit_of)
                       if u.name not in result.perms]
        if block_units:
            perms, reports = self.learn(block_units, wk, hessians)
            if cfg.permutation.objective == "block":
                perms = self.learn_jointly(prog, block, state, targets, block_units, perms, wk, hessians)
            result.perms.update(perms)
            result.unit_reports.extend(reports)

        # masks and reconstructed weights, in effective form (original row order)
        eff: dict[str, np.ndarray] = {}
        masks: dict[str, np.ndarray] = {}
        for w in names:
            u = self.unit_of.get(w)
            sigma = weight_row_perm(self.plan, u, result.perms.get(u.name) if u else None, w)
            eff[w], masks[w] = self.prune(w, wk[w], hessians.get(self.plan.weights[w].input), sigma)

        overrides = {self.plan.weights[w].const: self.stored_tensor(w, eff[w]) for w in names}
        err_pruned = self.error(prog, block, state, overrides, targets)
        err_final = err_pruned
        if cfg.reconstruction.finetune_epochs:
            from permsparse.pipeline.blockwise.finetune import finetune

            tuned, err_final = finetune(prog, block, state, targets, {w: eff[w] for w in names},
                                        {w: masks[w] for w in names}, self.plan, cfg, err_pruned)
            eff.update(tuned)
            overrides = {self.plan.weights[w].const: self.stored_tensor(w, eff[w]) for w in names}
        with torch.no_grad():
            for b, y in zip(state.batches, targets):
                if cfg.reconstruction.sequential:
                    b.sparse = prog.run({block.input: b.sparse, **b.side}, overrides=overrides)[block.output].float()
                    if cfg.reconstruction.teacher == "dense":
                        b.dense = y
                else:  # every block calibrated on the dense model's own activations
                    b.sparse = b.dense = y if cfg.reconstruction.teacher == "dense" else \
                        prog.run({block.input: b.dense, **b.side})[block.output].float()
        for w in names:
            self.store.put(w, self.plan.weights[w].stored(eff[w]))
        log.info("block %d: %d weights, output error %.4g -> %.4g", block.index, len(names), err_pruned, err_final)
        return BlockReport(block.index, len(names), err_pruned, err_final, 0.0)

    def error(self, prog, block: Block, state: CalibState, overrides, targets) -> float:
        from permsparse.pipeline.blockwise.finetune import block_error

        return block_error(prog, block, state, overrides, targets)

    # ------------------------------------------------------------------------------------------------ steps

    def learn(self, units: list[Unit], wk: Mapping[str, np.ndarray], hessians: Mapping[str, np.ndarray]):
        from permsparse.pipeline.problems import solve_problems

        cfg = self.cfg
        problems = []
        for u in units:
            imps = {w: score(self.mask_score, wk[w], hessians.get(self.plan.weights[w].input), cfg.reconstruction.damp)
                    for w in u.weights}
            outputs = None
            if cfg.permutation.objective == "output":
                from permsparse.optimizer.base import OutputTerm

                outputs = tuple(OutputTerm(weight=wk[w], hessian=hessians[self.plan.weights[w].input], score=imps[w],
                                           row_map=row_map(self.plan, u, w)) for w in u.weights)
            mats = tuple(canonical_importance(self.plan, u, w, imps[w]) for w in u.weights)
            problems.append((u, mats, outputs))
        return solve_problems(self.plan, problems, cfg, self.solver)

    def learn_jointly(self, prog, block: Block, state: CalibState, targets, units: list[Unit], p0, wk, hessians):
        """PermLLM: refine the units' permutations jointly on the block's output (:mod:`.permllm`)."""
        from permsparse.pipeline.blockwise.permllm import (
            PermLLMConfig,
            learn_block_perms,
        )

        cfg = self.cfg
        in_units = {w for u in units for w in u.weights}
        scores = {w: score(cfg.mask.importance, wk[w], hessians.get(self.plan.weights[w].input), cfg.reconstruction.damp)
                  for w in in_units}
        fixed = {}
        for w in block.weights:
            if w not in in_units:
                u = self.unit_of.get(w)
                sigma = weight_row_perm(self.plan, u, p0.get(u.name) if u else None, w)
                fixed[w] = self.prune(w, wk[w], hessians.get(self.plan.weights[w].input), sigma)[0]
        pcfg = PermLLMConfig(steps=cfg.permutation.block_steps)
        return learn_block_perms(prog, block, state, targets, self.plan, units, p0, wk, scores, fixed,
                                 lambda u, p, w: weight_row_perm(self.plan, u, p, w),
                                 lambda u, w: row_map(self.plan, u, w), pcfg, cfg.seed + block.index,
                                 device=self.device)

    @property
    def mask_score(self) -> str:
        return "obs" if self.cfg.reconstruction.method == "sparsegpt" else self.cfg.mask.importance

    def prune(self, name: str, wk: np.ndarray, h: np.ndarray | None, sigma: np.ndarray | None):
        """``(W_eff, keep mask)`` in the weight's original row order, ``[K, N]``."""
        n, m = self.plan.pattern.n, self.plan.pattern.m
        if self.cfg.reconstruction.method == "sparsegpt" and h is not None:
            from permsparse.optimizer.sparsegpt import sparsegpt_nm

            res = sparsegpt_nm(wk, h, n, m, perm=sigma, damp=self.cfg.reconstruction.damp, compute_error=False,
                               device=self.device)
            return np.asarray(res.weight, dtype=np.float32), np.asarray(res.mask, dtype=bool)
        imp = score(self.cfg.mask.importance, wk, h, self.cfg.reconstruction.damp)
        order = np.arange(wk.shape[0]) if sigma is None else sigma
        keep_p = nm_keep_mask(imp[order], n, m)
        keep = np.empty_like(keep_p)
        keep[order] = keep_p
        return np.where(keep, wk, 0.0).astype(np.float32), keep


def _check_units(plan: Plan, units: list[Unit], bp: BlockPlan) -> tuple[list[Unit], list[Unit]]:
    """(units inside one block, units spanning blocks or outside them)."""
    inside, outside = [], []
    for u in units:
        blocks = {bp.block_of(w) for w in u.weights}
        (inside if len(blocks) == 1 and None not in blocks else outside).append(u)
    return inside, outside


def split_units(plan: Plan, units: list[Unit], bp: BlockPlan) -> tuple[list[Unit], list[Unit]]:
    return _check_units(plan, units, bp)


__all__ = ["BlockReport", "BlockwiseResult", "Engine", "PermsparseError", "split_units", "weight_row_perm"]

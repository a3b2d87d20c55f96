"""The recovery loop: whole-model distillation of the sparse student from the dense teacher, masks frozen.

Each step runs the student on one batch — prefix, then every block (under activation checkpointing,
``torch.utils.checkpoint``, when the model is big enough for its activations to weigh: only block boundaries are then
kept between forward and backward; see ``RecoverConfig.checkpoint``), then the suffix — and
minimizes

- decoders: KL(teacher ‖ student) of the next-token distributions over the teacher's top-k tokens plus one bucket for
  the rest (exact KL of that coarsening), plus ``hidden_weight`` × the SquareHead term (mean over blocks of
  ‖h_s − h_t‖² / ‖h_t‖²);
- encoders: ‖y_s − y_t‖² / ‖y_t‖² of every float output over the real tokens (padding masked out) plus
  (1 − cosine) of the mean-pooled first output, plus the same per-block term (also over real tokens).

With ``precision`` bf16 (``auto`` picks it where the device multiplies bf16 natively: Ampere+ GPUs, CPUs with
AVX512-BF16/AMX) the student's training runs are autocast — matrix products in bf16, weights, optimizer, losses and
the held-out evaluation in fp32 (SmolLM2-135M on a 2-core Zen 4: 4.7 → 3.7 s per step).

AdamW with linear warm-up and cosine decay over the run (steps, or the wall-clock budget). A masked weight is
trained as the vector of its kept entries (:class:`StudentWeights`): each piece's run rebuilds the dense weight by
scattering them into zeros at the frozen mask, so the pruned entries are exactly zero in every forward pass, get no
gradient and no optimizer state (half the gradient and AdamW memory of a dense copy under 2:4), and every masked
weight keeps its N:M pattern exactly. Per kept entry the arithmetic is that of AdamW on the dense weight with masked
gradients (the dense forward and its gradient are the same numbers). The teacher's outputs for a batch are computed once (on first use) and cached under the
work folder. The held-out score (decoders: cross-entropy on the early-stopping slice; encoders: 1 − pooled cosine to
the teacher) is measured before training and every ``eval_every`` steps; the best weights are kept, and if no step
beats the input the input's weights are the result.

Invariant: pruned entries are exactly zero in every run and every returned weight (they are not parameters: the
dense weight is rebuilt from the kept entries at the frozen mask), and the returned weights have a held-out score no
worse than the input's (the input is the first candidate).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from permsparse.devices import autocast_dtype, feed_to_device, resolve_device
from permsparse.errors import PermsparseError
from permsparse.recover.model import Pieces, Trainable

log = logging.getLogger(__name__)

#: held-out evaluations per run (besides the one before training), when ``eval_every`` is not given
EVALS = 4


@dataclass
class Point:
    step: int
    seconds: float
    loss: float | None  # mean training loss since the previous point
    heldout: float  # decoders: held-out perplexity; encoders: pooled cosine to the teacher
    score: float = float("nan")  # what early stopping minimizes (see Recovery.heldout)


@dataclass
class TrainResult:
    values: dict[str, np.ndarray]  # best trainable values (fp32; masked weights: kept entries only), by constant name
    curve: list[Point] = field(default_factory=list)
    steps: int = 0
    tokens: int = 0
    best_step: int = 0
    heldout_before: float = float("nan")
    heldout_best: float = float("nan")
    seconds: float = 0.0
    resumed_from: int = 0


def lr_factor(frac: float, warmup: float) -> float:
    """Linear warm-up to 1 over ``warmup`` of the run, then cosine decay to 0 at its end."""
    frac = min(max(frac, 0.0), 1.0)
    if warmup > 0 and frac < warmup:
        return max(frac / warmup, 1e-3)
    rest = (frac - warmup) / max(1e-9, 1.0 - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * rest))


class StudentWeights:
    """The trainable tensors of the student: a masked weight as the 1-D vector of its kept entries (with its frozen
    bool mask), a bias or norm parameter as itself. :meth:`materialize` gives the dense values the graph reads.

    Invariant: ``materialize(names)[w]`` is zero exactly off the mask and equals the kept vector, in row-major order,
    on it; its gradient with respect to the kept vector is the dense gradient read at the kept entries."""

    def __init__(self, values: dict[str, torch.Tensor], masks: dict[str, torch.Tensor] | None = None,
                 index: bool = False):
        self.values = values  # leaf tensors (requires_grad), by constant name
        self.masks = masks or {}  # masked weights only: bool keep mask of the stored shape
        # with ``index``: the flat positions of the kept entries (int64, 8 bytes per kept value), so rebuilding a
        # weight is one scatter (and its gradient one gather) instead of masked_scatter / masked_select, which cost
        # ~4x as much on the CPU (bench: 3.1 ms vs 0.7 ms forward + backward for a 1536 x 384 weight)
        self.index = {k: m.reshape(-1).nonzero().squeeze(1) for k, m in self.masks.items()} if index else {}

    @classmethod
    def from_trainable(cls, trainable: Trainable, device: torch.device, index: bool = False) -> StudentWeights:
        """Leaf tensors over ``trainable``'s arrays (sharing memory on the CPU: trained in place)."""
        values = {k: torch.from_numpy(v[0]).to(device).requires_grad_() for k, v in trainable.masked.items()}
        values.update({k: torch.from_numpy(v).to(device).requires_grad_() for k, v in trainable.free.items()})
        masks = {k: torch.from_numpy(v[1]).to(device) for k, v in trainable.masked.items()}
        return cls(values, masks, index)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(m.shape) for k, m in self.masks.items()}

    def __len__(self) -> int:
        return len(self.values)

    def __contains__(self, name: object) -> bool:
        return name in self.values

    def dense(self, name: str) -> torch.Tensor:
        """The value the graph reads (differentiable in the kept vector)."""
        v = self.values[name]
        mask = self.masks.get(name)
        if mask is None:
            return v
        idx = self.index.get(name)
        if idx is not None:
            return torch.zeros(mask.numel(), dtype=v.dtype, device=v.device).scatter(0, idx, v).view(mask.shape)
        return torch.zeros(mask.shape, dtype=v.dtype, device=v.device).masked_scatter(mask, v)

    def materialize(self, names) -> dict[str, torch.Tensor]:
        return {k: self.dense(k) for k in names if k in self.values}


class MaskedAdamW:
    """AdamW over the kept entries of the masked weights and the free parameters (:class:`StudentWeights`), with a
    per-step learning-rate factor. Pruned entries are not parameters, so no step can make them non-zero."""

    def __init__(self, weights: StudentWeights, lr: float, weight_decay: float):
        self.weights = weights
        self.opt = torch.optim.AdamW(list(weights.values.values()), lr=lr, weight_decay=weight_decay)
        self.base_lr = lr

    def step(self, factor: float) -> None:
        for group in self.opt.param_groups:
            group["lr"] = self.base_lr * factor
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def run_pieces(pieces: Pieces, feed: dict[str, torch.Tensor], overrides: StudentWeights | dict[str, torch.Tensor],
               checkpoint: bool) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """Graph outputs and the output of every block (prefix → blocks → suffix). ``overrides``: the student's
    :class:`StudentWeights` (dense weights rebuilt inside each piece's run, so under checkpointing only one block's
    dense weights exist at a time) or plain dense tensors by constant name."""
    from torch.utils.checkpoint import checkpoint as ckpt
    from torch.utils.checkpoint import set_checkpoint_early_stop

    def ov(piece):
        if isinstance(overrides, StudentWeights):
            return overrides.materialize(piece.params) or None
        return {k: overrides[k] for k in piece.params if k in overrides} or None

    env = dict(feed)
    env.update(pieces.prefix.program.run({k: env[k] for k in pieces.prefix.inputs}, overrides=ov(pieces.prefix)))
    hidden = []
    for piece in pieces.blocks:
        x_name, y_name = piece.inputs[0], piece.outputs[0]
        side = {k: env[k] for k in piece.inputs[1:]}

        def fn(x, piece=piece, side=side, x_name=x_name, y_name=y_name):
            return piece.program.run({x_name: x, **side}, overrides=ov(piece))[y_name]

        if checkpoint and torch.is_grad_enabled():
            # no early stop: the evaluator wraps every exception raised inside a node, including torch's stop signal
            with set_checkpoint_early_stop(False):
                y = ckpt(fn, env[x_name], use_reentrant=False)
        else:
            y = fn(env[x_name])
        env[y_name] = y
        hidden.append(y)
    if pieces.suffix is not None:
        env.update(pieces.suffix.program.run({k: env[k] for k in pieces.suffix.inputs}, overrides=ov(pieces.suffix)))
    return {k: env[k] for k in pieces.graph_outputs}, hidden


def _logits_name(outputs: list[str]) -> str:
    named = [o for o in outputs if "logits" in o]
    return named[0] if named else outputs[0]


def _topk_kl(logp: torch.Tensor, target: dict[str, torch.Tensor]) -> torch.Tensor:
    """KL(teacher ‖ student) per token over the teacher's top-k tokens plus one bucket for the rest."""
    top_t = target["top"].to(logp.device)
    ls = logp.gather(-1, target["idx"].to(logp.device).long())
    p_t = top_t.exp()
    kl = (p_t * (top_t - ls)).sum(-1)
    tail_t = (1.0 - p_t.sum(-1)).clamp(min=1e-8)
    tail_s = (1.0 - ls.exp().sum(-1)).clamp(min=1e-8)
    return kl + tail_t * (tail_t.log() - tail_s.log())


def _nmse(h: torch.Tensor, t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """‖h − t‖² / ‖t‖², over the real tokens only when ``mask`` ([batch, seq], 1 = token, 0 = padding) fits ``h``
    ([batch, seq, ...]): an encoder's padded positions carry no meaning and would take a share of the loss."""
    h = h.float()
    if mask is None or h.dim() < 2 or tuple(mask.shape) != tuple(h.shape[:2]):
        return ((h - t) ** 2).mean() / (t**2).mean().clamp(min=1e-12)
    w = mask.to(h.dtype).reshape(*mask.shape, *([1] * (h.dim() - 2)))
    return (((h - t) ** 2) * w).sum() / ((t**2) * w).sum().clamp(min=1e-12)


def _pool(h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None or h.dim() != 3:
        return h.mean(dim=1) if h.dim() == 3 else h
    m = mask.to(h.dtype).unsqueeze(-1)
    return (h * m).sum(1) / m.sum(1).clamp(min=1.0)


class Recovery:
    """Holds the student, the teacher, the data and the optimizer of one recovery run."""

    def __init__(self, student: Pieces, teacher: Pieces, trainable: Trainable, weights: StudentWeights,
                 data, cfg, device: torch.device, work: Path, fingerprint: str, ids_name: str | None = None):
        self.student, self.teacher, self.trainable, self.weights = student, teacher, trainable, weights
        self.data, self.cfg, self.device, self.work = data, cfg, device, work
        self.fingerprint = fingerprint
        self.opt = MaskedAdamW(weights, cfg.lr, cfg.weight_decay)
        self.decoder = data.kind == "lm"
        self.amp = autocast_dtype(cfg.precision, device)  # bf16 matrix products in the student's training runs
        self.logits = _logits_name(student.graph_outputs)
        self.ids_name = ids_name or student.graph_inputs[0]
        # the teacher's cached outputs are named by the run's fingerprint: a work folder reused with other data or
        # settings (sequence length, batch size, ...) never reads targets of other inputs
        self.cache = work / "teacher" / fingerprint[:16]
        self.cache.mkdir(parents=True, exist_ok=True)
        self._stop_teacher: list[dict] | None = None

    # ------------------------------------------------------------------------------------------------ teacher

    def _teacher_outputs(self, feed: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            outs, hidden = run_pieces(self.teacher, feed_to_device(feed, self.device), {}, checkpoint=False)
        self.teacher.release()  # every constant is cached now
        rec: dict[str, torch.Tensor] = {
            "hidden": torch.stack([h.float() for h in hidden]).half().cpu() if hidden else torch.zeros(0)}
        if self.decoder:
            logp = torch.log_softmax(outs[self.logits].float(), dim=-1)
            top, idx = logp.topk(min(self.cfg.top_k, logp.shape[-1]), dim=-1)
            rec["top"], rec["idx"] = top.cpu(), idx.to(torch.int32).cpu()
        else:
            for k, v in outs.items():
                if v.is_floating_point():
                    rec["out:" + k] = v.float().cpu()
        return rec

    def targets(self, i: int) -> dict[str, torch.Tensor]:
        """Teacher outputs of training batch ``i``: computed once, then read from the work folder."""
        path = self.cache / f"{i}.pt"
        if path.exists():
            try:
                return torch.load(path, weights_only=True)
            except Exception:  # noqa: BLE001 - a half-written cache entry (killed run): compute it again
                log.debug("teacher cache %s unreadable; recomputing", path)
        rec = self._teacher_outputs(self.data.train[i])
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save(rec, tmp)
        os.replace(tmp, path)
        return rec

    # ------------------------------------------------------------------------------------------------ loss

    def loss(self, feed: dict[str, np.ndarray], target: dict[str, torch.Tensor]) -> torch.Tensor:
        tfeed = feed_to_device(feed, self.device)
        amp = torch.autocast(self.device.type, dtype=self.amp) if self.amp is not None else contextlib.nullcontext()
        with amp:
            outs, hidden = run_pieces(self.student, tfeed, self.weights, checkpoint=bool(self.cfg.checkpoint))
        self.student.release()
        ht = target["hidden"].to(self.device, torch.float32)
        mask = None if self.decoder else tfeed.get("attention_mask")  # decoder windows are packed: no padding
        block = sum(_nmse(h, t, mask) for h, t in zip(hidden, ht)) / max(1, len(hidden))
        if self.decoder:
            main = _topk_kl(torch.log_softmax(outs[self.logits].float(), dim=-1), target).mean()
        else:
            main = 0.0
            first = True
            for k, v in outs.items():
                t = target.get("out:" + k)
                if t is None:
                    continue
                t = t.to(self.device)
                main = main + _nmse(v, t, mask)
                if first:
                    main = main + (1.0 - F.cosine_similarity(_pool(v.float(), mask), _pool(t, mask), dim=-1)).mean()
                    first = False
        return main + self.cfg.hidden_weight * block

    # ------------------------------------------------------------------------------------------------ held out

    def heldout(self) -> tuple[float, float]:
        """``(score, shown)`` on the early-stopping slice. Decoders: score = mean next-token cross-entropy on the
        real text (KL to the teacher's top-k when the ids are bytes without a tokenizer), shown = perplexity;
        encoders: score = 1 − pooled cosine to the teacher, shown = the cosine."""
        num = den = kl_num = 0.0
        with torch.no_grad():
            if self._stop_teacher is None:
                self._stop_teacher = [self._teacher_outputs(f) for f in self.data.stop]
                for rec in self._stop_teacher:
                    rec.pop("hidden")
            for j, feed in enumerate(self.data.stop):
                tfeed = feed_to_device(feed, self.device)
                outs, _ = run_pieces(self.student, tfeed, self.weights, checkpoint=False)
                target = self._stop_teacher[j]
                if self.decoder:
                    ids = tfeed[self.ids_name].long().to(self.device)
                    logits = outs[self.logits].float()
                    ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                         reduction="sum")
                    num += float(ce)
                    den += ids[:, 1:].numel()
                    kl_num += float(_topk_kl(torch.log_softmax(logits, dim=-1), target).sum())
                else:
                    name = next(k for k in outs if ("out:" + k) in target)
                    mask = tfeed.get("attention_mask")
                    cos = F.cosine_similarity(_pool(outs[name].float(), mask),
                                              _pool(target["out:" + name].to(self.device), mask), dim=-1)
                    num += float((1.0 - cos).sum())
                    den += cos.numel()
        if not self.decoder:
            score = num / max(den, 1)
            return score, 1.0 - score
        ce = num / max(den, 1)
        tokens = sum(int(np.asarray(f[self.ids_name]).size) for f in self.data.stop)
        score = ce if self.data.real_tokens else kl_num / max(tokens, 1)
        return score, math.exp(min(ce, 50.0))

    # ------------------------------------------------------------------------------------------------ checkpoint

    @property
    def best_path(self) -> Path:
        return self.work / "recover-best.pt"

    def _save_best(self) -> None:
        """The best weights so far go to disk (not a second copy in memory)."""
        tmp = self.best_path.with_suffix(f".tmp{os.getpid()}")
        torch.save({k: v.detach().cpu() for k, v in self.weights.values.items()}, tmp)
        os.replace(tmp, self.best_path)

    @property
    def ckpt_path(self) -> Path:
        return self.work / "recover-checkpoint.pt"

    def save(self, state: dict) -> None:
        tmp = self.ckpt_path.with_suffix(f".tmp{os.getpid()}")
        torch.save({"fingerprint": self.fingerprint, "opt": self.opt.opt.state_dict(),
                    "tensors": {k: v.detach().cpu() for k, v in self.weights.values.items()}, **state}, tmp)
        os.replace(tmp, self.ckpt_path)

    def load(self) -> dict | None:
        if not self.ckpt_path.exists():
            return None
        try:
            state = torch.load(self.ckpt_path, weights_only=False)
        except Exception as exc:  # noqa: BLE001
            log.warning("recovery checkpoint %s unreadable (%s); starting over", self.ckpt_path, exc)
            return None
        if state.get("fingerprint") != self.fingerprint:
            log.warning("recovery checkpoint in %s is for other models or settings; starting over", self.work)
            return None
        with torch.no_grad():
            for k, v in state["tensors"].items():
                self.weights.values[k].copy_(v.to(self.device))
        self.opt.opt.load_state_dict(state["opt"])
        return state

    # ------------------------------------------------------------------------------------------------ loop

    def run(self) -> TrainResult:
        from tqdm.auto import tqdm

        cfg = self.cfg
        budget = cfg.budget_s
        total = cfg.steps
        n_train = len(self.data.train)
        batch_tokens = self.data.tokens / max(1, n_train)
        eval_every = cfg.eval_every or (max(1, total // EVALS) if total else None)
        eval_period = None if eval_every else (budget or 60.0) / EVALS

        state = self.load() if cfg.work_dir else None
        if state is not None:
            step, spent, curve = state["step"], state["seconds"], [Point(**p) for p in state["curve"]]
            best_score, best_step, before = state["best_score"], state["best_step"], state["before"]
            log.info("resuming the recovery from step %d (%.0f s done)", step, spent)
            resumed = step
        else:
            step, spent, resumed = 0, 0.0, 0
            before, shown = self.heldout()
            best_score, best_step = before, 0
            curve = [Point(0, 0.0, None, shown, before)]
        t_start = time.perf_counter() - spent
        last_eval_t = time.perf_counter()
        bar = tqdm(total=total if total else None, initial=step, desc="recover", unit="step",
                   disable=not cfg.progress, dynamic_ncols=True)
        losses: list[float] = []
        order = np.random.default_rng(cfg.seed).permutation(n_train)

        def frac() -> float:
            parts = []
            if total:
                parts.append(step / total)
            if budget:
                parts.append((time.perf_counter() - t_start) / budget)
            return max(parts)

        try:
            while frac() < 1.0:
                epoch, pos = divmod(step, n_train)
                if pos == 0 and epoch > 0:
                    order = np.random.default_rng(cfg.seed + epoch).permutation(n_train)
                i = int(order[pos])
                target = self.targets(i)
                loss = self.loss(self.data.train[i], target)

                if not torch.isfinite(loss):
                    raise PermsparseError(f"recovery loss became {float(loss)} at step {step}; lower --lr")
                loss.backward()
                self.opt.step(lr_factor(frac(), cfg.warmup))
                step += 1
                losses.append(float(loss.detach()))
                elapsed = time.perf_counter() - t_start
                due = (eval_every and step % eval_every == 0) or \
                    (eval_period and time.perf_counter() - last_eval_t >= eval_period)
                done = frac() >= 1.0
                if due or done:
                    score, shown = self.heldout()
                    last_eval_t = time.perf_counter()
                    curve.append(Point(step, time.perf_counter() - t_start, float(np.mean(losses)), shown, score))
                    losses = []
                    if score < best_score:
                        best_score, best_step = score, step
                        self._save_best()
                    if cfg.work_dir:
                        self.save({"step": step, "seconds": time.perf_counter() - t_start,
                                   "best_score": best_score, "best_step": best_step, "before": before,
                                   "curve": [p.__dict__ for p in curve]})
                if total is None and budget:
                    rate = step / max(elapsed, 1e-9)
                    bar.total = max(step, int(rate * budget))
                left = (budget - elapsed) if budget and not total else \
                    (total - step) * elapsed / max(step - resumed, 1) if total else 0.0
                metric = "ppl" if self.decoder else "cos"
                bar.set_postfix_str(f"loss {losses[-1] if losses else curve[-1].loss:.4g}, held-out {metric} "
                                    f"{curve[-1].heldout:.4g}, left {max(left, 0):.0f}s")
                bar.update(1)
        finally:
            bar.close()
        tokens = round(step * batch_tokens)
        shown_best = next((p.heldout for p in curve if p.step == best_step), curve[0].heldout)
        best = torch.load(self.best_path, weights_only=True) if best_step > 0 else {}
        return TrainResult({k: v.numpy() for k, v in best.items()}, curve, step, tokens, best_step,
                           curve[0].heldout, shown_best, time.perf_counter() - t_start, resumed)


def fingerprint(*parts: object) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(repr(p).encode())
    return h.hexdigest()[:32]


__all__ = ["MaskedAdamW", "Point", "Recovery", "StudentWeights", "TrainResult", "lr_factor", "resolve_device",
           "run_pieces"]

"""Learned permutations: a learnable cost matrix per window, Sinkhorn relaxation, Hungarian rounding.

For every *window* (``window`` channels = ``window/m`` whole N:M groups inside one constraint block) a cost matrix
``C [w, w]`` is learned. The soft permutation is ``P = Sinkhorn(C / tau)`` (log domain, ``tau`` annealed), the
permuted importance ``P @ A`` is masked by a differentiable top-n-of-m selection and the loss is minus the kept
share (siblings normalized by their total importance, as :func:`~permsparse.optimizer.base.retained_share`).
The relaxation sees Gumbel-perturbed costs (Gumbel-Sinkhorn); every ``eval_every`` steps ``samples`` Hungarian
roundings of ``C`` plus graded Gumbel noise (the first without noise) are scored exactly and each window keeps its
best; rounds stop early after ``patience`` evaluations without gain. All windows of a round are one batched torch
computation. The hard permutation may also be used in the forward pass with a straight-through estimator (PermLLM). Windows are sets of whole groups, so the objective is additive over
windows: every window keeps the best hard assignment seen (evaluated exactly), which makes the result never worse
than the initialisation. Windows are formed from the initial (LSA) order in the first round and re-drawn (random
groups of the current permutation's groups, seeded) in the next rounds so channels can travel across the whole block;
after a round with gains the exact slot-wise LSA refinement (windowed on big blocks) polishes the result.

With ``objective="output"`` and ``problem.outputs`` set, the same relaxation runs on the output loss instead (relative
output error of the masked weights under each sibling's Hessian, for every kind of unit), see
:mod:`permsparse.optimizer.outlearn`; the result is kept only if its exact float64
:func:`~permsparse.optimizer.objectives.output_loss` is not above the initialisation's.

Measured (bench/permutation_methods.py): from an LSA or channel-swap optimum the sampled roundings of 16-group windows
(window=64) essentially never improve a window: those solutions are already optimal for one-member-per-group cyclic
exchanges (slot-wise LSA) and for pairwise swaps. Windows of 2 groups (window=8, the default) let the learner re-split
the 8 channels of two groups (2-for-2 exchanges, which neither baseline explores); an accepted window then lets the
exact refinement leave its local optimum, which is where most of the gain over LSA comes from.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from permsparse.devices import resolve_device
from permsparse.errors import PermsparseError
from permsparse.optimizer.base import (
    PermutationProblem,
    check_permutation,
    retained_share,
)
from permsparse.optimizer.baselines import (
    LsaMethod,
    pick_window_channels,
    refine_block,
    stacked_importance,
)
from permsparse.optimizer.relax import (
    hungarian,
    log_sinkhorn,
    sample_roundings,
    soft_topn,
)
from permsparse.optimizer.swap import ChannelSwapMethod

OBJECTIVES = ("importance", "output")
INITS = ("lsa", "identity", "swap")


@dataclass(frozen=True)
class LearnedConfig:
    """Knobs of :class:`LearnedMethod` (defaults tuned on all-MiniLM-L6-v2 magnitude importance, CPU).

    Attributes:
        window: channels per learned cost matrix (a multiple of m; capped by and made to divide the constraint block).
        rounds: number of window partitions; round 0 uses consecutive groups of the init order, later rounds random ones.
        iterations: Adam steps per round.
        lr: Adam learning rate on the cost matrices.
        tau_start, tau_end: Sinkhorn temperature, annealed linearly over each round.
        sinkhorn_iters: log-domain Sinkhorn normalizations per step.
        init_scale: the cost matrices start at ``init_scale * I`` (the current order) plus ``init_noise`` noise.
        init_noise: standard deviation of the initial noise on the cost matrices.
        select_temp: temperature of the soft top-n-of-m mask, relative to each column's mean importance.
        ste: straight-through estimator: forward with the Hungarian hard permutation, backward through the soft one.
        objective: ``"importance"`` (kept share) or ``"output"`` (relative output error Σ_i tr(E_iᵀ H_i E_i)/tr(W_iᵀ H_i W_i)
            on ``problem.outputs``, :func:`~permsparse.optimizer.objectives.output_loss`); falls back to importance
            without them.
        init: ``"lsa"`` (refine the LSA solution), ``"swap"`` (the converged channel-swap solution) or ``"identity"``.
        eval_every: steps between exact evaluations of the Hungarian rounding.
        refine: after each round, polish the rounded permutation with the exact slot-wise LSA refinement of
            :mod:`~permsparse.optimizer.baselines` (when a round finds no improving window, its last rounding serves as
            a perturbation that the refinement starts from); the round's result is kept only if it is not worse.
            Under the output objective the refinement is the exact pair search.
        refine_rounds: refinement sweeps per round (windowed on big blocks, see ``window_elems``).
        out_window: channels per learned window under the output objective (whole groups of one block).
        out_rounds: rounds under the output objective (each: one Sinkhorn round, then ``refine_rounds`` sweeps of the
            exact pair search); without a budget it also stops after ``patience`` rounds without gain.
        sinkhorn: under the output objective, learn windows with Sinkhorn before each round's exact local search
            (True) or only run the local search (False: every re-split of two groups,
            :func:`~permsparse.optimizer.outlearn.pair_search`). Default False: at equal time (20 s after the LSA
            start, 1 thread, SmolLM2-135M layer 5 with 4096 calibration tokens) the search alone reached a lower
            output loss on all four units (qkv 0.1216 vs 0.1235, gate/up 0.1684 vs 0.1692, down 0.0896 vs 0.0902,
            o→v GQA 0.1044 vs 0.1060; LSA start 0.1265 / 0.1704 / 0.0916 / 0.1199).
        seed: seeds torch and the window draws.
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"`` (:func:`permsparse.devices.resolve_device`);
            ``optimize`` sets it from its ``--device`` (default cpu).
        budget_s: wall-time limit for one solve (None: no limit); the best permutation so far is returned. With a
            budget, rounds continue (beyond ``rounds``) until it is spent.
        samples: Gumbel-perturbed Hungarian roundings of the cost matrices per evaluation, each scored exactly; every
            window keeps its best (Gumbel-Sinkhorn sampling around the learned assignment).
        sample_noise: scale of the Gumbel noise added to the costs (relative to the cost spread) for those samples
            (and, times tau, inside the Sinkhorn relaxation during learning).
        patience: evaluations without any window improving before a round stops early.
        window_elems: windows of the exact LSA refinement (see :func:`~permsparse.optimizer.baselines.pick_window_channels`).
        work_cap: without a budget, big problems get fewer rounds: ``rounds`` is capped at ``work_cap / (k * columns)``
            (at least 1), so the learning stays ~linear in problem size (no effect on MiniLM-sized closures).
    """

    window: int = 8
    rounds: int = 12
    iterations: int = 12
    lr: float = 0.3
    tau_start: float = 1.0
    tau_end: float = 0.1
    sinkhorn_iters: int = 8
    init_scale: float = 1.0
    init_noise: float = 0.1
    select_temp: float = 0.3
    ste: bool = False
    objective: str = "importance"
    init: str = "lsa"
    eval_every: int = 4
    out_window: int = 16
    out_rounds: int = 4
    sinkhorn: bool = False
    refine: bool = True
    refine_rounds: int = 2
    seed: int = 0
    device: str = "auto"
    budget_s: float | None = None
    samples: int = 16
    sample_noise: float = 0.5
    patience: int = 2
    window_elems: int | None = 2**20
    work_cap: float | None = 2e7

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise PermsparseError(f"learned objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.init not in INITS:
            raise PermsparseError(f"learned init must be one of {INITS}, got {self.init!r}")
        if self.window < 4 or self.out_window < 4 or self.iterations < 1 or self.rounds < 1 or self.out_rounds < 1:
            raise PermsparseError("learned: window >= 4, out_window >= 4, iterations >= 1, rounds >= 1 and "
                                  "out_rounds >= 1 are required")


def pick_window(block: int, window: int, m: int) -> int:
    """Largest multiple of m that divides ``block`` and is <= ``window`` (at least m)."""
    best = m
    for w in range(m, min(block, window) + 1, m):
        if block % w == 0:
            best = w
    return best


@dataclass
class LearnedMethod:
    """Sinkhorn-relaxed learned permutation per window, rounded by Hungarian, never worse than its initialisation."""

    config: LearnedConfig = LearnedConfig()
    name: str = "learned"

    # stats of the last solve (for benches/logs)
    last_stats: dict | None = None

    def solve(self, problem: PermutationProblem) -> np.ndarray:
        cfg = self.config
        t0 = time.perf_counter()
        deadline = None if cfg.budget_s is None else t0 + cfg.budget_s
        k, m, n = problem.k, problem.m, problem.n
        if cfg.init == "lsa":
            lsa_budget = None if cfg.budget_s is None else 0.5 * cfg.budget_s
            perm = LsaMethod(seed=cfg.seed, budget_s=lsa_budget, window_elems=cfg.window_elems).solve(problem)
        elif cfg.init == "swap":
            perm = ChannelSwapMethod(seed=cfg.seed, budget_s=None, window_elems=cfg.window_elems).solve(problem)
        else:
            perm = np.arange(k)
        init_perm = perm.copy()
        t_init = time.perf_counter() - t0
        if n >= m or k // m <= 1:
            return perm

        device = resolve_device(cfg.device, option="learned device")
        if cfg.objective == "output" and problem.outputs is not None:
            return self._solve_output(problem, init_perm, t0, t_init, deadline, device)
        torch.manual_seed(cfg.seed)
        rng = np.random.default_rng(cfg.seed)
        gen = torch.Generator(device="cpu").manual_seed(cfg.seed)

        a_np = stacked_importance(problem)
        # rescale to O(1) entries: Adam is scale-free and float32 denormals would slow the CPU down a hundredfold
        a_np = a_np / max(float(a_np.mean()), 1e-300)
        a_all = torch.as_tensor(a_np, dtype=torch.float32, device=device)
        colscale = a_all.mean(dim=0).clamp_min(1e-30)  # [N]
        a_blocks = [a_np[s0 : s0 + problem.block] for s0 in range(0, k, problem.block)]
        w = pick_window(problem.block, cfg.window, m)
        refine_w = pick_window_channels(problem.block, a_np.shape[1], m, cfg.window_elems)
        groups_per_block = problem.block // m
        gpw = w // m
        steps_done = 0
        samples_won = 0
        cur_val = retained_share(problem, perm)
        max_rounds = cfg.rounds
        if cfg.work_cap is not None:
            max_rounds = max(1, min(cfg.rounds, int(cfg.work_cap // max(1, k * a_np.shape[1]))))
        r = 0
        while True:
            if deadline is not None and time.perf_counter() > deadline:
                break
            if r >= max_rounds and deadline is None:
                break
            # windows: [W, w] positions; each row is a union of gpw whole groups of one block, drawn at random from the
            # current permutation's groups (so the learner re-partitions channels among those groups)
            rows = []
            for s0 in range(0, k, problem.block):
                gorder = np.arange(groups_per_block) if r == 0 else rng.permutation(groups_per_block)
                for j in range(0, groups_per_block - gpw + 1, gpw):
                    gs = np.sort(gorder[j : j + gpw])
                    rows.append((s0 + gs[:, None] * m + np.arange(m)[None, :]).reshape(-1))
            r += 1
            idx = np.stack(rows)  # [W, w]
            src = perm[idx]  # canonical channels currently at those positions
            src_t = torch.as_tensor(src, device=device)
            aw = a_all[src_t]  # [W, w, N]
            nw = idx.shape[0]
            eye = torch.eye(w, device=device).expand(nw, w, w)
            noise = torch.randn((nw, w, w), generator=gen).to(device) * cfg.init_noise
            cost = (cfg.init_scale * eye + noise).clone().requires_grad_(True)
            opt = torch.optim.Adam([cost], lr=cfg.lr)

            def exact(sig: np.ndarray, aw: torch.Tensor = aw, nw: int = nw) -> np.ndarray:
                """Per-window score (higher is better) of hard assignments ``sig [..., W, w]``."""
                sig_t = torch.as_tensor(sig, device=device)
                lead = sig_t.shape[:-2]
                with torch.no_grad():
                    ae = aw.expand(*lead, *aw.shape)
                    xp = torch.gather(ae, -2, sig_t[..., None].expand(*sig_t.shape, aw.shape[-1]))
                    g = xp.reshape(*lead, nw, gpw, m, -1)
                    keep = torch.topk(g, n, dim=-2).values.sum(dim=(-3, -2, -1))
                    return keep.double().cpu().numpy()

            best_sig = np.tile(np.arange(w), (nw, 1))
            best_val = exact(best_sig)
            stale = 0
            sig = best_sig
            for it in range(cfg.iterations):
                frac = it / max(1, cfg.iterations - 1)
                tau = cfg.tau_start + (cfg.tau_end - cfg.tau_start) * frac
                # Gumbel-Sinkhorn: the relaxation sees perturbed costs, so it learns costs robust to the rounding noise
                gum = -torch.log(-torch.log(torch.rand((nw, w, w), generator=gen).clamp(1e-10, 1 - 1e-10)))
                logp = log_sinkhorn((cost + cfg.sample_noise * tau * gum.to(device)) / tau, cfg.sinkhorn_iters)
                p = logp.exp()
                if cfg.ste:
                    sig_t = torch.as_tensor(hungarian(cost.detach().cpu().numpy()), device=device)
                    hard = torch.zeros_like(p).scatter_(-1, sig_t[..., None], 1.0)
                    p = hard + p - p.detach()
                xp = torch.bmm(p, aw).reshape(nw, gpw, m, -1)
                mask = soft_topn(xp, n, cfg.select_temp * colscale)
                loss = -(mask * xp).sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                steps_done += 1
                last = it == cfg.iterations - 1
                if (it + 1) % cfg.eval_every == 0 or last:
                    # many stochastic hard roundings + the plain one, all scored exactly
                    sigs = sample_roundings(cost.detach().cpu().numpy(), cfg.samples, cfg.sample_noise, rng)
                    vals = np.concatenate([exact(sigs[i : i + 4]) for i in range(0, cfg.samples, 4)])  # [S, W]
                    top = vals.argmax(axis=0)
                    val = vals[top, np.arange(nw)]
                    sig = sigs[top, np.arange(nw)]
                    better = val > best_val + 1e-9 * np.abs(best_val).clip(min=1e-30)
                    samples_won += int(better.sum())
                    best_sig[better] = sig[better]
                    best_val = np.where(better, val, best_val)
                    stale = 0 if better.any() else stale + 1
                    if stale >= cfg.patience:
                        break
                    if deadline is not None and time.perf_counter() > deadline:
                        break
            improved = (best_sig != np.arange(w)).any(axis=1)
            cand = perm.copy()
            cand[idx] = np.take_along_axis(src, best_sig, axis=1)
            if cfg.refine and improved.any():
                for s0 in range(0, k, problem.block):
                    loc = cand[s0 : s0 + problem.block] - s0
                    cand[s0 : s0 + problem.block] = s0 + refine_block(
                        a_blocks[s0 // problem.block], loc, n, m, rng=rng, rounds=cfg.refine_rounds, window=refine_w,
                        deadline=deadline)
            cand_val = retained_share(problem, cand)
            if cand_val >= cur_val:
                perm, cur_val = cand, cand_val
        check_permutation(perm, k, problem.block)
        # exact guard: never worse than the initialisation
        if retained_share(problem, perm) < retained_share(problem, init_perm):
            perm = init_perm
        self.last_stats = {"seconds": time.perf_counter() - t0, "init_seconds": t_init, "steps": steps_done,
                           "window": w, "device": str(device), "rounds": r, "samples_won": samples_won}
        return perm

    def _solve_output(self, problem: PermutationProblem, init_perm: np.ndarray, t0: float, t_init: float,
                      deadline: float | None, device: torch.device) -> np.ndarray:
        """Output objective: :func:`~permsparse.optimizer.outlearn.learn_output` from ``init_perm``, exact guard.

        The guard is :func:`~permsparse.optimizer.objectives.output_losses` (float64) when every sibling is small
        enough for it; at LLM scale (a sibling with ``K²N > 2³¹``) it is the learner's own float32 loss from freshly
        recomputed ``G = H E`` at the start and at the end (the same float32 products ``output_loss`` would do there),
        so the guard costs no extra ``K²N`` products, and identity is not tried as a start.
        """
        from permsparse.optimizer.objectives import exact_in_float64, output_losses
        from permsparse.optimizer.outlearn import learn_output

        small = exact_in_float64(problem)
        dens: dict = {}
        if small and not np.array_equal(init_perm, np.arange(problem.k)):
            init_loss, ident_loss = output_losses(problem, [init_perm, None], dens)
            if ident_loss < init_loss:  # the importance-optimal init can be worse than plain N:M in output error
                init_perm = np.arange(problem.k)
        perm, stats = learn_output(problem, init_perm, self.config, deadline=deadline, device=device)
        check_permutation(perm, problem.k, problem.block)
        if small:
            init_loss, loss = output_losses(problem, [init_perm, perm], dens)
        else:
            init_loss, loss = stats["loss_start"], stats["loss_end"]
        if loss > init_loss:  # float32 incremental moves fooled by rounding: keep the initialisation
            perm, loss = init_perm, init_loss
        self.last_stats = {"seconds": time.perf_counter() - t0, "init_seconds": t_init, "device": str(device),
                           "output_loss_init": init_loss, "output_loss": loss, **stats}
        return perm


def default_window(problem: PermutationProblem, config: LearnedConfig) -> int:
    return pick_window(problem.block, config.window, problem.m)


__all__ = [
    "LearnedConfig",
    "LearnedMethod",
    "hungarian",
    "log_sinkhorn",
    "pick_window",
    "resolve_device",
    "soft_topn",
]

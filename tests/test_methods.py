"""Permutation methods: validity, block constraints, never-worse guarantees, determinism, base helpers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from permsparse.errors import PermsparseError
from permsparse.optimizer.base import (
    PermutationProblem,
    check_permutation,
    efficacy,
    retained_share,
    unstructured_bound,
)
from permsparse.optimizer.baselines import ChannelSwapMethod, LsaMethod, stacked_importance, kept_sum
from permsparse.optimizer.learned import LearnedConfig, LearnedMethod, hungarian, log_sinkhorn
from permsparse.optimizer.methods import METHODS, make_method
from permsparse.optimizer.solve import solve_all

FAST = LearnedConfig(rounds=2, iterations=15, eval_every=5, refine_rounds=2, device="cpu")


def structured_problem(k=64, n_cols=48, block=None, seed=0, siblings=1) -> PermutationProblem:
    """Random importance where a few large channels are clustered into the same N:M groups (identity is poor)."""
    rng = np.random.default_rng(seed)
    imps = []
    for _ in range(siblings):
        imp = rng.random((k, n_cols)) * 0.1
        big = np.arange(0, k // 2)  # the first half of the channels are big: whole groups full of big channels
        imp[big] += rng.random((big.size, n_cols)) * 2.0
        imps.append(imp)
    return PermutationProblem("structured", tuple(imps), block=block or k)


def test_retained_share_hand_example():
    p = PermutationProblem("h", (np.array([[4.0], [3.0], [2.0], [1.0]]),), block=4)
    assert retained_share(p) == pytest.approx(0.7)
    assert unstructured_bound(p) == pytest.approx(0.7)
    p2 = PermutationProblem("h2", (np.array([[4.0], [3.0], [2.0], [1.0], [4.0], [3.0], [2.0], [1.0]]),), block=8)
    assert retained_share(p2) == pytest.approx(14 / 20)
    # moving both 4s into one group and both 3s into the other keeps 4+4+3+3 = 14 too; ... and bound = (4+4+3+3)/20
    assert unstructured_bound(p2) == pytest.approx(14 / 20)
    p3 = PermutationProblem("h3", (np.array([[4.0], [3.0], [1.0], [1.0], [2.0], [2.0], [0.0], [0.0]]),), block=8)
    assert retained_share(p3) == pytest.approx(11 / 13)  # (4+3) + (2+2)
    assert unstructured_bound(p3) == pytest.approx(11 / 13)
    assert retained_share(p3, np.array([0, 2, 4, 6, 1, 3, 5, 7])) == pytest.approx((4 + 2 + 3 + 2) / 13)
    assert efficacy(0.75, 0.78, 0.80) == pytest.approx(0.6)
    assert efficacy(0.8, 0.8, 0.8) == 0.0


def test_stacked_importance_matches_retained_share():
    p = structured_problem(siblings=3)
    a = stacked_importance(p)
    perm = np.random.default_rng(1).permutation(p.k)
    assert kept_sum(a[perm], 2, 4) == pytest.approx(retained_share(p, perm), rel=1e-9)


def test_sinkhorn_doubly_stochastic():
    torch.manual_seed(0)
    logits = torch.randn(3, 16, 16)
    p = log_sinkhorn(logits / 0.5, 50).exp()
    assert torch.allclose(p.sum(-1), torch.ones(3, 16), atol=1e-3)
    assert torch.allclose(p.sum(-2), torch.ones(3, 16), atol=1e-3)


def test_hungarian_valid_with_ties():
    sig = hungarian(np.zeros((2, 8, 8)))  # all ties
    for s in sig:
        assert sorted(s) == list(range(8))
    cost = np.eye(8) * 5
    assert np.array_equal(hungarian(cost), np.arange(8))


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("block", [16, 64])
def test_every_method_valid_and_honours_block(name, block):
    p = structured_problem(k=64, block=block, siblings=2)
    perm = make_method(name, seed=0, learned=FAST).solve(p)
    check_permutation(perm, p.k, p.block)
    assert retained_share(p, perm) >= retained_share(p) - 1e-12


def test_ties_all_equal_importance():
    p = PermutationProblem("ties", (np.ones((32, 8)),), block=16)
    for name in METHODS:
        perm = make_method(name, learned=FAST).solve(p)
        check_permutation(perm, 32, 16)


def test_classical_beat_identity_on_structured():
    p = structured_problem(k=64, n_cols=48)
    ident = retained_share(p)
    for method in (LsaMethod(), ChannelSwapMethod(init="identity"), ChannelSwapMethod()):
        assert retained_share(p, method.solve(p)) > ident + 1e-3


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_learned_never_worse_than_init(seed):
    rng = np.random.default_rng(seed)
    p = PermutationProblem("rand", (rng.random((64, 32)) ** 3, rng.random((64, 16))), block=64)
    for init in ("lsa", "identity"):
        cfg = LearnedConfig(rounds=2, iterations=10, eval_every=5, refine=False, init=init, seed=seed, device="cpu")
        init_perm = LsaMethod(seed=seed).solve(p) if init == "lsa" else np.arange(p.k)
        perm = LearnedMethod(cfg).solve(p)
        check_permutation(perm, p.k, p.block)
        assert retained_share(p, perm) >= retained_share(p, init_perm) - 1e-12


def test_determinism_same_seed():
    p = structured_problem(k=64, block=32, siblings=2, seed=3)
    for name in ("lsa", "channel_swap", "learned"):
        a = make_method(name, seed=5, learned=FAST).solve(p)
        b = make_method(name, seed=5, learned=FAST).solve(p)
        assert np.array_equal(a, b), name


def test_output_objective_runs():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((32, 8))
    x = rng.standard_normal((40, 32))
    p = PermutationProblem("out", (np.abs(w),), block=32, activations=x, weights=(w,))
    perm = LearnedMethod(LearnedConfig(rounds=1, iterations=5, objective="output", device="cpu")).solve(p)
    check_permutation(perm, 32, 32)


def test_unknown_method():
    with pytest.raises(PermsparseError, match="channel_swap"):
        make_method("nope")


def test_solve_all_in_process_and_pool():
    probs = [structured_problem(k=32, block=16, seed=s) for s in range(3)]
    res = solve_all(probs, "lsa", workers=1, seed=0, budget_s=None, learned_config=None, progress=False)
    assert len(res) == 3
    for p, r in zip(probs, res):
        check_permutation(r.perm, p.k, p.block)
        assert r.retained >= r.retained_identity
        assert r.retained == pytest.approx(retained_share(p, r.perm))
    res2 = solve_all(probs, "lsa", workers=2, seed=0, progress=False)
    assert all(np.array_equal(a.perm, b.perm) for a, b in zip(res, res2))


# ----------------------------------------------------------------------------------------------- windowed search


def test_group_kept_fast_path_matches_partition():
    from permsparse.optimizer.baselines import _others_topn, group_kept

    rng = np.random.default_rng(0)
    a = rng.random((64, 7))
    g = a.reshape(16, 4, 7)
    ref = (-np.partition(-g, 1, axis=1)[:, :2]).sum(axis=(1, 2))
    assert np.allclose(group_kept(a, 2, 4), ref)
    base, thr = _others_topn(g, 2)
    for s in range(4):
        part = -np.partition(-np.delete(g, s, axis=1), 1, axis=1)[:, :2]
        assert np.allclose(base[:, s], part.sum(axis=(1, 2)))
        assert np.allclose(thr[:, s], part.min(axis=1))


def test_window_helpers():
    from permsparse.optimizer.baselines import group_windows, pick_window_channels

    assert pick_window_channels(384, 1536, 4, 2**20) == 384  # MiniLM blocks: whole block
    assert pick_window_channels(4096, 4096, 4, 2**20) == 256
    assert pick_window_channels(4096, 10**6, 4, 2**20) == 128  # floor
    assert pick_window_channels(4096, 4096, 4, None) == 4096
    wins = group_windows(50, 16, np.random.default_rng(0))
    assert sorted(np.concatenate(wins).tolist()) == list(range(50))
    assert max(len(w) for w in wins) - min(len(w) for w in wins) <= 1


@pytest.mark.parametrize("block", [128, 256])
def test_windowed_baselines_valid_and_improve(block):
    from permsparse.optimizer.baselines import ChannelSwapMethod, LsaMethod

    p = structured_problem(k=256, n_cols=32, block=block, siblings=2, seed=4)
    # window_elems / columns(64) = 32 channels per window: forces the windowed code paths
    lsa = LsaMethod(window_elems=32 * 64).solve(p)
    check_permutation(lsa, p.k, p.block)
    assert retained_share(p, lsa) > retained_share(p) + 1e-3
    sw = ChannelSwapMethod(window_elems=32 * 64).solve(p)
    check_permutation(sw, p.k, p.block)
    assert retained_share(p, sw) >= retained_share(p, lsa) - 1e-12
    sw2 = ChannelSwapMethod(window_elems=32 * 64, seed=0).solve(p)
    assert np.array_equal(sw, sw2)


def test_windowed_refine_never_decreases():
    from permsparse.optimizer.baselines import refine_block

    rng = np.random.default_rng(2)
    a = rng.random((256, 16)) ** 3
    local = rng.permutation(256)
    out = refine_block(a, local, 2, 4, rng=np.random.default_rng(0), rounds=3, window=32)
    assert sorted(out.tolist()) == list(range(256))
    assert kept_sum(a[out], 2, 4) >= kept_sum(a[local], 2, 4) - 1e-12


def test_learned_swap_init_never_worse_and_identity_init_learns():
    p = structured_problem(k=128, n_cols=32, siblings=2, seed=7)
    base = ChannelSwapMethod(seed=0).solve(p)
    cfg = LearnedConfig(rounds=2, iterations=8, eval_every=4, samples=4, init="swap", device="cpu")
    perm = LearnedMethod(cfg).solve(p)
    check_permutation(perm, p.k, p.block)
    assert retained_share(p, perm) >= retained_share(p, base) - 1e-12
    # from identity without refinement only the learner (sampled Hungarian roundings) can move channels
    cfg = LearnedConfig(rounds=2, iterations=8, eval_every=4, samples=4, init="identity", refine=False, device="cpu")
    method = LearnedMethod(cfg)
    perm = method.solve(p)
    check_permutation(perm, p.k, p.block)
    assert retained_share(p, perm) > retained_share(p) + 1e-3
    assert method.last_stats["samples_won"] > 0

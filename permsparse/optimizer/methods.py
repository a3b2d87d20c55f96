"""Method names to method objects (a plain if/elif)."""

from __future__ import annotations

from dataclasses import replace

from permsparse.errors import PermsparseError
from permsparse.optimizer.base import PermutationMethod
from permsparse.optimizer.baselines import IdentityMethod, LsaMethod
from permsparse.optimizer.learned import LearnedConfig, LearnedMethod
from permsparse.optimizer.swap import ChannelSwapMethod

METHODS = ("identity", "lsa", "channel_swap", "learned")


def make_method(name: str, *, seed: int = 0, budget_s: float | None = None,
                learned: LearnedConfig | None = None) -> PermutationMethod:
    """The permutation method called ``name`` (one of :data:`METHODS`).

    ``seed`` overrides ``learned.seed``; ``budget_s`` (seconds per problem) overrides ``learned.budget_s`` when given.
    """
    if name == "identity":
        return IdentityMethod()
    if name == "lsa":
        return LsaMethod(seed=seed, budget_s=budget_s)
    if name == "channel_swap":
        return ChannelSwapMethod(seed=seed, budget_s=budget_s)
    if name == "learned":
        cfg = learned or LearnedConfig()
        cfg = replace(cfg, seed=seed, budget_s=budget_s if budget_s is not None else cfg.budget_s)
        return LearnedMethod(cfg)
    raise PermsparseError(f"unknown permutation method {name!r}; choose one of: {', '.join(METHODS)}")

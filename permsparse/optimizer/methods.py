"""Permutation methods by name: the registry that ``--method``'s choices and the config's validation read.

:data:`METHOD_FACTORIES` maps each name to a factory ``(*, seed, budget_s, learned) -> PermutationMethod``, filled by
the :func:`register` decorator below, in the order the CLI lists them. The factories import their method class
lazily, so reading the names (``permsparse optimize --help``) loads no torch.

Adding a method: its class in its own module, one ``@register("name")`` factory here, and a test
(``tests/test_registries.py`` shows that a registered name reaches the CLI and :class:`permsparse.pipeline.config.OptimizeConfig`).

Invariant: :func:`make_method` answers exactly the names of :data:`METHOD_FACTORIES`, and ``seed``/``budget_s`` reach
every method that takes them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from permsparse.errors import PermsparseError

if TYPE_CHECKING:
    from permsparse.optimizer.base import PermutationMethod
    from permsparse.optimizer.learned import LearnedConfig

MethodFactory = Callable[..., "PermutationMethod"]
"""``factory(*, seed: int, budget_s: float | None, learned: LearnedConfig | None) -> PermutationMethod``."""

METHOD_FACTORIES: dict[str, MethodFactory] = {}
"""The registry: method name -> factory (insertion order is the order the CLI lists)."""


def register(name: str) -> Callable[[MethodFactory], MethodFactory]:
    """Decorator: register ``factory`` as permutation method ``name`` (a name registered twice is an error)."""

    def add(factory: MethodFactory) -> MethodFactory:
        if name in METHOD_FACTORIES:
            raise ValueError(f"permutation method {name!r} is registered twice")
        METHOD_FACTORIES[name] = factory
        return factory

    return add


@register("identity")
def _identity(*, seed: int, budget_s: float | None, learned: LearnedConfig | None) -> PermutationMethod:
    from permsparse.optimizer.baselines import IdentityMethod

    return IdentityMethod()


@register("lsa")
def _lsa(*, seed: int, budget_s: float | None, learned: LearnedConfig | None) -> PermutationMethod:
    from permsparse.optimizer.baselines import LsaMethod

    return LsaMethod(seed=seed, budget_s=budget_s)


@register("channel_swap")
def _channel_swap(*, seed: int, budget_s: float | None, learned: LearnedConfig | None) -> PermutationMethod:
    from permsparse.optimizer.swap import ChannelSwapMethod

    return ChannelSwapMethod(seed=seed, budget_s=budget_s)


@register("learned")
def _learned(*, seed: int, budget_s: float | None, learned: LearnedConfig | None) -> PermutationMethod:
    from permsparse.optimizer.learned import LearnedConfig, LearnedMethod

    cfg = learned or LearnedConfig()
    cfg = replace(cfg, seed=seed, budget_s=budget_s if budget_s is not None else cfg.budget_s)
    return LearnedMethod(cfg)


METHODS: tuple[str, ...] = tuple(METHOD_FACTORIES)
"""The built-in method names (the registry's names when this module was imported)."""


def make_method(name: str, *, seed: int = 0, budget_s: float | None = None,
                learned: LearnedConfig | None = None) -> PermutationMethod:
    """The permutation method called ``name`` (a key of :data:`METHOD_FACTORIES`).

    ``seed`` overrides ``learned.seed``; ``budget_s`` (seconds per problem) overrides ``learned.budget_s`` when given.
    """
    factory = METHOD_FACTORIES.get(name)
    if factory is None:
        raise PermsparseError(f"unknown permutation method {name!r}; choose one of: {', '.join(METHOD_FACTORIES)}")
    return factory(seed=seed, budget_s=budget_s, learned=learned)

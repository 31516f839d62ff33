"""Policy registry: `make_policy("heft", ctx)`; modules register their classes on import."""

from __future__ import annotations

from collections.abc import Iterable

from fate_ray.policies.base import Policy, PolicyContext

_REGISTRY: dict[str, type[Policy]] = {}

# The baselines every benchmark compares against, RoundRobin first (it is the normaliser).
BASELINES = ("round_robin", "random", "least_loaded", "heft", "model_affinity", "prefix_affinity", "state_eft",
             "llmd_scorer")
ABLATIONS = ("fate-h0", "fate-no-residency", "fate-no-locality", "fate-no-prefix", "fate-no-reach", "fate-greedy",
             "fate-no-prefetch")


def register(cls: type[Policy]) -> type[Policy]:
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"policy name {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def _load_builtin() -> None:
    # Imported here so that registering happens once, without import cycles through base.
    from fate_ray.policies import (  # noqa: F401
        fate,
        heft,
        least_loaded,
        llmd_scorer,
        model_affinity,
        prefix_affinity,
        random_policy,
        round_robin,
        state_eft,
    )


def policy_names() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def check_policy_names(names: Iterable[str]) -> None:
    """Raise ValueError naming the first unknown policy and every known one (before any work starts)."""
    _load_builtin()
    for name in names:
        if name not in _REGISTRY:
            raise ValueError(f"unknown policy {name!r}; known: {', '.join(sorted(_REGISTRY))}")


def make_policy(name: str, ctx: PolicyContext) -> Policy:
    check_policy_names([name])
    return _REGISTRY[name](ctx)

"""Policy registry: `make_policy("heft", ctx)`; modules register their classes on import.

A policy with settings (FATE: `FateConfig`) also takes them in its name, `fate:lam=0.5,horizon_hops=1`, so a sweep
is a list of names on the command line (`fate-ray bench --policies fate,fate:lam=0.5`)."""

from __future__ import annotations

from collections.abc import Iterable

import yaml
from pydantic import ValidationError

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
    """Raise ValueError naming the first unknown policy (and every known one) or bad setting, before any work."""
    _load_builtin()
    for name in names:
        _resolve(name)


def make_policy(name: str, ctx: PolicyContext) -> Policy:
    cls, config = _resolve(name)
    return cls(ctx, config=config) if config is not None else cls(ctx)


def _resolve(name: str):
    """`fate:lam=0.5` -> (the `fate` class, its config with lam 0.5); `heft` -> (the class, None)."""
    _load_builtin()
    base, _, spec = name.partition(":")
    if base not in _REGISTRY:
        raise ValueError(f"unknown policy {base!r}; known: {', '.join(sorted(_REGISTRY))}")
    cls = _REGISTRY[base]
    if not spec:
        return cls, None
    config = getattr(cls, "config", None)
    if config is None:
        raise ValueError(f"policy {base!r} takes no settings (in {name!r}); FATE and its variants do")
    settings = {}
    for item in spec.split(","):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"policy {name!r}: settings are key=value pairs separated by commas, e.g. fate:lam=0.5")
        settings[key.strip()] = yaml.safe_load(value)
    try:
        return cls, type(config)(**{**config.model_dump(), **settings})
    except ValidationError as exc:
        problem = exc.errors()[0]
        raise ValueError(f"policy {name!r}: {'.'.join(map(str, problem['loc']))}: {problem['msg']}") from None

"""The FATE planner (`fate`) and its ablations (`fate-h0`, `fate-no-*`, `fate-greedy`)."""

from fate_ray.policies.fate.planner import VARIANTS, FatePolicy, make_policy_variant
from fate_ray.policies.registry import register

register(FatePolicy)
for _name, _settings in VARIANTS.items():
    register(make_policy_variant(_name, **_settings))

__all__ = ["FatePolicy", "VARIANTS"]

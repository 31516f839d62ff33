"""Scheduling policies behind one interface (`base.Policy`) and a registry keyed by name."""

from fate_ray.policies.base import Assignment, Plan, Policy, PolicyContext, ReadyStage
from fate_ray.policies.registry import BASELINES, check_policy_names, make_policy, policy_names, register

__all__ = ["Assignment", "Plan", "Policy", "PolicyContext", "ReadyStage", "BASELINES", "check_policy_names", "make_policy",
           "policy_names", "register"]

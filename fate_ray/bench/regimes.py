"""Cold and warm regimes: every suite runs each instance twice, from empty devices and from a serving cluster.

- `cold`: every device starts empty (no model loaded, empty caches).
- `warm`: the devices start with the instance's models ACTIVE, as an operator serving that traffic would have
  deployed them (`warm_placement`):
    1. rank the models the instance uses by descending request share (requests of all its stages over all its
       workflows), ties by name;
    2. walk the devices round-robin (a cursor over the cluster's devices in their order): each model, in rank
       order, goes to the first device from the cursor on that fits it, does not hold it yet and has free memory
       for its footprint (weights + KV reserve, what an ACTIVE model holds); the cursor then moves past that device;
    3. repeat step 2 over the ranked list until a whole pass places nothing.
  So every model the instance uses is resident somewhere when any device fits it, the most requested models get
  the first and most replicas, and no device holds more than its memory. Prefix caches start empty.
Both regimes of an instance share its workflows and therefore its arrivals (sim/arrivals.py depends on neither).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from fate_ray.schema.cluster import ClusterSpec
from fate_ray.workload import Workflow

if TYPE_CHECKING:
    from fate_ray.bench.instances import Instance

REGIMES = ("cold", "warm")
InitialModels = tuple[tuple[str, tuple[str, ...]], ...]


def request_share(workflows: Sequence[Workflow]) -> dict[str, int]:
    """Requests per model over the workflows (the ranking of `warm_placement`)."""
    counts: dict[str, int] = {}
    for w in workflows:
        for st in w.stages.values():
            counts[st.model] = counts.get(st.model, 0) + st.num_requests
    return counts


def warm_placement(workflows: Sequence[Workflow], cluster: ClusterSpec) -> InitialModels:
    """(device id, models ACTIVE there at t = 0) per device holding any, by the rule of the module docstring."""
    counts = request_share(workflows)
    ranked = sorted(counts, key=lambda m: (-counts[m], m))
    devices = cluster.devices
    held: list[list[str]] = [[] for _ in devices]
    free = [cluster.device_types[d.type].memory_gib for d in devices]
    cursor = 0
    placed = True
    while placed:
        placed = False
        for model in ranked:
            need = cluster.models[model].footprint_gib
            for step in range(len(devices)):
                i = (cursor + step) % len(devices)
                if cluster.fits(model, devices[i].type) and model not in held[i] and need <= free[i] + 1e-9:
                    held[i].append(model)
                    free[i] -= need
                    cursor = i + 1
                    placed = True
                    break
    return tuple((d.device_id, tuple(models)) for d, models in zip(devices, held) if models)


def with_regimes(instances: Sequence[Instance], cluster: ClusterSpec) -> list[Instance]:
    """Each instance as `<name>@cold` then `<name>@warm`, grouped by regime (combined with its own group)."""
    out = []
    for inst in instances:
        for regime in REGIMES:
            initial = warm_placement(inst.workflows, cluster) if regime == "warm" else ()
            group = f"{regime} {inst.group}" if inst.group else regime
            out.append(replace(inst, name=f"{inst.name}@{regime}", group=group, regime=regime,
                               initial_models=initial))
    return out

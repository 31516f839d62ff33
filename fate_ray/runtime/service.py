"""The planner service: one planner actor and one GPU worker actor per device, shared by every job on a cluster.

On a cluster named by `RAY_ADDRESS` the actors are detached and named in the `fate` namespace (`fate-planner`,
`fate-worker-<device>`): `fate-ray up` starts them, `fate-ray run` attaches to them (or starts them when there are
none), `fate-ray down` stops them. They outlive every job, so the workers keep their engines, resident models and
prefix caches between jobs, and the planner keeps its belief about them: a second job finds its models resident.
An embedded local run (no `RAY_ADDRESS`) starts the same actors scoped to that run instead.

Where a worker runs: on a cluster whose Ray nodes declare `fate-node:<node>` resources (the deploy/ manifests do,
one per node of the cluster YAML, as many as its devices), each device's worker is pinned to its node, so devices
the planner models as sharing a node (and its fast links) really do. Without them (a local head) a worker only asks
for one GPU.

A job's lifetime reaches the planner through a `JobToken`, a tiny actor the job's driver owns: Ray kills it with
its owner (a finished driver, a driver stopped by `ray job stop`), the planner's pending call on it fails, and the
planner cancels that job's unfinished workflows and forgets them. Other jobs' work is untouched.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import ray
from ray.exceptions import GetTimeoutError

from fate_ray.controller import DEFAULT_QUEUE_ORDER, QueueOrder
from fate_ray.engines.physics import Draws
from fate_ray.engines.sim_engine import DEFAULT_TIME_SCALE
from fate_ray.runtime.planner import PLANNER_NAME, PlannerActor
from fate_ray.runtime.worker import GpuWorker, worker_name
from fate_ray.schema.cluster import ClusterSpec

NAMESPACE = "fate"
WORKER_START_TIMEOUT_S = 120.0
NODE_RESOURCE_PREFIX = "fate-node:"


class ServiceError(ValueError):
    """The service cannot be started or used as asked; the message is one sentence saying what to do (the CLI
    prints it as `error: ...`, exit 2)."""


@dataclass(frozen=True)
class ServiceConfig:
    """What the planner and workers are started with (fixed for the service's life)."""

    policy: str = "fate"
    engine: str = "sim"
    time_scale: float = DEFAULT_TIME_SCALE  # SimEngine: wall seconds per modelled second
    seed: int = 0
    queue_order: QueueOrder = DEFAULT_QUEUE_ORDER
    prefetch: bool = True
    fail_stages: frozenset[str] = frozenset()  # SimEngine fault injection (tests)
    draws: Draws | None = None  # SimEngine's random draws; None = the simulator's defaults
    # The planner's journal (runtime/journal.py): with one, Ray restarts a dead planner, which replays it.
    state_dir: str | None = None


def start_actors(cluster: ClusterSpec, cfg: ServiceConfig, *, detached: bool = False, name_suffix: str = ""):
    """One GpuWorker per device, then the planner; returns (planner, workers by device id).

    Detached: named in the `fate` namespace and shared (`get_if_exists`, so two jobs starting the service at
    once get the same actors). Otherwise scoped to this driver, named with `name_suffix` in its own namespace.
    """
    options: dict = {"namespace": NAMESPACE, "lifetime": "detached", "get_if_exists": True} if detached else {}
    offered = ray.cluster_resources()
    gpus = int(offered.get("GPU", 0))
    if gpus < len(cluster.devices):
        raise ServiceError(f"cluster {cluster.name!r} has {len(cluster.devices)} devices but Ray offers {gpus} GPU(s): "
                           "start Ray with at least that many GPUs (--num-gpus) or pass a smaller --cluster")
    placement = worker_resources(cluster, offered)
    workers = {d.device_id: GpuWorker.options(name=worker_name(d.device_id) + name_suffix,
                                              resources=placement[d.device_id], **options).remote(
        cluster, d.device_id, cfg.engine, cfg.time_scale, cfg.fail_stages, cfg.draws) for d in cluster.devices}
    try:
        ray.get([w.ping.remote() for w in workers.values()], timeout=WORKER_START_TIMEOUT_S)
    except GetTimeoutError:
        free = int(ray.available_resources().get("GPU", 0))
        raise ServiceError(f"the {len(workers)} GPU workers did not all start within {WORKER_START_TIMEOUT_S:.0f} s "
                           f"({free} of {gpus} GPUs free): another job may hold the GPUs") from None
    restarts = {"max_restarts": -1} if cfg.state_dir else {}
    planner = PlannerActor.options(name=PLANNER_NAME + name_suffix, **options, **restarts).remote(
        cluster, cfg.policy, workers, cfg.seed, cfg.time_scale, PLANNER_NAME + name_suffix, cfg.queue_order,
        cfg.prefetch, cfg.engine, cfg.state_dir)
    info = ray.get(planner.info.remote())
    if detached and (info["cluster"], info["policy"], info["engine"]) != (cluster, cfg.policy, cfg.engine):
        # Another job started the service at the same moment, with other settings: its actors won.
        raise ServiceError(f"another job started the fate-ray service at the same time with cluster "
                           f"{info['cluster'].name!r}, policy {info['policy']!r} and engine {info['engine']!r}: run "
                           "again to attach to it")
    return planner, workers


def node_resource(node: str) -> str:
    """The Ray custom resource that marks the Ray node standing for `node` of the cluster YAML."""
    return NODE_RESOURCE_PREFIX + node


def worker_resources(cluster: ClusterSpec, offered: dict[str, float]) -> dict[str, dict[str, float]]:
    """Ray resources each device's worker asks for beyond its GPU: one unit of its node's `fate-node:<node>` when
    the Ray cluster declares such resources, else none. A cluster that declares them must declare every node of
    the YAML with at least as many units as the node has devices; otherwise workers would wait forever."""
    if not any(key.startswith(NODE_RESOURCE_PREFIX) for key in offered):
        return {d.device_id: {} for d in cluster.devices}
    for node in cluster.nodes:
        need = sum(group.count for group in node.devices)
        have = offered.get(node_resource(node.name), 0)
        if have < need:
            raise ServiceError(
                f"cluster {cluster.name!r} node {node.name!r} has {need} device(s) but Ray offers {have:g} of the "
                f"resource {node_resource(node.name)!r}: start that node's Ray with "
                f"--resources='{{\"{node_resource(node.name)}\": {need}}}' (see deploy/) or pass the --cluster "
                "that matches this Ray cluster")
    return {d.device_id: {node_resource(d.node): 1} for d in cluster.devices}


def find_planner():
    """The service's planner on the connected cluster, or None."""
    try:
        return ray.get_actor(PLANNER_NAME, namespace=NAMESPACE)
    except ValueError:
        return None


def service_actor_names() -> list[str]:
    """Named actors in the `fate` namespace that are alive."""
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == NAMESPACE)


def stop_service() -> list[str]:
    """Kill every actor of the service (the planner first, so it dispatches nothing more); returns their names."""
    names = service_actor_names()
    for name in sorted(names, key=lambda n: n != PLANNER_NAME):
        try:
            ray.kill(ray.get_actor(name, namespace=NAMESPACE), no_restart=True)
        except ValueError:
            pass  # gone meanwhile
    return names


@ray.remote(num_cpus=0)
class JobToken:
    """Alive exactly as long as the job whose driver created it (Ray kills an actor with its owner)."""

    async def hold(self) -> None:
        await asyncio.Event().wait()

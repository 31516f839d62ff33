"""Shared fixtures: the shipped cluster and examples, and a tiny hand-made cluster whose figures give exact numbers.

The tiny cluster (block_tokens 4; links 100 GB/s in a node, 10 GB/s between nodes):

    device type  memory  concurrency  host RAM  devices
    fast         10 GiB  2            8 GiB     n1/gpu0, n1/gpu1
    slow          5 GiB  1            8 GiB     n2/gpu2, n2/gpu3

    model  weights  KV reserve  footprint  prefix-cache capacity
    a      2 GiB    1 GiB       3 GiB      256 blocks (1024 KiB/token)
    b      3 GiB    1 GiB       4 GiB      256 blocks
    c      4 GiB    2 GiB       6 GiB      512 blocks (does not fit `slow`)

    every model  load_s  wake_s  prefill_tok_s  decode step at batch k
    on fast      10      1       100            (9 + k) ms
    on slow      20      2       50             (14 + k) ms
"""

from __future__ import annotations

import copy
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fate_ray.runtime.local_head import write_token  # no Ray import behind it: the settings below come first
from fate_ray.schema.cluster import ClusterSpec, load_cluster
from fate_ray.schema.workflow import load_workflow
from fate_ray.workload import Workflow

# Every process that talks to a loopback Ray head needs these before Ray is imported (docs/environment.md):
# without the first, Ray rewrites 127.0.0.1 to the machine's external address and connections hang. Token
# authentication stays on: one token for the whole session (its head, embedded clusters, the jobs and CLIs the
# tests start), because a process caches the first token it loads.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ["RAY_AUTH_MODE"] = "token"
SESSION_TOKEN = write_token(Path(tempfile.mkdtemp(prefix="fray-token-")) / "auth_token")
os.environ["RAY_AUTH_TOKEN_PATH"] = str(SESSION_TOKEN)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_FILES = sorted((ROOT / "workflows").glob("*.yaml"))
MIXED_CLUSTER_FILE = ROOT / "workflows" / "clusters" / "mixed-h100-l4.yaml"

FAST = {"load_s": 10, "wake_s": 1, "prefill_tok_s": 100, "decode_step_ms_b1": 10, "decode_step_ms_b32": 41}
SLOW = {"load_s": 20, "wake_s": 2, "prefill_tok_s": 50, "decode_step_ms_b1": 15, "decode_step_ms_b32": 46}
TINY: dict[str, Any] = {
    "name": "tiny",
    "block_tokens": 4,
    "links": {"intra_node_gbps": 100, "inter_node_gbps": 10},
    "device_types": {
        "fast": {"memory_gib": 10, "concurrency": 2, "host_offload_gib": 8},
        "slow": {"memory_gib": 5, "concurrency": 1, "host_offload_gib": 8},
    },
    "nodes": [{"name": "n1", "devices": [{"type": "fast", "count": 2}]},
              {"name": "n2", "devices": [{"type": "slow", "count": 2}]}],
    "models": {
        "a": {"params_b": 1, "weights_gib": 2, "kv_reserve_gib": 1, "kv_kib_per_token": 1024,
              "profiles": {"fast": FAST, "slow": SLOW}},
        "b": {"params_b": 1, "weights_gib": 3, "kv_reserve_gib": 1, "kv_kib_per_token": 1024,
              "profiles": {"fast": FAST, "slow": SLOW}},
        "c": {"params_b": 2, "weights_gib": 4, "kv_reserve_gib": 2, "kv_kib_per_token": 1024,
              "profiles": {"fast": FAST, "slow": SLOW}},
    },
}


@pytest.fixture
def make_cluster() -> Callable[..., ClusterSpec]:
    """`make_cluster(fast={"supports_sleep": False})`: the tiny cluster with some device-type fields changed."""

    def build(**device_type_changes: dict[str, Any]) -> ClusterSpec:
        data = copy.deepcopy(TINY)
        for name, changes in device_type_changes.items():
            data["device_types"][name].update(changes)
        return ClusterSpec.model_validate(data)

    return build


@pytest.fixture
def tiny_cluster(make_cluster) -> ClusterSpec:
    return make_cluster()


@pytest.fixture(scope="session")
def mixed_cluster() -> ClusterSpec:
    return load_cluster(MIXED_CLUSTER_FILE)


@pytest.fixture(scope="session")
def example_workflows(mixed_cluster) -> list[Workflow]:
    return [load_workflow(path, mixed_cluster)[1] for path in EXAMPLE_FILES]


@pytest.fixture(scope="session")
def ray_head():
    """One real Ray head on loopback for the whole session (its own temp dir and ports, 8 fake GPUs: enough for
    the default cluster), shared by the runtime, `ray job submit` and metrics tests."""
    from fate_ray.runtime.local_head import start_local_head

    head = start_local_head(num_gpus=8, gcs_port=6391, dashboard_port=8266, metrics_port=8081,
                            token_path=SESSION_TOKEN)
    yield head
    head.stop()


@pytest.fixture
def ray_client(ray_head):
    """This test process connected to the session's head (and disconnected afterwards)."""
    import ray

    if not ray.is_initialized():
        ray.init(address=ray_head.gcs_address, log_to_driver=False)
    yield ray_head

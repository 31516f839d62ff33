"""Cluster YAML: nodes, device types, the model catalog and links, as validated pydantic models.

A cluster file either lists its models inline or names a catalog file (`catalog: catalog.yaml`, relative to the
cluster file); inline `models` entries override catalog entries of the same name. Every figure can be overridden
in YAML; the shipped catalog cites its source next to each one (docs/calibration.md).

Units are in the field names: `*_gib` (GiB), `*_s` (seconds), `*_ms` (milliseconds), `*_tok_s` (tokens/second),
`*_gbps` (GB/s).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    PrivateAttr,
    ValidationError,
    model_validator,
)

from fate_ray.schema.errors import InputError
from fate_ray.schema.yaml_lines import load_located

DEFAULT_CLUSTER_FILE = "mixed-h100-l4.yaml"

Positive = Annotated[float, Field(gt=0)]


class FrozenModel(BaseModel):
    """Every schema model: immutable once validated, and unknown keys are errors (a typo must not pass)."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class DeviceType(FrozenModel):
    """One kind of accelerator."""

    memory_gib: PositiveFloat = Field(description="Device memory usable by the engine (weights + KV cache).")
    concurrency: PositiveInt = Field(4, description="Shards (batches) the engine runs at once on this device.")
    host_offload_gib: float = Field(
        256.0, ge=0, description="Host RAM for sleeping models (vLLM sleep level 1 keeps weights there)."
    )
    supports_sleep: bool = Field(True, description="False on CPU engines: residency is load/unload only.")


class ModelProfile(FrozenModel):
    """How one model runs on one device type."""

    load_s: Positive = Field(description="Cold load: weights from storage into device memory plus engine init.")
    wake_s: Positive = Field(description="Wake from sleep level 1 (weights copied back from host RAM).")
    prefill_tok_s: Positive = Field(description="Prefill throughput in prompt tokens per second (compute-bound).")
    decode_step_ms_b1: Positive = Field(description="One decode step at batch 1, milliseconds.")
    decode_step_ms_b32: Positive = Field(description="One decode step at batch 32, milliseconds (memory-bound).")

    def decode_step_ms(self, batch: int) -> float:
        """Decode step time at `batch` running sequences: linear between the two measured points, extrapolated."""
        return self.decode_step_ms_b1 + (self.decode_step_ms_b32 - self.decode_step_ms_b1) * (max(batch, 1) - 1) / 31


class ModelSpec(FrozenModel):
    """A model of the catalog."""

    params_b: PositiveFloat = Field(description="Parameters, billions.")
    weights_gib: PositiveFloat = Field(description="Weights in device memory, GiB.")
    kv_reserve_gib: PositiveFloat = Field(description="Device memory kept for this model's KV cache when ACTIVE.")
    kv_kib_per_token: PositiveFloat = Field(description="KV cache bytes per token, KiB (sets prefix-cache capacity).")
    path: str = Field("", description="vLLM model path or hub id for real engines (`~` and $VARS are expanded).")
    dtype: str = Field("auto", description="vLLM dtype for real engines (float32 or bfloat16 on CPU).")
    max_model_len: NonNegativeInt = Field(
        0, description="Context length the engine is started with, tokens; workflows whose prompts could exceed it "
        "are refused at validation. 0: no limit is checked.")
    profiles: dict[str, ModelProfile] = Field(description="Per device type name: speed figures.")

    @property
    def footprint_gib(self) -> float:
        return self.weights_gib + self.kv_reserve_gib

    def cache_capacity_blocks(self, block_tokens: int) -> int:
        tokens = self.kv_reserve_gib * 1024 * 1024 / self.kv_kib_per_token
        return max(1, int(tokens // block_tokens))


class DeviceGroup(FrozenModel):
    type: str = Field(description="A key of `device_types`.")
    count: PositiveInt = Field(1, description="How many devices of this type the node has.")


class Node(FrozenModel):
    name: str
    devices: list[DeviceGroup] = Field(min_length=1)


class Links(FrozenModel):
    intra_node_gbps: PositiveFloat = Field(900.0, description="Device-to-device inside a node (NVLink), GB/s.")
    inter_node_gbps: PositiveFloat = Field(25.0, description="Between nodes (e.g. 200 Gb/s NIC), GB/s.")


class Device(FrozenModel):
    """One concrete device of the cluster, numbered in node order."""

    device_id: str
    index: int
    node: str
    type: str


class ClusterSpec(FrozenModel):
    name: str
    block_tokens: PositiveInt = Field(16, description="Prefix-cache block size in tokens (vLLM GPU default 16).")
    links: Links = Field(default_factory=Links)
    device_types: dict[str, DeviceType] = Field(min_length=1)
    nodes: list[Node] = Field(min_length=1)
    models: dict[str, ModelSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _check_references(self) -> ClusterSpec:
        for n, node in enumerate(self.nodes):
            for g, group in enumerate(node.devices):
                if group.type not in self.device_types:
                    raise ValueError(
                        f"nodes.{n}.devices.{g}.type: unknown device type {group.type!r}; "
                        f"known: {', '.join(sorted(self.device_types))}"
                    )
        return self

    # NOTE: memoised together with the `nodes` list it was computed from, not as a cached_property: `model_copy`
    # copies cached values, so a copy with other nodes would report the original's devices.
    _devices_memo: tuple[list[Node], tuple[Device, ...]] | None = PrivateAttr(None)

    @property
    def devices(self) -> tuple[Device, ...]:
        """Every device of the cluster, numbered in node order (`<node>/gpu<i>`)."""
        memo = self._devices_memo
        if memo is None or memo[0] is not self.nodes:
            memo = self._devices_memo = (self.nodes, self._enumerate_devices())
        return memo[1]

    def _enumerate_devices(self) -> tuple[Device, ...]:
        out: list[Device] = []
        for node in self.nodes:
            for group in node.devices:
                for _ in range(group.count):
                    i = len(out)
                    out.append(Device(device_id=f"{node.name}/gpu{i}", index=i, node=node.name, type=group.type))
        return tuple(out)

    def fits(self, model: str, device_type: str) -> bool:
        """A model fits a device type when it is profiled there and weights + KV reserve fit in memory."""
        spec = self.models[model]
        return device_type in spec.profiles and spec.footprint_gib <= self.device_types[device_type].memory_gib

    def devices_for(self, model: str) -> tuple[Device, ...]:
        return tuple(d for d in self.devices if self.fits(model, d.type))

    def link_gbps(self, node_a: str, node_b: str) -> float:
        return self.links.intra_node_gbps if node_a == node_b else self.links.inter_node_gbps


def load_cluster(path: str | Path) -> ClusterSpec:
    """Read a cluster file (and the catalog it names); raise InputError naming file and line on any problem."""
    doc = load_located(path)
    if not isinstance(doc.data, dict):
        raise InputError([doc.problem((), "a cluster file must be a mapping with `nodes`, `device_types`, `models`")])
    data = dict(doc.data)
    catalog_name = data.pop("catalog", None)
    if catalog_name is not None:
        catalog_path = Path(path).parent / str(catalog_name)
        catalog = load_located(catalog_path)
        models = catalog.data.get("models") if isinstance(catalog.data, dict) else None
        if not isinstance(models, dict):
            raise InputError([catalog.problem((), "a catalog file must be a mapping with a `models` mapping")])
        try:
            checked = {name: ModelSpec.model_validate(m) for name, m in models.items()}
        except ValidationError as exc:
            raise InputError(catalog.problems_from(exc)) from None
        data["models"] = {**checked, **(data.get("models") or {})}
    try:
        return ClusterSpec.model_validate(data)
    except ValidationError as exc:
        raise InputError(doc.problems_from(exc)) from None


def default_cluster_path() -> Path:
    """`$FATE_RAY_CLUSTER`, else the mixed H100/L4 cluster shipped in the package (or in a source checkout)."""
    env = os.environ.get("FATE_RAY_CLUSTER")
    return Path(env) if env else shipped_cluster_path(DEFAULT_CLUSTER_FILE)


def shipped_cluster_path(file: str) -> Path:
    """A cluster file shipped in the package (or in a source checkout's workflows/clusters)."""
    packaged = Path(__file__).resolve().parent.parent / "_clusters" / file
    if packaged.exists():
        return packaged
    return Path(__file__).resolve().parents[2] / "workflows" / "clusters" / file

"""The simulator's ground truth: one modelled device (engines/modelled_device.py) per device of the cluster."""

from __future__ import annotations

from fate_ray.engines.modelled_device import ModelledDevice, NoiseModel, ShardOutcome
from fate_ray.events import Dispatch, LoadModel, Shard
from fate_ray.schema.cluster import ClusterSpec, Device
from fate_ray.state import Activation


class TruePerformance:
    """The simulator's cluster: one ModelledDevice per device."""

    def __init__(self, cluster: ClusterSpec, noise: NoiseModel):
        self.devices = {d.device_id: ModelledDevice(cluster, d, noise) for d in cluster.devices}

    def device(self, device_id: str) -> Device:
        return self.devices[device_id].state.device

    def start(self, cmd: Dispatch, now_s: float) -> ShardOutcome:
        return self.devices[cmd.device_id].start(cmd, now_s)

    def load(self, cmd: LoadModel, now_s: float) -> Activation:
        return self.devices[cmd.device_id].load(cmd, now_s)

    def finish(self, device_id: str, shard: Shard, outcome: ShardOutcome) -> None:
        self.devices[device_id].finish(shard, outcome)

    def kill(self, device_id: str) -> None:
        self.devices[device_id].kill()

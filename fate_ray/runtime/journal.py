"""The planner's journal: what it needs to come back after a restart with nothing lost or run twice.

The Controller is a pure state machine: its state is a function of the events it handled and of the plans its
policy returned. So the planner actor appends, after each `handle`, the event and the plan of that round (if one ran)
to `<state dir>/journal.bin`, plus its own bookkeeping (which job submitted a workflow, a shard's wall-clock times).
On restart it loads the latest snapshot, replays the journal into the Controller with a `ReplayPolicy` that returns
the recorded plans (no policy is asked again, so the replay reproduces the state exactly, whatever the solver would
say now), then hands the Controller `PlannerRestarted`: the shards that were in flight go back on the frontier and
run again. A result that was recorded before the crash is in the journal, so it is never recorded twice; a result
that was not is never recorded at all (its shard runs again).

Size stays bounded: every `SNAPSHOT_EVERY` records the whole state is pickled to `snapshot.pkl` (written to a temp
file, then renamed) and the journal is truncated. Records are length-prefixed pickles, flushed as written; a torn
last record (a crash mid-write) is ignored on load.
"""

from __future__ import annotations

import os
import pickle
from collections import deque
from collections.abc import Sequence
from pathlib import Path

from fate_ray.policies.base import Plan, ReadyStage
from fate_ray.state import ClusterSnapshot

SNAPSHOT_EVERY = 1000
_LENGTH_BYTES = 4


class Journal:
    @staticmethod
    def exists(state_dir: Path) -> bool:
        """Whether `state_dir` holds a snapshot or a non-empty journal to recover from."""
        state_dir = Path(state_dir)
        log = state_dir / "journal.bin"
        return (state_dir / "snapshot.pkl").exists() or (log.exists() and log.stat().st_size > 0)

    def __init__(self, state_dir: Path):
        self.dir = Path(state_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.dir / "journal.bin"
        self.snapshot_path = self.dir / "snapshot.pkl"
        self.records_since_snapshot = 0
        self._fh = open(self.log_path, "ab")  # noqa: SIM115 -- kept open for the actor's life

    def append(self, record: tuple) -> None:
        data = pickle.dumps(record, protocol=pickle.HIGHEST_PROTOCOL)
        self._fh.write(len(data).to_bytes(_LENGTH_BYTES, "big") + data)
        self._fh.flush()
        self.records_since_snapshot += 1

    def due(self) -> bool:
        return self.records_since_snapshot >= SNAPSHOT_EVERY

    def snapshot(self, state: object) -> None:
        """Replace the snapshot with `state`, then empty the journal (its records are all in the snapshot)."""
        tmp = self.snapshot_path.with_suffix(".tmp")
        with open(tmp, "wb") as fh:
            pickle.dump(state, fh, protocol=pickle.HIGHEST_PROTOCOL)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.snapshot_path)
        self._fh.close()
        self._fh = open(self.log_path, "wb")  # noqa: SIM115
        self.records_since_snapshot = 0

    def load(self) -> tuple[object | None, list[tuple]]:
        """(the snapshot or None, the records written after it)."""
        state = None
        if self.snapshot_path.exists():
            try:
                with open(self.snapshot_path, "rb") as fh:
                    state = pickle.load(fh)
            except Exception as exc:  # noqa: BLE001 -- any unreadable snapshot gets the same one-sentence answer
                raise ValueError(f"{self.snapshot_path}: the planner state there cannot be read "
                                 f"({type(exc).__name__}), most likely written by another fate-ray version: finish "
                                 "its workflows with that version, or start with an empty --state-dir") from None
        records = []
        data = self.log_path.read_bytes() if self.log_path.exists() else b""
        pos = 0
        while pos + _LENGTH_BYTES <= len(data):
            size = int.from_bytes(data[pos:pos + _LENGTH_BYTES], "big")
            end = pos + _LENGTH_BYTES + size
            if end > len(data):
                break  # torn last record
            records.append(pickle.loads(data[pos + _LENGTH_BYTES:end]))
            pos = end
        self.records_since_snapshot = len(records)
        return state, records

    @property
    def empty(self) -> bool:
        return not Journal.exists(self.dir)


class ReplayPolicy:
    """Stands in for the policy while the journal is replayed: each round gets the plan recorded for it."""

    def __init__(self, own_prefetch: bool):
        self.own_prefetch = own_prefetch
        self.name = "replay"
        self.plans: deque[Plan] = deque()

    def plan(self, snapshot: ClusterSnapshot, frontier: Sequence[ReadyStage]) -> Plan:
        return self.plans.popleft()

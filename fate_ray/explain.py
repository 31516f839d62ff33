"""Why a stage went where it did: one decision record per placement, and the table `fate-ray explain` prints.

A decision record (one JSON line of `--explain FILE` / `DIR/decisions.jsonl`) holds the round's time and solver
status, the stage, the devices chosen (with their request counts) and, for a policy that scores candidates (FATE),
each candidate device's terms in seconds, named as FATE.md names them:

    immediate  queue wait + activation (load or wake) + service: the estimated finish of the stage there
    residency  look-ahead: the descendants' loads and wakes (and reloads of what the placement evicts)
    locality   look-ahead: descendants continuing this stage's context find it there (< 0 = a saving)
    prefix     look-ahead: descendants sharing its leading prompt text find it cached there
    occupancy  look-ahead: the descendants' ready, wait and service times
    future     residency + locality + prefix + occupancy, lam-weighted, over the stage's best candidate (>= 0)
    reach      the penalty for occupying a device few devices can replace for the models still pending
    score      immediate + future + reach: what the solver weighs (with the round's makespan and stage finishes)

Baselines score no candidates: their records hold the choice only.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fate_ray.policies.base import Plan, Policy, ReadyStage
from fate_ray.state import ClusterSnapshot

TERMS = ("immediate", "residency", "locality", "prefix", "occupancy", "future", "reach", "score")


def decision_records(policy: Policy, snapshot: ClusterSnapshot, stages: Sequence[ReadyStage], plan: Plan) -> list[dict]:
    """One record per stage of this round given (the Controller's placements, before dispatch)."""
    chosen: dict = {}
    for a in plan.assignments:
        chosen.setdefault(a.stage, {})[a.device_id] = len(a.request_indices)
    out = []
    for s in stages:
        workflow, stage = s.key
        out.append({"t_s": round(snapshot.now_s, 6), "status": plan.solver_status, "workflow": workflow,
                    "stage": stage, "model": s.model, "requests": len(s.request_indices),
                    "chosen": chosen.get(s.key, {}),
                    "candidates": [_rounded(c) for c in policy.candidate_terms(s.key)]})
    return out


def _rounded(candidate: dict) -> dict:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in candidate.items()}


@dataclass
class DecisionLog:
    """A PlanTimer observer: every record into `every` (the simulator), or the records of the workflows asked for
    with `explain` (the Ray planner), kept per workflow until `take`n. Only those stages are recorded."""

    policy: Policy
    every: list[dict] | None = None
    by_workflow: dict[str, list[dict]] = field(default_factory=dict)

    def explain(self, workflow_id: str) -> None:
        self.by_workflow.setdefault(workflow_id, [])

    def __call__(self, snapshot: ClusterSnapshot, frontier: Sequence[ReadyStage], plan: Plan) -> None:
        if self.every is not None:
            self.every += decision_records(self.policy, snapshot, frontier, plan)
            return
        stages = [s for s in frontier if s.key[0] in self.by_workflow]
        for record in decision_records(self.policy, snapshot, stages, plan) if stages else ():
            self.by_workflow[record["workflow"]].append(record)

    def take(self, workflow_id: str) -> list[dict]:
        """Hand over one workflow's records and forget them."""
        return self.by_workflow.pop(workflow_id, [])


def write_decisions(records: Iterable[dict], path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(path, "w") as fh:
        for record in records:
            fh.write(json.dumps(record) + "\n")
            n += 1
    return n


def read_decisions(path: Path) -> list[dict]:
    """The records of a decisions file; a line that is not a record names the file and line."""
    out = []
    with open(path) as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                record["workflow"], record["stage"], record["chosen"]  # noqa: B018 -- the fields explain needs
            except (ValueError, KeyError, TypeError):
                raise ValueError(f"{path}:{line_no}: not a decision record (write one with `fate-ray simulate "
                                 "--explain FILE` or `fate-ray run --explain`)") from None
            out.append(record)
    return out


def primary(record: dict) -> str:
    """The device that got most of the stage's requests (of equals, the best scored)."""
    score = {c["device"]: c["score"] for c in record["candidates"]}
    return min(record["chosen"].items(), key=lambda kv: (-kv[1], score.get(kv[0], 0.0), kv[0]))[0]


def verdict(record: dict) -> str:
    """One sentence: why the chosen device won, and what the runner-up would have cost."""
    cands = record["candidates"]
    chosen = primary(record)
    if not cands:
        return f"placed on {chosen} (the policy scores no candidates)"
    by_device = {c["device"]: c for c in cands}
    winner = by_device.get(chosen)
    others = sorted((c for c in cands if c["device"] != chosen), key=lambda c: c["score"])
    if winner is None or not others:
        return f"placed on {chosen}, its only candidate"
    runner = others[0]
    diffs = {t: runner[t] - winner[t] for t in TERMS if t not in ("future", "score") and t in winner and t in runner}
    decisive = max(diffs, key=lambda t: diffs[t])
    margin = runner["score"] - winner["score"]
    if abs(margin) < 0.005 and max(abs(v) for v in diffs.values()) < 0.005:
        text = f"{chosen} and {runner['device']} tie on every term ({winner['score']:.2f} s): the first was taken"
    else:
        text = (f"{chosen} won (score {winner['score']:.2f} s); runner-up {runner['device']} would have cost "
                f"{runner['score']:.2f} s ({margin:+.2f} s), mostly {decisive} ({diffs[decisive]:+.2f} s)")
    if lookahead_changed(record):
        best_now = min(cands, key=lambda c: c["immediate"])
        text += f"; the look-ahead overrode {best_now['device']}, the earliest finish now"
    elif margin < -0.005:
        text += "; the joint round chose it over a lower score (device finish times, shared loads)"
    return text


def lookahead_changed(record: dict) -> bool:
    """The scores (look-ahead and reach included) put a device the stage went to ahead of the one with the earliest
    immediate finish, and none of the stage's devices is that earliest one (ties count as earliest)."""
    cands = record["candidates"]
    chosen = [c for c in cands if c["device"] in record["chosen"]]
    if not chosen:
        return False
    earliest = min(cands, key=lambda c: (c["immediate"], c["score"]))
    return (min(c["immediate"] for c in chosen) > earliest["immediate"] + 1e-3
            and min(c["score"] for c in chosen) <= earliest["score"] + 1e-3)

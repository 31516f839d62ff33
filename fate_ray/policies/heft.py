"""HEFT, online: stages by decreasing mean-cost upward rank; each request to the device where it finishes first.

Classical HEFT (Topcuoglu, Hariri and Wu, "Performance-effective and low-complexity task scheduling for
heterogeneous computing", IEEE TPDS 13(3), 2002), adapted to a frontier that grows at run time. A task is one
request of a stage; the requests of a stage share its rank. The paper's two phases:

- Task prioritising: rank_u(s) = w_mean(s) + max over children c of rank_u(c), where w_mean(s) is the *mean* cost of
  the stage over the devices that fit its model (the paper averages over processors; on the shipped clusters every
  device type has as many devices as the others, so this is also the mean over device types). A stage's cost is
  the stateless estimate of all its requests as one batch (expected prompt and output lengths, model resident,
  empty cache). Computed once per DAG from the DAG itself (`ReadyStage.dag`; a hand-built stage without one keeps
  the Controller's `rank_s`). The mean communication cost is left out: parent outputs are text, whose transfer
  takes microseconds here and which the engine model does not charge.
- Processor selection: earliest finish time EFT(r, d) = avail(d) + activation of the model on d + the request's
  stateless service on d's type. avail(d) = the device's estimated backlog (running + queued work drained over its
  slots) plus what this round placed there; activation = 0 if the model is ACTIVE on d or an earlier placement of
  this round sent it there, else the wake (SLEEPING) or cold-load (ABSENT) time, from the snapshot's residency and
  `CostEstimator.activation_s`. Ties go to the device listed first.

Insertion-based scheduling is not implemented, because here it would change nothing. HEFT inserts a task into an
idle gap between two tasks already scheduled on a processor, a gap left by a task waiting for its parents. Online,
every stage placed is ready now (its parents are done), devices run their queues without idling while work is
queued, and the queue order is the Controller's setting (shared by every policy), not the policy's: a device's
projected timeline has no idle gap before its backlog ends, so the insertion-based EFT equals the append-based one.
Not seen: prefix caches, evictions caused by this round's placements, output-length uncertainty.
"""

from __future__ import annotations

from fate_ray.cost import RequestShape
from fate_ray.policies.base import Plan, Policy, ReadyStage, RoundLoad, StatelessService, group_assignments
from fate_ray.policies.registry import register
from fate_ray.progress import DagInfo, upward_ranks

MAX_MEMO_DAGS = 256


@register
class Heft(Policy):
    name = "heft"

    def __init__(self, ctx):
        super().__init__(ctx)
        self._ranks: dict[int, tuple[DagInfo, dict[str, float]]] = {}  # id(dag) -> (dag, rank_u per stage)

    def plan(self, snapshot, frontier):
        load = RoundLoad(snapshot)
        service = StatelessService(self.estimator)  # per round: calibration moves between rounds
        choices = []
        for ready in sorted(frontier, key=lambda r: (-self.rank_s(r), r.arrival_s, r.key)):
            devices = self.candidates(snapshot, ready.model)
            for index, req in zip(ready.request_indices, ready.requests):
                best_id, best_finish, best_work = "", float("inf"), 0.0
                for d in devices:
                    dev_id = d.device.device_id
                    work = service.with_activation(ready.model, d.device.type, req, load.state_of(d, ready.model))
                    if load.free_at_s[dev_id] + work < best_finish:
                        best_id, best_finish, best_work = dev_id, load.free_at_s[dev_id] + work, work
                load.add(best_id, best_work, model=ready.model)
                choices.append((ready.key, best_id, index))
        return Plan(group_assignments(choices))

    def rank_s(self, ready: ReadyStage) -> float:
        """rank_u of the stage: from the mean costs of its DAG, or the Controller's rank without a DAG."""
        return ready.rank_s if ready.dag is None else self.mean_ranks(ready.dag)[ready.key[1]]

    def mean_ranks(self, dag: DagInfo) -> dict[str, float]:
        hit = self._ranks.get(id(dag))
        if hit is not None and hit[0] is dag:
            return hit[1]
        if len(self._ranks) >= MAX_MEMO_DAGS:
            self._ranks.clear()
        ranks = upward_ranks(dag.children, lambda sid: self._mean_cost_s(dag, sid))
        self._ranks[id(dag)] = (dag, ranks)
        return ranks

    def _mean_cost_s(self, dag: DagInfo, stage_id: str) -> float:
        """Mean over the devices that fit the model of the stage's stateless batch cost on that device's type."""
        st = dag.stages[stage_id]
        reqs = [RequestShape(t, (), st.expected_output_tokens) for t in dag.prompt_tokens[stage_id]]
        per_type: dict[str, int] = {}
        for d in self.cluster.devices_for(st.model):
            per_type[d.type] = per_type.get(d.type, 0) + 1
        if not per_type:
            return 0.0
        total = sum(n * self.estimator.shard_cost(st.model, t, reqs, None).service_s for t, n in per_type.items())
        return total / sum(per_type.values())

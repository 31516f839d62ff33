"""The state-conditional cost estimator and its online calibration, with exact numbers from the tiny cluster.

Model `a` on a `fast` device (conftest): load 10 s, wake 1 s, prefill 100 tok/s, decode step (9 + batch) ms;
on a `slow` device: prefill 50 tok/s, decode step (14 + batch) ms. Blocks are 4 tokens. The standard request is a
40-token prompt (10 blocks) with 10 output tokens: prefill 0.4 s + decode 10 x 10 ms = 0.5 s on a fast device.
"""

from __future__ import annotations

import math
import random

import pytest

from fate_ray.controller import Controller
from fate_ray.cost import Calibration, CostEstimator, RequestShape, decode_seconds
from fate_ray.events import Dispatch, ShardFinished, WorkflowSubmitted
from fate_ray.policies import PolicyContext, make_policy
from fate_ray.state import DeviceState, block_hashes
from fate_ray.workload import Segment, Stage, TextPart, Workflow

PROMPT = (Segment(1, 24), Segment(3, 16))  # a 24-token system prompt, then 16 tokens of the request's own
HASHES = block_hashes(PROMPT, 4)
REQUEST = RequestShape(40, HASHES, 10)


@pytest.fixture
def estimator(tiny_cluster) -> CostEstimator:
    return CostEstimator(tiny_cluster)


@pytest.fixture
def fast(tiny_cluster) -> DeviceState:
    return DeviceState.empty(tiny_cluster, tiny_cluster.devices[0])


def test_the_standard_request_on_a_resident_model(estimator, fast):
    fast.activate("a", now_s=0.0)
    cost = estimator.shard_cost("a", "fast", [REQUEST], fast)
    assert cost.activation == "resident" and cost.activation_s == 0
    assert cost.prefill_s == pytest.approx(0.4)
    assert cost.decode_s == pytest.approx(0.1)
    assert cost.service_s == pytest.approx(0.5)
    assert (cost.prompt_tokens, cost.cached_tokens) == (40, 0)
    slow = estimator.shard_cost("a", "slow", [REQUEST], None)
    assert (slow.prefill_s, slow.decode_s) == (pytest.approx(0.8), pytest.approx(0.15))


def test_activation_costs_load_when_absent_and_wake_when_sleeping(estimator, fast):
    cold = estimator.shard_cost("a", "fast", [REQUEST], fast)
    assert (cold.activation, cold.activation_s) == ("load", 10)
    assert cold.service_s == pytest.approx(10.5)
    fast.activate("a", now_s=0.0)
    fast.deactivate("a")
    asleep = estimator.shard_cost("a", "fast", [REQUEST], fast)
    assert (asleep.activation, asleep.activation_s) == ("wake", 1)
    assert asleep.service_s == pytest.approx(1.5)


@pytest.mark.parametrize("cached_prompt, cached_tokens, prefill_s", [
    (PROMPT, 40, 0.0),                                  # the whole prompt is cached
    ((Segment(1, 24),), 24, 0.16),                      # its first 6 blocks (the system prompt)
    ((Segment(1, 24), Segment(7, 30)), 24, 0.16),       # a prompt that diverges after them
    ((Segment(2, 40),), 0, 0.4),                        # another prompt
])
def test_cached_prefix_tokens_skip_prefill(estimator, fast, cached_prompt, cached_tokens, prefill_s):
    fast.activate("a", now_s=0.0)
    fast.insert_blocks("a", block_hashes(cached_prompt, 4))
    cost = estimator.shard_cost("a", "fast", [REQUEST], fast)
    assert cost.cached_tokens == cached_tokens
    assert cost.prefill_s == pytest.approx(prefill_s)
    assert cost.decode_s == pytest.approx(0.1)


def test_a_sleeping_models_old_cache_does_not_count(estimator, fast):
    fast.activate("a", now_s=0.0)
    fast.insert_blocks("a", HASHES)
    fast.deactivate("a")
    fast.activate("a", now_s=1.0)
    assert estimator.shard_cost("a", "fast", [REQUEST], fast).cached_tokens == 0


def test_requests_of_one_batch_share_the_blocks_computed_by_earlier_ones(estimator, fast):
    fast.activate("a", now_s=0.0)
    cost = estimator.shard_cost("a", "fast", [REQUEST, REQUEST], fast)
    assert (cost.prompt_tokens, cost.cached_tokens) == (80, 40)
    assert cost.prefill_s == pytest.approx(0.4)


def test_decode_uses_continuous_batching(tiny_cluster, estimator, fast):
    profile = tiny_cluster.models["a"].profiles["fast"]
    # [10, 5]: 5 steps with both requests (batch 2, 11 ms), then 5 with one (batch 1, 10 ms).
    assert decode_seconds(profile, [10, 5]) == pytest.approx(0.105)
    assert decode_seconds(profile, [5, 10]) == pytest.approx(0.105)
    # 3 requests of other shards already decode on the device: batches 5 and 4.
    assert decode_seconds(profile, [10, 5], other_requests=3) == pytest.approx(5 * 0.014 + 5 * 0.013)
    assert decode_seconds(profile, []) == 0
    fast.activate("a", now_s=0.0)
    reqs = [RequestShape(0, (), 10), RequestShape(0, (), 5)]
    assert estimator.shard_cost("a", "fast", reqs, fast).decode_s == pytest.approx(0.105)


@pytest.mark.parametrize("other_shards, prefill_s", [(0, 0.4), (1, 0.8), (3, 1.6)])
def test_shards_already_running_slow_prefill(estimator, fast, other_shards, prefill_s):
    fast.activate("a", now_s=0.0)
    cost = estimator.shard_cost("a", "fast", [REQUEST], fast, other_shards=other_shards)
    assert cost.prefill_s == pytest.approx(prefill_s)


def test_stateless_estimate_assumes_a_resident_model_and_an_empty_cache(estimator, fast):
    fast.activate("a", now_s=0.0)
    fast.insert_blocks("a", HASHES)
    stateless = estimator.shard_cost("a", "fast", [REQUEST], None)
    assert (stateless.activation, stateless.activation_s, stateless.cached_tokens) == ("resident", 0, 0)
    assert stateless.service_s == pytest.approx(0.5)
    assert estimator.best_service_s("a", [REQUEST]) == pytest.approx(0.5)  # the fast type wins


def test_parent_outputs_on_other_nodes_cost_a_transfer(estimator):
    cost = estimator.shard_cost("a", "fast", [REQUEST], None, node="n1",
                                input_bytes_by_node={"n1": 5_000_000_000, "n2": 2_000_000_000})
    assert cost.transfer_s == pytest.approx(0.2)  # 2 GB over the 10 GB/s inter-node link; n1 is local
    assert cost.service_s == pytest.approx(0.7)


# ---------------------------------------------------------------------------------------------------------------
# Calibration


def test_calibration_moves_the_factor_toward_measured_over_estimated_in_bounded_steps():
    cal = Calibration(step=0.1)
    assert cal.factor("a", "fast", "prefill") == 1.0
    cal.observe("a", "fast", "prefill", measured_s=2.0, estimated_s=1.0)
    assert cal.factor("a", "fast", "prefill") == pytest.approx(math.exp(0.1))  # one bounded step toward 2
    cal.observe("a", "fast", "prefill", measured_s=1.0, estimated_s=1.0)
    assert cal.factor("a", "fast", "prefill") == pytest.approx(1.0)  # and one back toward 1
    cal.observe("a", "fast", "prefill", measured_s=0.0, estimated_s=1.0)  # nothing measured: ignored
    assert cal.factor("a", "fast", "prefill") == pytest.approx(1.0)
    # Other phases, device types and models keep their own factor.
    assert cal.factor("a", "fast", "decode") == cal.factor("a", "slow", "prefill") == cal.factor("b", "fast",
                                                                                                 "prefill") == 1.0
    assert Calibration(enabled=False).factor("a", "fast", "prefill") == 1.0


def test_the_estimator_scales_each_phase_by_its_factor(tiny_cluster, fast):
    cal = Calibration()
    for _ in range(40):  # enough bounded steps to converge on the ratios
        cal.observe("a", "fast", "prefill", measured_s=0.8, estimated_s=0.4)
        cal.observe("a", "fast", "activation", measured_s=5.0, estimated_s=10.0)
    cost = CostEstimator(tiny_cluster, cal).shard_cost("a", "fast", [REQUEST], fast)
    assert cost.activation_s == pytest.approx(5.0)
    assert cost.prefill_s == pytest.approx(0.8)
    assert cost.decode_s == pytest.approx(0.1)


def test_calibrating_on_a_biased_phase_reduces_the_error():
    rng = random.Random(3)
    cal = Calibration()
    raw_errors = []
    for _ in range(60):
        estimated = rng.uniform(0.5, 5.0)
        measured = 1.5 * estimated * math.exp(rng.gauss(0, 0.1))  # 50% slower than estimated, with noise
        raw_errors.append(abs(math.log(measured / estimated)))
        cal.observe("a", "fast", "decode", measured, estimated)
    raw_median = sorted(raw_errors)[len(raw_errors) // 2]
    assert raw_median > 0.3
    assert cal.median_abs_log_error() < raw_median / 2
    assert cal.factor("a", "fast", "decode") == pytest.approx(1.5, rel=0.1)


def test_a_disabled_calibration_reports_the_error_of_the_estimates_actually_used():
    cal = Calibration(enabled=False)
    for _ in range(3):
        cal.observe("a", "fast", "decode", measured_s=2.0, estimated_s=1.0)
    assert cal.median_abs_log_error() == pytest.approx(math.log(2.0))


def test_the_controllers_calibration_learns_the_true_decode_bias(tiny_cluster):
    """Every shard really decodes twice as slowly as the formula says: the decode factor approaches 2 (it once
    converged to sqrt(2), because the Controller compared measurements with already-calibrated estimates)."""
    cal = Calibration()
    estimator = CostEstimator(tiny_cluster, cal)
    controller = Controller(tiny_cluster, make_policy("round_robin", PolicyContext(tiny_cluster, estimator)),
                            estimator)
    for k in range(40):
        stage = Stage("s", "a", (), 1, ((TextPart(1000 + k, 40),),), expected_output_tokens=10, max_tokens=20)
        wf = Workflow(f"w{k}", "w", float(k), {"s": stage}, ("s",))
        dispatch = next(c for c in controller.handle(WorkflowSubmitted(wf, float(k))) if isinstance(c, Dispatch))
        device_type = {d.device_id: d.type for d in tiny_cluster.devices}[dispatch.device_id]
        raw_decode_s = 10 * (0.010 if device_type == "fast" else 0.015)
        controller.handle(ShardFinished(dispatch.shard.shard_id, dispatch.device_id, k + 0.5, (10,),
                                        phase_s={"decode": 2 * raw_decode_s}))
    assert cal.factor("a", "fast", "decode") == pytest.approx(2.0, rel=0.05)

"""FATE planner settings: loaded once, validated, never mutated; the ablations are settings too."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class FateConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    horizon_hops: int = Field(2, ge=0, description="Descendants this many hops ahead are scored (0: immediate only).")
    horizon_max_stages: int = Field(8, ge=1, description="At most this many horizon stages per frontier stage.")
    lam: float = Field(1.0, ge=0, description="Weight of the future term: score = immediate + lam * future.")
    top_k: int = Field(4, ge=1, description="Candidate devices kept per stage (bounds the CP-SAT model).")
    max_shards: int = Field(4, ge=1, description="K: a map stage runs on at most this many devices per round.")
    min_shard: int = Field(2, ge=1, description="Fewest requests in a shard (unless the stage has fewer).")
    alpha: float = Field(1.0, ge=0, description="Weight of the round's makespan in the CP-SAT objective.")
    reach_weight: float = Field(1.0, ge=0, description="Scale of the reachability penalty.")
    residency: bool = Field(True, description="Score model residency (loads, wakes, evictions).")
    locality: bool = Field(True, description="Score parent-output locality (children continuing a stage's context).")
    prefix: bool = Field(True, description="Score prefix-cache reuse (own hits, shared leading prompt text).")
    reach: bool = Field(True, description="Penalise taking scarce devices that pending models need.")
    prefetch: bool = Field(True, description="Run with the Controller's generic prefetch (fate_ray/prefetch.py); "
                           "False opts out of it (the fate-no-prefetch ablation), FATE having none of its own.")
    solver: Literal["cpsat", "greedy"] = Field("cpsat", description="Assignment: CP-SAT, or greedy on the scores.")
    cpsat_rounds: Literal["every", "contended"] = Field(
        "every", description="Which rounds CP-SAT solves: every one with a choice, or only contended ones (a stage "
        "split, two stages on one device, or a stage the greedy assignment moved off its best-scored device); the "
        "others keep the greedy assignment (UNCONTENDED).")
    time_limit_ms: float = Field(500.0, gt=0, description="CP-SAT wall-clock limit per round: a stall guard. The "
                                 "deterministic limit is what ends a round (planner-scale's 256-stage rounds "
                                 "reached it within 139 ms on 2 cores), so plans do not depend on the machine's "
                                 "speed unless it is over 3x slower.")
    deterministic_limit: float = Field(0.005, gt=0, description="CP-SAT deterministic-time limit per round, so that "
                                       "simulations are reproducible (wall time would depend on the machine).")
    num_workers: int = Field(1, ge=1, description="CP-SAT search workers.")
    max_cpsat_stages: int = Field(16, ge=1, description="Larger frontiers: CP-SAT on the highest-ranked stages, "
                                  "greedy for the rest (graceful degradation instead of a stall).")

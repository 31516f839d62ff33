"""The Grafana dashboard, checked offline against the metrics the planner exports (its queries run against a live
Prometheus in tests/test_metrics.py)."""

from __future__ import annotations

import copy

import dashboard


def test_the_dashboard_shows_every_exported_metric_and_only_those():
    assert dashboard.problems(dashboard.load(), dashboard.exported_metrics()) == []


def test_a_panel_naming_a_metric_fate_ray_does_not_export_is_caught():
    broken = copy.deepcopy(dashboard.load())
    panel = next(p for p in broken["panels"] if p["title"] == "Frontier size")
    panel["targets"][0]["expr"] = panel["targets"][0]["expr"].replace("ray_fate_frontier_size", "ray_fate_frontier")
    assert dashboard.problems(broken, dashboard.exported_metrics()) == [
        "Frontier size / A: ray_fate_frontier is not a metric fate-ray exports",
        "no panel shows ray_fate_frontier_size",
    ]


def test_a_panel_that_ignores_the_planner_filter_is_caught():
    broken = copy.deepcopy(dashboard.load())
    panel = next(p for p in broken["panels"] if p["title"] == "Shards by outcome")
    panel["targets"][0]["expr"] = panel["targets"][0]["expr"].replace('{planner=~"$planner"}', "")
    assert dashboard.problems(broken, dashboard.exported_metrics()) == [
        "Shards by outcome / A: a series is not filtered by the planner variable"]

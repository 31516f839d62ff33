"""Reading deploy/grafana/fate-ray.json the way Grafana would: its panels' PromQL, the `ray_fate_*` metrics they
name, and each query with the dashboard's variables filled in, ready for Prometheus's HTTP API."""

from __future__ import annotations

import json
import re
from pathlib import Path

from fate_ray.metrics import PlannerMetrics

DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "fate-ray.json"
_RAY_SERIES = re.compile(r"\bray_(fate_[a-z0-9_]+)")
_HISTOGRAM_SERIES = ("_bucket", "_count", "_sum")


def load() -> dict:
    return json.loads(DASHBOARD.read_text())


def queries(dashboard: dict) -> dict[str, str]:
    """`panel title / refId` -> PromQL, for every query panel."""
    return {f"{panel['title']} / {target['refId']}": target["expr"]
            for panel in dashboard["panels"] if panel["type"] != "row" for target in panel["targets"]}


def exported_metrics() -> set[str]:
    """The `fate_*` metric names the planner records (Ray prefixes them with `ray_`)."""
    return {metric.info["name"] for metric in vars(PlannerMetrics("dashboard-check")).values()}


def metric_of(series: str) -> str:
    """`fate_stage_latency_s_bucket` -> `fate_stage_latency_s`: a histogram's series belong to its metric."""
    for suffix in _HISTOGRAM_SERIES:
        if series.endswith(suffix):
            return series[: -len(suffix)]
    return series


def problems(dashboard: dict, exported: set[str]) -> list[str]:
    """What is wrong with the dashboard, one line each: a query naming a metric the project does not export, a
    query naming none, an exported metric no panel shows, a panel not filtered by the `planner` variable."""
    out, shown = [], set()
    for where, expr in queries(dashboard).items():
        names = {metric_of(series) for series in _RAY_SERIES.findall(expr)}
        if not names:
            out.append(f"{where}: names no ray_fate_* metric")
        for name in sorted(names - exported):
            out.append(f"{where}: ray_{name} is not a metric fate-ray exports")
        if expr.count('planner=~"$planner"') < expr.count("ray_fate_"):
            out.append(f"{where}: a series is not filtered by the planner variable")
        shown |= names
    out += [f"no panel shows ray_{name}" for name in sorted(exported - shown)]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    if variables.get("datasource", {}).get("type") != "datasource":
        out.append("no `datasource` variable")
    if "planner" not in variables:
        out.append("no `planner` variable")
    return out


def for_prometheus(expr: str, planner: str, window: str = "5m") -> str:
    """The query Grafana would send with `$planner` set to one planner and a rate window of `window`."""
    return expr.replace("$planner", planner).replace("$__rate_interval", window)

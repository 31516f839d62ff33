"""Metrics end to end: the planner actor records `fate_*` metrics, Ray exports them, and a real Prometheus
(Debian's `prometheus`, started here on loopback with Ray's file-SD list) scrapes them; we read them back through
Prometheus's HTTP API, and run every query of the Grafana dashboard (deploy/grafana/fate-ray.json) against them."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import dashboard
import pytest

from fate_ray.runtime.driver import RunConfig, run_workflows
from fate_ray.runtime.service import ServiceConfig, start_actors
from fate_ray.schema.cluster import load_cluster
from fate_ray.schema.workflow import load_workflow

ROOT = Path(__file__).resolve().parents[1]
PROM_PORT = 9491

pytestmark = pytest.mark.skipif(shutil.which("prometheus") is None,
                                reason="Prometheus is not installed (.ci/run installs Debian's `prometheus`)")


@pytest.fixture(scope="module")
def head(ray_head):
    return ray_head


@pytest.fixture(scope="module")
def prometheus(head, tmp_path_factory):
    work = tmp_path_factory.mktemp("prom")
    sd = head.temp_dir / "prom_metrics_service_discovery.json"
    (work / "prometheus.yml").write_text(
        "global: {scrape_interval: 2s}\n"
        f"scrape_configs:\n  - job_name: ray\n    file_sd_configs: [{{files: ['{sd}'], refresh_interval: 2s}}]\n")
    proc = subprocess.Popen(["prometheus", f"--config.file={work / 'prometheus.yml'}",
                             f"--web.listen-address=127.0.0.1:{PROM_PORT}", f"--storage.tsdb.path={work / 'data'}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    yield f"http://127.0.0.1:{PROM_PORT}"
    proc.terminate()
    proc.wait(timeout=30)


def query(prom: str, expr: str) -> list:
    url = f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return json.loads(resp.read())["data"]["result"]
    except OSError:
        return []


def evaluate(prom: str, expr: str) -> tuple[str | None, list]:
    """(error, result): Prometheus's own error for a query it rejects (HTTP 400), else its result."""
    url = f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return None, json.loads(resp.read())["data"]["result"]
    except urllib.error.HTTPError as e:
        return json.loads(e.read()).get("error", str(e)), []


def test_prometheus_scrapes_the_planner_metrics(ray_client, prometheus, tmp_path):
    """A run on the session head, then its `ray_fate_*` series read back from Prometheus."""
    cluster = load_cluster(ROOT / "workflows" / "clusters" / "local.yaml")
    planner, _ = start_actors(cluster, ServiceConfig(time_scale=0.01), name_suffix="-metrics")
    wfs = [load_workflow(ROOT / "workflows" / f"{n}.yaml", cluster)[1] for n in ("rag_rerank", "self_consistency")]
    summary = run_workflows(wfs, RunConfig(out_dir=tmp_path), planner)
    assert summary["failed"] == []
    shards = summary["stats"]["shards_dispatched"]
    mine = '{planner="fate-planner-metrics"}'  # the session's head also holds other tests' planners
    wanted = {
        "ray_fate_shards_total" + mine: lambda r: sum(float(x["value"][1]) for x in r) >= shards,
        "ray_fate_plan_latency_ms_count" + mine: lambda r: sum(float(x["value"][1]) for x in r) >= 1,
        "ray_fate_workflow_latency_s_count" + mine: lambda r: sum(float(x["value"][1]) for x in r) >= 2,
        "ray_fate_prefix_query_tokens_total" + mine: lambda r: sum(float(x["value"][1]) for x in r) > 0,
        "ray_fate_model_events_total" + mine: lambda r: any(x["metric"].get("kind") == "load" for x in r),
        "ray_fate_device_busy_ratio" + mine: lambda r: len(r) >= 2,
    }
    deadline = time.monotonic() + 90
    missing = dict(wanted)
    while missing and time.monotonic() < deadline:
        for name, ok in list(missing.items()):
            if ok(query(prometheus, name)):
                del missing[name]
        time.sleep(2)
    assert not missing, f"not scraped (or wrong values) after 90 s: {sorted(missing)}"
    # And the values are this run's: exactly its shards, all finished.
    done = query(prometheus, 'ray_fate_shards_total{planner="fate-planner-metrics",outcome="done"}')
    assert sum(float(x["value"][1]) for x in done) == shards
    # Every panel of the Grafana dashboard shows the next run: each query is accepted and returns a number. (The
    # first run's series were born with their final values, so a rate over them is 0 and a quantile NaN.)
    again = run_workflows(wfs, RunConfig(out_dir=tmp_path / "again"), planner)
    assert again["failed"] == []
    panels = {where: dashboard.for_prometheus(expr, "fate-planner-metrics")
              for where, expr in dashboard.queries(dashboard.load()).items()}
    failing: dict[str, str] = {}
    deadline = time.monotonic() + 60
    while panels and time.monotonic() < deadline:
        for where, expr in list(panels.items()):
            error, result = evaluate(prometheus, expr)
            if error is not None:
                failing[where] = f"rejected: {error}"
                del panels[where]
            elif any(math.isfinite(float(x["value"][1])) for x in result):
                del panels[where]
            else:
                failing[where] = f"no value: {result}"
        time.sleep(2)
    failing = {where: why for where, why in failing.items() if where in panels or why.startswith("rejected")}
    assert not failing, "dashboard queries failing on the live series:\n" + "\n".join(
        f"{where}: {why}" for where, why in sorted(failing.items()))

"""`fate-ray demo` (`make demo`): the README's service steps on a local head, narrated.

A local Ray head on loopback; `fate-ray up` starts the planner service; two `ray job submit`s run at once on it; the
first job is then submitted again and finds its models resident (no model load while it runs); `fate-ray status`;
`fate-ray down`; the head is stopped.

With `--engine vllm` (the default of `make demo`) the workers run real vLLM engines on the tiny local models
(workflows/clusters/local-cpu.yaml), on workflows small enough for a CPU; with `--engine sim` the simulated
engines run the larger examples on the default cluster.
"""

from __future__ import annotations

import json
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rich.console import Console

from fate_ray.runtime.job import actor_names, fate_ray, submit_run
from fate_ray.runtime.local_head import start_local_head
from fate_ray.schema.cluster import ClusterSpec

JOBS_BY_ENGINE = {
    "sim": {"job-a": ("rag_rerank", "mapreduce_summary"), "job-b": ("multiturn_chain",)},
    # Four tiny models in all, so that every model stays resident on the two CPU slots between jobs.
    "vllm": {"job-a": ("support_answers",), "job-b": ("router_specialists",)},
}
REPEAT = "job-a"  # submitted again once both are done, as "job-a-again"


def run_demo(cluster: ClusterSpec, cluster_path: Path, root: Path, out: Path, policy: str, console: Console,
             engine: str = "sim") -> int:
    jobs = JOBS_BY_ENGINE[engine]
    what = "real vLLM engines on CPU, tiny local models" if engine == "vllm" else "simulated engines"
    console.print(f"[bold]fate-ray demo[/]: a local Ray head (loopback, {len(cluster.devices)} fake GPUs for cluster "
                  f"{cluster.name!r}), the planner service with {what}, three jobs")
    head = start_local_head(num_gpus=len(cluster.devices))
    try:
        console.print(f"dashboard {head.dashboard_url}   metrics {head.metrics_url}   temp dir {head.temp_dir}")
        up = fate_ray(head, "up", "--cluster", str(cluster_path), "--policy", policy, "--engine", engine)
        console.print("$ fate-ray up\n  " + up.stdout.strip())
        if up.returncode != 0:
            console.print(f"[red]fate-ray up failed[/]: {up.stderr[-2000:]}")
            return 1

        def submit(job: str, names: tuple[str, ...]) -> subprocess.CompletedProcess:
            return submit_run(head, root, [*(f"workflows/{n}.yaml" for n in names), "--out", str(out / job)])

        console.print(f"two jobs at once: job-a ({', '.join(jobs['job-a'])}) and job-b ({', '.join(jobs['job-b'])})")
        with ThreadPoolExecutor(2) as pool:
            procs = dict(zip(jobs, pool.map(submit, jobs, jobs.values())))
        console.print(f"then {REPEAT} again ({', '.join(jobs[REPEAT])})")
        procs[f"{REPEAT}-again"] = submit(f"{REPEAT}-again", jobs[REPEAT])
        for job, proc in procs.items():
            if proc.returncode != 0:
                console.print(f"[red]{job} failed[/] (exit {proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
                return 1
            _show_job(console, job, json.loads((out / job / "summary.json").read_text()))
        first = json.loads((out / REPEAT / "summary.json").read_text())["model_events_during_run"]["load"]
        again = json.loads((out / f"{REPEAT}-again" / "summary.json").read_text())["model_events_during_run"]["load"]
        verdict = "found its models resident" if again == 0 else "had to load models again"
        console.print(f"[bold]job-a again {verdict}[/]: {again} model load(s) on the service while it ran, against "
                      f"{first} while job-a and job-b first ran")
        console.print("$ fate-ray status\n" + fate_ray(head, "status").stdout.rstrip())
        named = sorted(n for n in actor_names(head) if n.startswith("fate-"))
        console.print(f"{head.dashboard_url} (Actors) lists {', '.join(named)}: alive across all three jobs")
        console.print("$ fate-ray down\n  " + fate_ray(head, "down").stdout.strip())
        console.print(f"outputs: {out}/<job>/<workflow>.jsonl, summary.json, gantt.png")
    finally:
        head.stop()
        console.print("local Ray head stopped")
    return 0


def _show_job(console: Console, job: str, summary: dict) -> None:
    for wf in summary["workflows"]:
        console.print(f"  {job}> {wf['workflow']}: {wf['state']} in {wf.get('latency_s', 0):.1f} s wall, "
                      f"{wf['stages']} stages, {wf['model_loads']} load(s) before its own stages")
    prefix = summary.get("prefix")
    if prefix:  # real engines: vLLM's own prefix-cache hits, and how close the planner's predictions were
        console.print(f"  {job}> prefix cache: {prefix['cached_tokens']:,} of {prefix['prompt_tokens']:,} prompt "
                      f"tokens hit ({prefix['hit_rate']:.0%}); planner predicted {prefix['predicted_cached_tokens']:,}, "
                      f"median |drift| {prefix['drift_tokens_median']} tokens per request")

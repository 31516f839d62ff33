"""Mistakes a new user makes on a Ray cluster get one sentence and exit 2, never a hang or a traceback: an
unreachable RAY_ADDRESS, an address where something other than a Ray head answers, a cluster YAML with more devices
than Ray has GPUs, a local head that cannot start (port taken, Ray not installed)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from fate_ray.runtime.job import fate_ray

ROOT = Path(__file__).resolve().parents[1]
FATE_RAY = str(Path(sys.executable).with_name("fate-ray"))
# Subprocess timeouts here are hang guards: each path is designed to answer in a few seconds (15 s at most).
HANG_GUARD_S = 30


def run_cli(*args: str, env: dict | None = None, timeout_s: float = HANG_GUARD_S) -> subprocess.CompletedProcess:
    return subprocess.run([FATE_RAY, *args], capture_output=True, text=True, env=env, timeout=timeout_s, cwd=ROOT)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def assert_one_sentence(proc: subprocess.CompletedProcess, expected_start: str) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(expected_start), proc.stderr
    return last


def test_an_unreachable_ray_address_is_named_in_one_sentence():
    port = free_port()
    proc = run_cli("run", "workflows/rag_rerank.yaml", env={**os.environ, "RAY_ADDRESS": f"127.0.0.1:{port}"},
                   timeout_s=15)
    line = assert_one_sentence(proc, f"error: cannot reach the Ray cluster at RAY_ADDRESS=127.0.0.1:{port} "
                                     "(connection refused): check that a Ray head is running there")
    assert proc.stderr.strip() == line  # nothing else: no Ray warnings


def test_an_address_where_something_else_answers_fails_within_seconds():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]

    def accept_and_close():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            conn.close()

    threading.Thread(target=accept_and_close, daemon=True).start()
    try:
        proc = run_cli("status", env={**os.environ, "RAY_ADDRESS": f"127.0.0.1:{port}"})
    finally:
        server.close()
    line = assert_one_sentence(proc, f"error: RAY_ADDRESS=127.0.0.1:{port} answers but is not a Ray head")
    assert proc.stderr.strip() == line


def test_a_cluster_with_more_devices_than_ray_has_gpus_is_refused_naming_both_counts(ray_head, tmp_path):
    data = yaml.safe_load((ROOT / "workflows" / "clusters" / "local.yaml").read_text())
    data["name"] = "too-big"
    data["nodes"][0]["devices"][0]["count"] = 16
    big = tmp_path / "too-big.yaml"
    big.write_text(yaml.safe_dump(data))
    proc = fate_ray(ray_head, "up", "--cluster", str(big), timeout_s=HANG_GUARD_S)
    assert_one_sentence(proc, "error: cluster 'too-big' has 16 devices but Ray offers 8 GPU(s): start Ray with at "
                              "least that many GPUs (--num-gpus) or pass a smaller --cluster")


def test_a_demo_whose_head_port_is_taken_says_which_port(tmp_path):
    taken = socket.socket()
    taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        taken.bind(("127.0.0.1", 8265))
        taken.listen()
    except OSError:
        pass  # already in use by something else: the demo must say so all the same
    try:
        proc = run_cli("demo", "--out", str(tmp_path))
    finally:
        taken.close()
    line = assert_one_sentence(proc, "error: cannot start a local Ray head: 127.0.0.1:")
    assert "is in use" in line


def test_a_demo_without_ray_installed_says_how_to_install_it(tmp_path):
    """An interpreter with the project importable but no `ray` executable beside it."""
    bare = tmp_path / "bin"
    bare.mkdir()
    (bare / "python").symlink_to(Path(sys.executable).resolve())
    site = next(p for p in sys.path if p.endswith("site-packages"))
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{site}"}
    proc = subprocess.run([str(bare / "python"), "-c", "import sys; from fate_ray.cli import main; "
                           "sys.exit(main(['demo', '--out', sys.argv[1]]))", str(tmp_path / "out")],
                          capture_output=True, text=True, env=env, timeout=HANG_GUARD_S)
    line = assert_one_sentence(proc, f"error: Ray is not installed in this environment (no {bare / 'ray'})")
    assert "pip install 'ray[default]'" in line


@pytest.mark.parametrize("command", ["up", "down", "status"])
def test_service_commands_without_a_cluster_say_what_to_set(command):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = run_cli(command, env=env)
    assert_one_sentence(proc, f"error: fate-ray {command} works on a running Ray cluster: set RAY_ADDRESS to its "
                              "address (e.g. 127.0.0.1:6390 for the README's head)")


def test_stop_head_spares_other_heads_and_its_caller(tmp_path):
    """Decoys: a process naming a sibling folder (`DIR-x`), one naming the folder deeper inside another path, and
    the shell that runs the command (its command line names DIR): none is signalled."""
    from fate_ray.runtime.local_head import stop_head

    target = tmp_path / "fray"
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    decoys = [subprocess.Popen([*sleeper, f"--temp-dir={target}-x"]),
              subprocess.Popen([*sleeper, f"--logs-dir=/elsewhere{target}/logs"])]
    victim = subprocess.Popen([*sleeper, f"--temp-dir={target}"])
    try:
        shell = subprocess.run(["bash", "-c", f"{sys.executable} -c 'from fate_ray.runtime.local_head import "
                                f"stop_head; print(stop_head(__import__(\"pathlib\").Path(\"{target}\")))'; echo alive"],
                               capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert shell.stdout.split() == ["1", "alive"], shell.stdout + shell.stderr
        assert victim.wait(timeout=15) != 0
        assert all(d.poll() is None for d in decoys)
        assert stop_head(target) == 0
    finally:
        for p in [*decoys, victim]:
            p.kill()


def test_a_model_whose_files_are_missing_fails_the_run_naming_model_and_path(tmp_path):
    cluster = yaml.safe_load((ROOT / "workflows" / "clusters" / "local-cpu.yaml").read_text())
    cluster["models"]["qwen2.5-1.5b"]["path"] = str(tmp_path / "no-such-model")
    (tmp_path / "cluster.yaml").write_text(yaml.safe_dump(cluster))
    proc = run_cli("run", "workflows/support_answers.yaml", "--cluster", str(tmp_path / "cluster.yaml"),
                   "--engine", "vllm", "--out", str(tmp_path / "out"))
    last = assert_one_sentence(proc, "error: model 'qwen2.5-1.5b': no model files at ")
    assert str(tmp_path / "no-such-model") in last and "make tiny-models" in last


def test_a_prompt_longer_than_the_models_context_is_refused_at_validation_naming_the_stage(tmp_path):
    cluster = yaml.safe_load((ROOT / "workflows" / "clusters" / "local-cpu.yaml").read_text())
    cluster["models"]["qwen2.5-1.5b"]["max_model_len"] = 256
    (tmp_path / "cluster.yaml").write_text(yaml.safe_dump(cluster))
    proc = run_cli("validate", "workflows/support_answers.yaml", "--cluster", str(tmp_path / "cluster.yaml"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert any("stage 'answer': its longest prompt (" in line and "over model 'qwen2.5-1.5b''s max_model_len 256"
               in line for line in lines), proc.stderr
    assert all(line.startswith("error: workflows/support_answers.yaml:") for line in lines), proc.stderr


def test_validate_with_the_vllm_engine_counts_tokens_as_the_run_will(tmp_path):
    """The tiny tokenizer makes the prompt ~2.5x longer than characters / 4 guess: `validate --engine vllm`
    refuses what only the real count exceeds, as `fate-ray run --engine vllm` would."""
    from fate_ray.engines.tiny_models import build_all

    build_all()
    cluster = yaml.safe_load((ROOT / "workflows" / "clusters" / "local-cpu.yaml").read_text())
    cluster["models"]["qwen2.5-1.5b"]["max_model_len"] = 800
    (tmp_path / "cluster.yaml").write_text(yaml.safe_dump(cluster))
    args = ("validate", "workflows/support_answers.yaml", "--cluster", str(tmp_path / "cluster.yaml"))
    assert run_cli(*args).returncode == 0
    proc = run_cli(*args, "--engine", "vllm")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "stage 'answer': its longest prompt (979 tokens" in proc.stderr, proc.stderr

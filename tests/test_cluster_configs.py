"""Cluster files: the `ray up` configs pass Ray's own validator (the JSON schema ray-schema.json, through
the same prepare_config + validate_config steps `ray up` runs before contacting the cloud), and the KubeRay
RayJob manifest has the CRD's essential structure.

No KubeRay CRD schema ships in any installed Python package, so the RayJob checks are written out
explicitly below from the ray.io/v1 CRD (ray-operator/config/crd/bases/ray.io_rayjobs.yaml): required keys,
their types, the enums we use, and rayStartParams as a map of strings.
"""

from __future__ import annotations

import copy
import re

import pytest
import yaml

from orchestrator import submit
from orchestrator.cluster import __path__ as _cluster_path  # namespace package: orchestrator/cluster/
from orchestrator.local_ray import IDLE_WORKER_KEEP_ENV, IDLE_WORKER_KEEP_MS

CLUSTER_DIR = _cluster_path[0]
RAY_VERSION = "2.60.0"


def load(name: str) -> dict:
    with open(f"{CLUSTER_DIR}/{name}") as f:
        return yaml.safe_load(f)


# ================================================================================================ ray up
@pytest.mark.parametrize("name, provider", [("aws.yaml", "aws"), ("gcp.yaml", "gcp")])
def test_ray_up_config_passes_rays_validator(name, provider):
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = load(name)
    assert raw["provider"]["type"] == provider
    prepared = prepare_config(copy.deepcopy(raw))
    validate_config(prepared)  # jsonschema against ray/autoscaler/ray-schema.json + Ray's cross checks


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_ray_up_config_shape(name):
    cfg = load(name)
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert "GPU" not in head["resources"], "the head is a CPU node"
    gpu_types = [
        t for k, t in types.items() if k != cfg["head_node_type"] and t["resources"].get("GPU", 0) >= 1
    ]
    assert gpu_types, "an autoscaled GPU worker type"
    for t in gpu_types:
        assert t["min_workers"] == 0 and t["max_workers"] >= 1
    assert 1 <= cfg["idle_timeout_minutes"] <= 60
    docker = cfg["docker"]
    for image in (docker["image"], docker["head_image"]):
        assert re.fullmatch(rf"rayproject/ray:{re.escape(RAY_VERSION)}-py311-(gpu|cpu|cu\d+)", image), image
    assert docker["image"].endswith("-gpu")
    assert any(o.startswith("--shm-size") for o in docker["run_options"])
    text = open(f"{CLUSTER_DIR}/{name}").read()
    # spot / preemptible offered as a commented alternative
    assert ("MarketType: spot" in text) or ("preemptible: true" in text)
    assert any("pip install" in c and "/home/ray/bamray" in c for c in cfg["setup_commands"])
    assert cfg["file_mounts"]["/home/ray/bamray"] == "."
    assert {".venv", ".bamray", ".git"} <= set(cfg["rsync_exclude"])
    head_cmds = " ".join(cfg["head_start_ray_commands"])
    assert "mlflow server" in head_cmds and "0.0.0.0" not in head_cmds
    assert "--dashboard-host=127.0.0.1" in head_cmds
    bucket = "s3://" if name == "aws.yaml" else "gs://"
    assert f"--artifacts-destination {bucket}" in head_cmds
    assert "MLFLOW_TRACKING_URI" in " ".join(cfg["worker_start_ray_commands"])


def test_validator_rejects_a_broken_config():
    """The validator is not a no-op: an unknown node-type key and a wrong type are refused."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    bad = load("aws.yaml")
    bad["available_node_types"]["ray.worker.gpu"]["min_workers"] = "zero"
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(bad))
    bad = load("aws.yaml")
    bad["available_node_types"]["ray.worker.gpu"]["gpus"] = 1
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(bad))


# ================================================================================================ KubeRay
DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def check_pod_template(template: dict, where: str) -> list[dict]:
    assert isinstance(template, dict) and isinstance(template.get("spec"), dict), f"{where}.template.spec"
    containers = template["spec"].get("containers")
    assert isinstance(containers, list) and containers, f"{where}: template.spec.containers is required"
    for c in containers:
        assert isinstance(c.get("name"), str) and DNS1123.match(c["name"]), f"{where}: container name"
        assert isinstance(c.get("image"), str), f"{where}: container image"
    return containers


def check_rayjob(doc: dict) -> None:
    """The ray.io/v1 RayJob essentials (spec.entrypoint is the CRD's one required spec key)."""
    assert doc.get("apiVersion") == "ray.io/v1" and doc.get("kind") == "RayJob"
    assert DNS1123.match(doc["metadata"]["name"]) and len(doc["metadata"]["name"]) <= 63
    spec = doc["spec"]
    assert isinstance(spec.get("entrypoint"), str) and spec["entrypoint"].strip()
    for key, tp in (
        ("runtimeEnvYAML", str),
        ("shutdownAfterJobFinishes", bool),
        ("ttlSecondsAfterFinished", int),
        ("activeDeadlineSeconds", int),
        ("submissionMode", str),
        ("rayClusterSpec", dict),
    ):
        if key in spec:
            value = spec[key]
            assert isinstance(value, tp) and (tp is bool or not isinstance(value, bool)), (
                f"spec.{key}: {tp.__name__}"
            )
    assert spec.get("submissionMode", "K8sJobMode") in (
        "K8sJobMode",
        "HTTPMode",
        "InteractiveMode",
        "SidecarMode",
    )
    if "runtimeEnvYAML" in spec:
        assert isinstance(yaml.safe_load(spec["runtimeEnvYAML"]), dict), (
            "runtimeEnvYAML must be a YAML mapping"
        )
    rc = spec["rayClusterSpec"]
    assert isinstance(rc.get("enableInTreeAutoscaling", False), bool)
    if "autoscalerOptions" in rc:
        assert rc["autoscalerOptions"].get("upscalingMode", "Default") in (
            "Default",
            "Aggressive",
            "Conservative",
        )
        assert isinstance(rc["autoscalerOptions"].get("idleTimeoutSeconds", 0), int)
    head = rc["headGroupSpec"]
    assert isinstance(head.get("rayStartParams", {}), dict)
    assert all(isinstance(v, str) for v in head.get("rayStartParams", {}).values()), (
        "rayStartParams: map[string]string"
    )
    check_pod_template(head["template"], "headGroupSpec")
    groups = rc.get("workerGroupSpecs", [])
    assert isinstance(groups, list)
    for g in groups:
        where = f"workerGroupSpecs[{g.get('groupName')}]"
        assert isinstance(g.get("groupName"), str) and DNS1123.match(g["groupName"]), where
        for k in ("minReplicas", "maxReplicas"):
            assert isinstance(g.get(k), int) and not isinstance(g[k], bool) and g[k] >= 0, f"{where}.{k}"
        assert g["minReplicas"] <= g["maxReplicas"], where
        if "replicas" in g:
            assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], where
        assert all(isinstance(v, str) for v in g.get("rayStartParams", {}).values()), (
            f"{where}.rayStartParams"
        )
        check_pod_template(g["template"], where)


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_every_node_keeps_idle_worker_processes(name):
    """Head and workers start their raylet with Ray's idle-worker threshold raised (see
    ``IDLE_WORKER_KEEP_MS``): set on one side only, a node whose CPUs are all held restarts a process per
    Ray Data task."""
    cfg = load(name)
    setting = f"export {IDLE_WORKER_KEEP_ENV}={IDLE_WORKER_KEEP_MS};"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        (start,) = [c for c in cfg[key] if "ray start" in c]
        assert setting in start and start.index(setting) < start.index("ray start"), (key, start)


def test_rayjob_pods_keep_idle_worker_processes():
    rc = load("rayjob.yaml")["spec"]["rayClusterSpec"]
    pods = [rc["headGroupSpec"], *rc["workerGroupSpecs"]]
    for pod in pods:
        for c in pod["template"]["spec"]["containers"]:
            assert {"name": IDLE_WORKER_KEEP_ENV, "value": str(IDLE_WORKER_KEEP_MS)} in c["env"], c["name"]


def test_rayjob_manifest_matches_the_crd_essentials():
    doc = load("rayjob.yaml")
    check_rayjob(doc)
    spec = doc["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["entrypoint"].startswith("python -m orchestrator sweep ")
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert (
        env["working_dir"] and isinstance(env["pip"], list) and any(p.startswith("torch") for p in env["pip"])
    )
    rc = spec["rayClusterSpec"]
    assert rc["enableInTreeAutoscaling"] is True and rc["rayVersion"] == RAY_VERSION
    gpu = [
        g
        for g in rc["workerGroupSpecs"]
        if any(
            "nvidia.com/gpu" in c.get("resources", {}).get("limits", {})
            for c in g["template"]["spec"]["containers"]
        )
    ]
    assert gpu and all(g["minReplicas"] == 0 for g in gpu)
    for c in [
        *rc["headGroupSpec"]["template"]["spec"]["containers"],
        *[c for g in rc["workerGroupSpecs"] for c in g["template"]["spec"]["containers"]],
    ]:
        assert c["image"].startswith(f"rayproject/ray:{RAY_VERSION}-py311-")


@pytest.mark.parametrize(
    "breakage",
    [
        lambda d: d["spec"].pop("entrypoint"),
        lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].update(minReplicas="0"),
        lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].update(minReplicas=9),
        lambda d: d["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"].update({"num-cpus": 8}),
        lambda d: d["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"].update(containers=[]),
        lambda d: d["spec"].update(runtimeEnvYAML="- not a mapping"),
        lambda d: d["spec"].update(submissionMode="Batch"),
        lambda d: d.update(apiVersion="ray.io/v1alpha0"),
        lambda d: d["spec"].update(shutdownAfterJobFinishes="true"),
    ],
)
def test_structural_checks_catch_broken_manifests(breakage):
    doc = load("rayjob.yaml")
    breakage(doc)
    with pytest.raises((AssertionError, KeyError)):
        check_rayjob(doc)


# ================================================================================================ submit helpers
def test_submit_entrypoint_and_runtime_env():
    env = submit.build_runtime_env()
    assert env["working_dir"] == str(submit.submit_working_dir())
    assert {".venv", ".bamray", ".git"} <= set(env["excludes"])
    assert "pip" not in env
    assert submit.entrypoint(["sweep", "--config", "bam_fmnist", "--set", "optim.lr=1e-3"]) == (
        "python -m orchestrator sweep --config bam_fmnist --set optim.lr=1e-3"
    )
    assert submit.entrypoint(["sweep", "--name", "a b"]).endswith("--name 'a b'")
    from trainers.options import ConfigError

    with pytest.raises(ConfigError):
        submit.entrypoint([])
    with pytest.raises(ConfigError):
        submit.entrypoint(["submit", "--", "sweep"])

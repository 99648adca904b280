"""The cluster files validate: launcher configs against Ray's own schema, KubeRay manifests have
what the CRDs require, and every file keeps token authentication on and holds no secret."""

import copy
import re
from pathlib import Path

import pytest
import ray
import yaml

CLUSTER = Path(__file__).resolve().parent.parent / "cluster"
LAUNCHER = ("aws.yaml", "gcp.yaml")
KUBERAY = ("kuberay-raycluster.yaml", "kuberay-rayjob.yaml")


def _load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def _validate(config: dict) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(config)))


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_configs_pass_rays_schema_and_keep_auth_on(name):
    config = _load(name)
    _validate(config)
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "RAY_AUTH_MODE=token" in head_start
    assert "RAY_AUTH_MODE=token" in " ".join(config["worker_start_ray_commands"])
    broken = {**config, "max_worker": 3}  # a typo the schema must catch
    with pytest.raises(Exception, match="max_worker"):
        _validate(broken)


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_configs_make_the_copied_token_private_on_every_node(name):
    config = _load(name)
    assert config["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}
    # setup_commands run on head and workers alike, after file_mounts copied the token.
    assert "chmod 700 ~/.ray && chmod 600 ~/.ray/auth_token" in config["setup_commands"]


def _ray_cluster_spec(manifest: dict) -> dict:
    spec = manifest["spec"]
    return spec["rayClusterSpec"] if manifest["kind"] == "RayJob" else spec


@pytest.mark.parametrize("name", KUBERAY)
def test_kuberay_manifests_have_the_fields_the_crds_require(name):
    manifest = _load(name)
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] in ("RayCluster", "RayJob")
    if manifest["kind"] == "RayJob":
        assert manifest["spec"]["entrypoint"].startswith("defectforge study run")
    cluster = _ray_cluster_spec(manifest)
    assert cluster["rayVersion"] == ray.__version__
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        assert "rayStartParams" in group
        for container in group["template"]["spec"]["containers"]:
            assert container["image"] and container["resources"]["limits"]
            env = {e["name"]: e for e in container["env"]}
            assert env["RAY_AUTH_MODE"]["value"] == "token"
            assert "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"]
    for worker in cluster["workerGroupSpecs"]:
        assert worker["groupName"] and worker["maxReplicas"] >= worker["minReplicas"]


SECRET_PATTERNS = (r"AKIA[0-9A-Z]{16}", r"BEGIN [A-Z ]*PRIVATE KEY", r"RAY_AUTH_TOKEN=\S+")


def test_no_cluster_file_holds_a_secret():
    files = [p for p in CLUSTER.iterdir() if p.is_file() and p.suffix != ".py"]
    assert {p.name for p in files} >= {*LAUNCHER, *KUBERAY, "Dockerfile"}
    for path in files:
        for pattern in SECRET_PATTERNS:
            assert not re.search(pattern, path.read_text()), f"{path.name} matches {pattern}"

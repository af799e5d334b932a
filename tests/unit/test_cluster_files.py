"""cluster/: the Ray cluster launcher config and the KubeRay RayService, checked against Ray's own
schemas and kept in step with configs/multi-gpu.yaml."""

import copy
import json
from pathlib import Path

import jsonschema
import pytest
import ray
import ray.autoscaler
import yaml
from ray.serve.schema import ServeDeploySchema

from serve_app import APP_NAME
from serve_app.config import app_args_from_config
from serve_app.builder import build_app
from serve_app.config import AppArgs

ROOT = Path(__file__).parents[2]
LAUNCHER = ROOT / "cluster" / "ray-cluster.yaml"
RAYSERVICE = ROOT / "cluster" / "rayservice.yaml"
ACCELERATOR = "accelerator_type:"


@pytest.fixture(scope="module")
def launcher() -> dict:
    return yaml.safe_load(LAUNCHER.read_text())


@pytest.fixture(scope="module")
def rayservice() -> dict:
    return yaml.safe_load(RAYSERVICE.read_text())


def _ray_schema() -> dict:
    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def _gpu_type(resources: dict) -> str:
    [kind] = [key[len(ACCELERATOR):] for key in resources if key.startswith(ACCELERATOR)]
    return kind


def test_launcher_config_validates_against_rays_autoscaler_schema(launcher):
    from ray.autoscaler._private.util import prepare_config, validate_config

    jsonschema.validate(launcher, _ray_schema())
    # What `ray up` itself does: merge the provider's defaults, then validate (schema and more).
    validate_config(prepare_config(copy.deepcopy(launcher)))
    # The schema is strict enough to catch a misspelt key.
    broken = copy.deepcopy(launcher)
    broken["available_node_types"]["gpu-heavy"]["max_worker"] = 2
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        jsonschema.validate(broken, _ray_schema())


def test_launcher_gpu_nodes_are_what_multi_gpu_config_declares(launcher):
    nodes = launcher["available_node_types"]
    assert nodes[launcher["head_node_type"]]["resources"]["CPU"] == 0  # no replica on the head
    capacity: dict[str, int] = {}
    for name, node in nodes.items():
        if node["resources"].get("GPU"):
            kind = _gpu_type(node["resources"])
            capacity[kind] = capacity.get(kind, 0) + node["max_workers"] * node["resources"]["GPU"]
    assert capacity == app_args_from_config(ROOT / "configs" / "multi-gpu.yaml").gpu_capacity


def test_launcher_documents_deploying_a_config_that_exists(launcher):
    text = LAUNCHER.read_text()
    assert "genserve serve ~/genserve/configs/multi-gpu.yaml --address auto --detach" in text
    assert "serve deploy ~/genserve/configs/multi-gpu.yaml" in text
    assert launcher["file_mounts"] == {"~/genserve": "."}
    assert any("constraints.txt -e ~/genserve" in command for command in launcher["setup_commands"])


def test_rayservice_serve_config_is_multi_gpu_yaml_and_loads(rayservice):
    assert rayservice["apiVersion"] == "ray.io/v1" and rayservice["kind"] == "RayService"
    serve_config = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    assert serve_config == yaml.safe_load((ROOT / "configs" / "multi-gpu.yaml").read_text())
    schema = ServeDeploySchema.model_validate(serve_config)
    [application] = schema.applications
    assert application.name == APP_NAME and application.import_path == "serve_app.builder:build_app"
    assert type(build_app(AppArgs.model_validate(application.args))).__name__ == "Application"


def test_rayservice_worker_groups_offer_the_declared_gpus(rayservice):
    cluster = rayservice["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == ray.__version__ and cluster["enableInTreeAutoscaling"] is True
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    capacity: dict[str, int] = {}
    for group in cluster["workerGroupSpecs"]:
        # KubeRay's format: a JSON object inside a JSON string.
        resources = json.loads(json.loads(group["rayStartParams"]["resources"]))
        [container] = group["template"]["spec"]["containers"]
        gpus = container["resources"]["limits"]["nvidia.com/gpu"]
        assert container["resources"]["requests"]["nvidia.com/gpu"] == gpus
        kind = _gpu_type(resources)
        capacity[kind] = capacity.get(kind, 0) + group["maxReplicas"] * gpus
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    serve_config = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    assert capacity == serve_config["applications"][0]["args"]["gpu_capacity"]

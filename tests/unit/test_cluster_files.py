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
from serve_app.builder import build_app
from serve_app.config import AppArgs, app_args_from_config

ROOT = Path(__file__).parents[2]
LAUNCHER = ROOT / "cluster" / "ray-cluster.yaml"
RAYSERVICE = ROOT / "cluster" / "rayservice.yaml"
ACCELERATOR = "accelerator_type:"


@pytest.fixture(scope="module")
def launcher() -> dict:
    return yaml.safe_load(LAUNCHER.read_text())


def _manifests() -> dict[str, dict]:
    """cluster/rayservice.yaml's objects by kind: the Redis StatefulSet and Service, the RayService."""
    return {doc["kind"]: doc for doc in yaml.safe_load_all(RAYSERVICE.read_text())}


@pytest.fixture(scope="module")
def rayservice() -> dict:
    return _manifests()["RayService"]


@pytest.fixture(scope="module")
def multi_gpu():
    return app_args_from_config(ROOT / "configs" / "multi-gpu.yaml")


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
    for node in nodes.values():
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
        gpus = container["resources"]["limits"].get("nvidia.com/gpu")
        if gpus is None:  # the cpu group
            continue
        assert container["resources"]["requests"]["nvidia.com/gpu"] == gpus
        kind = _gpu_type(resources)
        capacity[kind] = capacity.get(kind, 0) + group["maxReplicas"] * gpus
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    serve_config = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    assert capacity == serve_config["applications"][0]["args"]["gpu_capacity"]


def _launcher_commands(launcher, key: str) -> str:
    return "\n".join(launcher[key])


def test_both_clusters_keep_jobs_in_one_persistent_redis_at_the_address_the_config_names(launcher, multi_gpu):
    from urllib.parse import urlparse

    jobs = multi_gpu.jobs
    url = urlparse(jobs.redis_url)
    assert jobs.store == "redis" and (url.hostname, url.port) == ("genserve-redis", 6380)
    assert urlparse(multi_gpu.limits_storage()).hostname == "genserve-redis", "rate limits shared there too"
    durable = ["--appendonly", "yes", "--appendfsync", "always", "--maxmemory-policy", "noeviction"]
    # KubeRay: a StatefulSet with a volume claim, behind a Service of that name and port.
    manifests = _manifests()
    service, redis = manifests["Service"], manifests["StatefulSet"]
    assert service["metadata"]["name"] == "genserve-redis" and service["spec"]["ports"][0]["port"] == url.port
    [container] = redis["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    assert all(args[args.index(flag) + 1] == value for flag, value in zip(durable[::2], durable[1::2]))
    assert args[args.index("--port") + 1] == str(url.port)
    assert {mount["mountPath"] for mount in container["volumeMounts"]} == {args[args.index("--dir") + 1]}
    assert redis["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == container["volumeMounts"][0]["name"]
    # The launcher: on the head, beside (not on) Ray's GCS port, reached as genserve-redis by every worker.
    head = _launcher_commands(launcher, "head_start_ray_commands")
    assert f"redis-server --port {url.port}" in head and " ".join(durable) in head and "--dir ~/genserve-redis" in head
    assert "--port=6379" in head and url.port != 6379
    assert '"$RAY_HEAD_IP genserve-redis"' in _launcher_commands(launcher, "worker_setup_commands")
    assert "systemctl disable --now redis-server" in _launcher_commands(launcher, "head_setup_commands")


def test_the_ingress_and_job_runner_run_on_cpu_nodes_that_offer_them_room(launcher, rayservice, multi_gpu):
    options = multi_gpu.all_deployment_options()
    on_cpu_nodes = {name for name, option in options.items() if option.resources.get("cpu_node")}
    assert on_cpu_nodes == {"Ingress", "JobRunner"}
    needed = sum(options[name].max_replicas * options[name].num_cpus for name in on_cpu_nodes)
    # The launcher: only the cpu node type offers cpu_node, and it has no GPU.
    offering = {name: node for name, node in launcher["available_node_types"].items()
                if node["resources"].get("cpu_node")}
    assert list(offering) == ["cpu"] and not offering["cpu"]["resources"].get("GPU")
    assert offering["cpu"]["min_workers"] >= 2, "two nodes, so losing one never takes the entry point away"
    assert offering["cpu"]["max_workers"] * offering["cpu"]["resources"]["CPU"] >= needed
    # KubeRay: likewise the cpu worker group.
    groups = {group["groupName"]: group for group in rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]
              if json.loads(json.loads(group["rayStartParams"]["resources"])).get("cpu_node")}
    assert list(groups) == ["cpu"]
    [container] = groups["cpu"]["template"]["spec"]["containers"]
    assert "nvidia.com/gpu" not in container["resources"]["limits"] and groups["cpu"]["minReplicas"] >= 2
    assert groups["cpu"]["maxReplicas"] * int(groups["cpu"]["rayStartParams"]["num-cpus"]) >= needed

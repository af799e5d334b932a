from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError
from ray.serve.schema import ServeDeploySchema

from serve_app import APP_NAME
from serve_app.appconfig import app_args_from_config
from serve_app.builder import build_app
from serve_app.config import AppArgs, DeploymentOptions

CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))


def test_there_are_configs():
    assert {path.name for path in CONFIGS} >= {"dev.yaml", "single-gpu.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: path.name)
def test_each_config_loads_in_serve_schema_and_typed_builder(path):
    raw = yaml.safe_load(path.read_text())
    schema = ServeDeploySchema.model_validate(raw)
    assert [app.name for app in schema.applications] == [APP_NAME]
    assert schema.applications[0].import_path == "serve_app.builder:build_app"
    args = app_args_from_config(path)
    application = build_app(args)
    assert type(application).__name__ == "Application"


def test_dev_config_is_tiny_on_cpu():
    args = app_args_from_config(Path(__file__).parents[2] / "configs" / "dev.yaml")
    assert args.flux.source == "tiny" and args.scorer.source == "tiny"
    assert args.flux.device.device == "cpu"


def _field_error(args: dict) -> tuple[tuple, str]:
    with pytest.raises(ValidationError) as caught:
        AppArgs.model_validate(args)
    error = caught.value.errors()[0]
    return error["loc"], error["msg"]


def test_unknown_model_source_names_the_field():
    loc, msg = _field_error({"flux": {"source": "not a source"}})
    assert loc == ("flux", "source") and "Hugging Face repo id" in msg


def test_autoscaling_min_above_max_names_the_field():
    loc, msg = _field_error({"deployments": {"FluxGenerator": {"autoscaling": {"min_replicas": 3, "max_replicas": 1}}}})
    assert loc == ("deployments", "FluxGenerator", "autoscaling") and "min_replicas (3)" in msg


def test_threshold_outside_metric_range_is_rejected():
    loc, msg = _field_error({"policy": {"metric": "aesthetic", "threshold": 30}})
    assert loc == ("policy",) and "between 0 and 1" in msg
    assert AppArgs.model_validate({"policy": {"metric": "alignment", "threshold": 30}}).policy.threshold == 30


def test_unknown_deployment_name_and_unknown_keys_are_rejected():
    loc, _ = _field_error({"deployments": {"Flux": {"num_replicas": 2}}})
    assert loc[:2] == ("deployments", "Flux")
    loc, _ = _field_error({"flux": {"sorce": "tiny"}})
    assert loc == ("flux", "sorce")


def test_replicas_and_autoscaling_are_exclusive():
    with pytest.raises(ValidationError, match="either num_replicas or autoscaling"):
        DeploymentOptions(num_replicas=2, autoscaling={"min_replicas": 1, "max_replicas": 2})


def test_deployment_options_map_to_serve_options():
    options = DeploymentOptions(
        autoscaling={"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 1},
        num_cpus=0.5, num_gpus=0.25, max_ongoing_requests=2, max_queued_requests=10,
    ).serve_options()
    assert options["autoscaling_config"]["max_replicas"] == 3
    assert options["ray_actor_options"] == {"num_cpus": 0.5, "num_gpus": 0.25}
    assert options["max_ongoing_requests"] == 2 and options["max_queued_requests"] == 10
    assert DeploymentOptions().serve_options() == {}


def test_jobs_default_to_sqlite_under_the_dev_data_dir():
    args = app_args_from_config(Path(__file__).parents[2] / "configs" / "dev.yaml")
    assert args.jobs.store == "sqlite" and args.jobs.data_dir == "./data/jobs"
    assert (args.jobs.ttl_s, args.jobs.retry_limit) == (86400, 2)


def test_redis_store_needs_a_redis_url():
    loc, msg = _field_error({"jobs": {"store": "redis"}})
    assert loc == ("jobs",) and "needs redis_url" in msg
    loc, msg = _field_error({"jobs": {"store": "redis", "redis_url": "localhost:6379"}})
    assert "must start with redis://" in msg


def test_the_job_runner_is_one_replica():
    with pytest.raises(ValidationError, match="JobRunner runs as exactly one replica"):
        AppArgs.model_validate({"deployments": {"JobRunner": {"num_replicas": 2}}})
    AppArgs.model_validate({"deployments": {"JobRunner": {"num_cpus": 0.5}}})


def test_job_slots_default_to_what_the_model_deployments_take():
    from serve_app.builder import job_slots

    config = {
        "svd": {"source": "tiny"},
        "deployments": {"FluxGenerator": {"autoscaling": {"min_replicas": 1, "max_replicas": 3},
                                          "max_ongoing_requests": 2}},
    }
    assert job_slots(AppArgs.model_validate(config)) == {"image": 6, "video": 2}, "3 replicas x 2; SVD's 1 x 2"
    limited = AppArgs.model_validate({**config, "jobs": {"max_concurrent_jobs": {"video": 1}}})
    assert job_slots(limited) == {"image": 6, "video": 1}

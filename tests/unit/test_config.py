from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError
from ray.serve.schema import ServeDeploySchema

from serve_app import APP_NAME
from serve_app.builder import build_app
from serve_app.config import (
    AppArgs,
    DeploymentOptions,
    app_args_from_config,
    device_options,
    gpu_memory_fraction,
    unplaced_gpu_replicas,
)
from serve_app.services.settings import model_specs

ROOT = Path(__file__).parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def flux(deployment: dict | None = None, **fields) -> dict:
    """A config with one image model, flux-schnell from the hub, with `fields` and deployment options."""
    entry = {"id": "flux-schnell", "family": "flux", "source": "black-forest-labs/FLUX.1-schnell", **fields}
    return {"image_models": [{**entry, "deployment": deployment or {}}]}


def test_there_are_configs():
    assert {path.name for path in CONFIGS} >= {"dev.yaml", "single-gpu.yaml", "multi-gpu.yaml"}


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
    assert all(entry.source == "tiny" and entry.device.device == "cpu" for entry in args.image_models)
    assert all(entry.source == "tiny" for entry in args.scorers) and args.default_model_id == "flux-schnell"


def _field_error(args: dict) -> tuple[tuple, str]:
    with pytest.raises(ValidationError) as caught:
        AppArgs.model_validate(args)
    error = caught.value.errors()[0]
    return error["loc"], error["msg"]


def test_unknown_model_source_names_the_field():
    loc, msg = _field_error(flux(source="not a source"))
    assert loc == ("image_models", 0, "source") and "Hugging Face repo id" in msg


def test_autoscaling_min_above_max_names_the_field():
    loc, msg = _field_error(flux({"autoscaling": {"min_replicas": 3, "max_replicas": 1}}))
    assert loc == ("image_models", 0, "deployment", "autoscaling") and "min_replicas (3)" in msg


@pytest.mark.parametrize("key, replacement", [("flux", "family: flux"), ("sdxl", "family: sdxl"),
                                              ("sdxl_turbo", "max_steps: 4")])
def test_a_config_in_the_old_shape_says_which_key_replaces_it(key, replacement):
    _, msg = _field_error({key: {"source": "tiny"}})
    assert f"`{key}:` is no longer read: use `image_models:`" in msg and replacement in msg
    _, msg = _field_error({"deployments": {"FluxGenerator": {"num_replicas": 2}}})
    assert "image_models entry, under `deployment:`" in msg


def test_an_unknown_family_names_the_field_and_lists_the_known_ones():
    loc, msg = _field_error(flux(family="flux9"))
    assert loc == ("image_models", 0, "family")
    assert "unknown family 'flux9'" in msg and "import path" in msg
    assert all(name in msg for name in ("flux", "sdxl", "sd15"))
    loc, msg = _field_error(flux(family="no_such_package.family:FAMILY"))
    assert loc == ("image_models", 0, "family") and "could not be imported" in msg


@pytest.mark.parametrize("model_id", ["Flux", "flux_schnell", "-flux", "flux--dev", "a" * 65, ""])
def test_model_ids_follow_the_documented_pattern(model_id):
    loc, _ = _field_error(flux(id=model_id))
    assert loc == ("image_models", 0, "id")


def test_family_options_and_limits_are_checked_against_the_family():
    loc, msg = _field_error(flux(options={"max_sequence_length": 4}))
    assert loc == ("image_models", 0) and "options for family 'flux'" in msg and "max_sequence_length" in msg
    _, msg = _field_error(flux(limits={"max_steps": 80}))
    assert "steps 1-80 must lie within the flux family's 1-50" in msg
    _, msg = _field_error(flux(limits={"max_steps": 4}, default_steps=8))
    assert "default_steps (8) must lie within the limits, 1-4" in msg


def test_one_family_serves_several_ids_and_the_first_is_the_default_unless_named():
    dev = {"id": "flux-dev", "family": "flux", "source": "black-forest-labs/FLUX.1-dev"}
    args = AppArgs.model_validate({"image_models": [*flux()["image_models"], dev]})
    assert args.default_model_id == "flux-schnell"
    assert [entry.deployment_name for entry in args.image_models] == ["FluxSchnellGenerator", "FluxDevGenerator"]
    assert AppArgs.model_validate({"image_models": [*flux()["image_models"], dev],
                                   "default_model": "flux-dev"}).default_model_id == "flux-dev"
    _, msg = _field_error({"image_models": [*flux()["image_models"], dev], "default_model": "sdxl"})
    assert "default_model 'sdxl' is not an enabled image_models id" in msg
    _, msg = _field_error({"image_models": [*flux()["image_models"], *flux()["image_models"]]})
    assert "ids must be unique together; repeated: ['flux-schnell']" in msg
    _, msg = _field_error({"image_models": [*flux()["image_models"], {**dev, "id": "flux.schnell"}]})
    assert "clashing deployment names ['FluxSchnellGenerator']" in msg


def test_threshold_outside_metric_range_is_rejected():
    loc, msg = _field_error({"policy": {"metric": "aesthetic", "threshold": 30}})
    assert loc == ("policy",) and "between 0 and 1" in msg
    assert AppArgs.model_validate({"policy": {"metric": "alignment", "threshold": 30}}).policy.threshold == 30


def test_unknown_deployment_name_and_unknown_keys_are_rejected():
    loc, _ = _field_error({"deployments": {"Flux": {"num_replicas": 2}}})
    assert loc[:2] == ("deployments", "Flux")
    loc, _ = _field_error(flux(sorce="tiny"))
    assert loc == ("image_models", 0, "sorce")


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


def test_every_config_declares_what_it_needs_and_fits():
    """Each GPU config declares its GPUs, so its shares are checked; dev.yaml asks for none."""
    for path in CONFIGS:
        args = app_args_from_config(path)
        wants_gpus = any(options.num_gpus for options in args.all_deployment_options().values())
        assert bool(args.gpu_capacity) == wants_gpus, path.name


def test_single_gpu_config_packs_every_deployment_onto_one_gpu():
    args = app_args_from_config(ROOT / "configs" / "single-gpu.yaml")
    assert args.gpu_capacity == {"any": 1}
    options = args.all_deployment_options()
    shares = {name: options.num_gpus for name, options in options.items() if options.num_gpus}
    assert set(shares) == {"FluxSchnellGenerator", "ClipScorer", "SvdXtGenerator", "SdxlGenerator", "PromptEnhancer"}
    assert all(0 < share < 1 for share in shares.values()) and sum(shares.values()) <= 1
    assert all(options[name].max_replicas == 1 for name in shares)
    # The builder turns each share into the replica's CUDA memory cap (the enhancer's goes to its LLM).
    for name, share in shares.items():
        assert device_options(args.model_config_for(name)).memory_fraction == share
    assert args.model_config_for("PromptEnhancer").llm.device.memory_fraction == 0.05


def test_enhancer_llm_memory_cap_must_fit_its_share():
    with pytest.raises(ValueError, match=r"enhancer\.llm\.device\.memory_fraction \(0\.5\) is more than deployments\.PromptEnhancer"):
        AppArgs.model_validate({
            "enhancer": {"mode": "llm", "llm": {"device": {"memory_fraction": 0.5}}},
            "deployments": {"PromptEnhancer": {"num_gpus": 0.1}},
        })


def test_multi_gpu_config_gives_flux_whole_gpus_and_autoscales_every_model():
    args = app_args_from_config(ROOT / "configs" / "multi-gpu.yaml")
    options = args.all_deployment_options()
    flux = options["FluxSchnellGenerator"]
    assert flux.num_gpus == 1 and flux.accelerator_type == "H100"
    assert args.model_config_for("FluxSchnellGenerator").device.memory_fraction is None  # a whole GPU is its own
    svd = options["SvdXtGenerator"]
    assert svd.num_gpus == 1 and svd.accelerator_type == "H100"  # FLUX and SVD never share a GPU
    assert 0 < args.deployments["ClipScorer"].num_gpus < 1
    for name in ("FluxSchnellGenerator", "ClipScorer", "PromptEnhancer", "SvdXtGenerator", "SdxlGenerator"):
        options = args.all_deployment_options()[name]
        assert options.autoscaling is not None and options.autoscaling.min_replicas < options.autoscaling.max_replicas
        assert options.max_ongoing_requests and options.max_queued_requests and options.max_queued_requests > 0


def test_gpu_memory_fraction_follows_a_fractional_share_only():
    assert gpu_memory_fraction(0.45) == 0.45
    assert gpu_memory_fraction(1) is None  # a whole GPU: Ray schedules no one else on it
    assert gpu_memory_fraction(0) is None and gpu_memory_fraction(None) is None


def test_explicit_memory_fraction_wins_but_may_not_exceed_the_share():
    args = AppArgs.model_validate(flux({"num_gpus": 0.45}, device={"memory_fraction": 0.3}))
    assert args.model_config_for("FluxSchnellGenerator").device.memory_fraction == 0.3
    with pytest.raises(ValidationError, match=r"image_models\[flux-schnell\].device.memory_fraction \(0.5\) is more "
                                              r"than image_models\[flux-schnell\].deployment.num_gpus \(0.45\)"):
        AppArgs.model_validate(flux({"num_gpus": 0.45}, device={"memory_fraction": 0.5}))


def test_more_than_one_gpu_per_replica_names_the_field():
    loc, msg = _field_error(flux({"num_gpus": 1.5}))
    assert loc == ("image_models", 0, "deployment", "num_gpus") and "at most 1" in msg and "1.5" in msg


def test_accelerator_type_needs_a_gpu():
    loc, msg = _field_error({"deployments": {"ClipScorer": {"accelerator_type": "L4"}}})
    assert loc == ("deployments", "ClipScorer") and "needs num_gpus above 0" in msg


def test_gpu_shares_that_cannot_fit_name_the_field():
    loc, msg = _field_error({
        "gpu_capacity": {"any": 1}, **flux({"num_gpus": 0.6}), "deployments": {"ClipScorer": {"num_gpus": 0.5}},
    })
    assert "do not fit in gpu_capacity {'any': 1}" in msg and "no GPU left for: ClipScorer x1" in msg


def test_gpu_shares_are_checked_at_max_replicas():
    autoscaled = flux({"num_gpus": 1, "accelerator_type": "H100", "autoscaling": {"min_replicas": 1, "max_replicas": 3}})
    AppArgs.model_validate({"gpu_capacity": {"H100": 3}, **autoscaled})
    _, msg = _field_error({"gpu_capacity": {"H100": 2}, **autoscaled})
    assert "FluxSchnellGenerator 3 x 1 H100 GPU" in msg and "FluxSchnellGenerator x1" in msg


def test_pinned_replicas_only_use_their_gpu_type():
    # Plenty of L4 room, but FLUX is pinned to H100s and there are none.
    _, msg = _field_error({"gpu_capacity": {"L4": 4}, **flux({"num_gpus": 1, "accelerator_type": "H100"})})
    assert "no GPU left for: FluxSchnellGenerator x1" in msg


def test_packing_fills_fractions_and_keeps_whole_gpus_whole():
    # The issue's H200 layout: FLUX 0.45, SDXL 0.2, SVD 0.2, LLM 0.1, CLIP 0.05 fill one GPU exactly.
    shares = [("A", 0.45, None), ("B", 0.05, None), ("C", 0.2, None), ("D", 0.2, None), ("E", 0.1, None)]
    assert unplaced_gpu_replicas(shares, {"any": 1}) == []
    assert unplaced_gpu_replicas(shares + [("F", 0.01, None)], {"any": 1}) == ["F"]
    # 1 - 0.3 - 0.3 - 0.3 is a hair below 0.1 in binary floats; in decimal it is exactly 0.1.
    assert unplaced_gpu_replicas([("A", 0.3, None)] * 3 + [("B", 0.1, None)], {"any": 1}) == []
    # Three 0.6 shares sum to 1.8 but no two share a GPU: two GPUs are not enough.
    assert unplaced_gpu_replicas([("A", 0.6, None)] * 3, {"any": 2}) == ["A"]
    # Unpinned replicas may use typed GPUs; pinned ones go first so they keep theirs.
    assert unplaced_gpu_replicas([("light", 0.5, None), ("big", 1, "H100")], {"H100": 1, "any": 1}) == []
    assert unplaced_gpu_replicas([("big", 1, "H100"), ("big", 1, "H100")], {"H100": 1, "any": 4}) == ["big"]


def test_negative_gpu_capacity_is_rejected():
    loc, _ = _field_error({"gpu_capacity": {"H100": -1}})
    assert loc == ("gpu_capacity",)


def test_autoscaling_timing_knobs_reach_serve_and_unset_ones_keep_serve_defaults():
    options = DeploymentOptions(
        num_gpus=1, accelerator_type="H100",
        autoscaling={"min_replicas": 1, "max_replicas": 2, "look_back_period_s": 2, "metrics_interval_s": 0.5},
    ).serve_options()
    assert options["autoscaling_config"]["look_back_period_s"] == 2
    assert options["autoscaling_config"]["metrics_interval_s"] == 0.5
    assert options["ray_actor_options"] == {"num_gpus": 1, "accelerator_type": "H100"}
    assert "look_back_period_s" not in DeploymentOptions(autoscaling={}).serve_options()["autoscaling_config"]


def test_genserve_serve_rejects_a_config_whose_gpu_shares_cannot_fit_before_starting_ray(tmp_path, capsys):
    import ray

    from serve_app.cli import main

    config = yaml.safe_load((ROOT / "configs" / "single-gpu.yaml").read_text())
    config["applications"][0]["args"]["deployments"]["ClipScorer"]["num_gpus"] = 0.6
    path = tmp_path / "too-big.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["serve", str(path)]) == 2
    error = capsys.readouterr().err
    assert f"{path} is not a valid config" in error
    assert "do not fit in gpu_capacity {'any': 1}" in error
    assert not ray.is_initialized()


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
    from serve_app.services.settings import job_slots

    config = {"video_models": [{"id": "svd", "family": "svd", "source": "tiny"},
                               {"id": "ltx", "family": "ltx", "source": "tiny", "enabled": False}],
              **flux({"autoscaling": {"min_replicas": 1, "max_replicas": 3}, "max_ongoing_requests": 2})}
    assert job_slots(AppArgs.model_validate(config)) == {"image": 6, "video": 2}, "3 replicas x 2; SVD's 1 x 2"
    limited = AppArgs.model_validate({**config, "jobs": {"max_concurrent_jobs": {"video": 1}}})
    assert job_slots(limited) == {"image": 6, "video": 1}


def test_an_entry_marked_disabled_is_checked_but_not_deployed():
    optional = {"id": "flux-dev", "family": "flux", "source": "black-forest-labs/FLUX.1-dev", "enabled": False,
                "deployment": {"num_gpus": 0.45}}
    args = AppArgs.model_validate({"gpu_capacity": {"any": 1}, **flux({"num_gpus": 0.6}), "image_models": [
        *flux({"num_gpus": 0.6})["image_models"], optional]})
    assert [entry.id for entry in args.served_image_models] == ["flux-schnell"]
    assert "FluxDevGenerator" not in args.all_deployment_options()  # its share is not counted either
    _, msg = _field_error({"image_models": [{**optional, "limits": {"max_steps": 99}}]})
    assert "steps 1-99 must lie within" in msg
    _, msg = _field_error({"image_models": [optional]})
    assert "at least one entry must be enabled" in msg
    _, msg = _field_error({"image_models": [*flux()["image_models"], optional], "default_model": "flux-dev"})
    assert "not an enabled image_models id" in msg


@pytest.mark.parametrize("profile", ["single-gpu.yaml", "multi-gpu.yaml"])
def test_flux_dev_is_an_optional_entry_that_fits_in_schnells_place(profile):
    config = yaml.safe_load((ROOT / "configs" / profile).read_text())
    args = config["applications"][0]["args"]
    entries = {entry["id"]: entry for entry in args["image_models"]}
    dev = entries["flux-dev"]
    assert (dev["family"], dev["source"], dev["enabled"]) == ("flux", "black-forest-labs/FLUX.1-dev", False)
    # Served in schnell's place (as the profile's comment says), the shares still fit the GPUs.
    dev["enabled"], entries["flux-schnell"]["enabled"] = True, False
    swapped = AppArgs.model_validate(args)
    assert swapped.default_model_id == "flux-dev" and "FluxDevGenerator" in swapped.all_deployment_options()
    spec = model_specs(swapped)["flux-dev"]
    assert (spec.min_steps, spec.max_steps, spec.default_steps, spec.default_guidance) == (1, 50, 28, 3.5)

"""The typed application builder: `import_path: serve_app.builder:build_app` in a Serve config.

    applications:
      - name: genserve
        import_path: serve_app.builder:build_app
        args: {...}          # validated as serve_app.config.AppArgs
"""

from __future__ import annotations

from pathlib import Path

from ray.serve import Application

from deployments.clip_scorer import ClipScorer
from deployments.flux import FluxGenerator
from deployments.lora import LoraRegistry
from deployments.prompt_enhancer import PromptEnhancer
from deployments.sdxl_controlnet import SdxlGenerator
from deployments.svd import SvdGenerator
from serve_app.config import AppArgs, DeploymentOptions, JobsConfig
from serve_app.ingress import Ingress
from serve_app.jobs.runner import JobRunner
from serve_app.models import ModelSpec, flux_schnell_spec, sdxl_spec, sdxl_turbo_spec


# Optional SDXL models: (AppArgs field, deployment name, model spec factory).
SDXL_MODELS = (("sdxl", "SdxlGenerator", sdxl_spec), ("sdxl_turbo", "SdxlTurboGenerator", sdxl_turbo_spec))


def model_specs(args: AppArgs) -> dict[str, ModelSpec]:
    flux = args.flux
    specs = [flux_schnell_spec(flux.default_width, flux.default_height, flux.default_steps)]
    specs += [make_spec(getattr(args, field)) for field, _, make_spec in SDXL_MODELS if getattr(args, field) is not None]
    return {spec.id: spec for spec in specs}


def image_deployments(args: AppArgs) -> dict:
    """The image generator deployments this config deploys: name -> deployment (its decorator's defaults)."""
    sdxl = {name: SdxlGenerator for field, name, _ in SDXL_MODELS if getattr(args, field) is not None}
    return {"FluxGenerator": FluxGenerator, **sdxl}


def capacity(args: AppArgs, name: str, deployment) -> int:
    """Requests deployment `name` takes at once without queueing at Serve's router: replicas
    (max_replicas when autoscaling) x max_ongoing_requests, from the config or the decorator."""
    options = args.deployments.get(name, DeploymentOptions())
    replicas = options.autoscaling.max_replicas if options.autoscaling else options.num_replicas
    per_replica = options.max_ongoing_requests or deployment.max_ongoing_requests
    return (replicas or deployment.num_replicas) * per_replica


def job_slots(args: AppArgs) -> dict[str, int]:
    """Jobs of each kind that run at once: the config's, else what the model deployment takes."""
    configured = args.jobs.max_concurrent_jobs
    # Image jobs may name any image model, so together they may use every image generator at once.
    image = sum(capacity(args, name, deployment) for name, deployment in image_deployments(args).items())
    slots = {"image": configured.image or image}
    if args.svd is not None:
        slots["video"] = configured.video or capacity(args, "SvdGenerator", SvdGenerator)
    return slots


def resolved_jobs_config(args: AppArgs) -> JobsConfig:
    """The jobs config with data_dir made absolute here, where the app is built: replicas run in
    other working directories."""
    return args.jobs.model_copy(update={"data_dir": str(Path(args.jobs.data_dir).expanduser().resolve())})


def lora_registry(args: AppArgs) -> LoraRegistry:
    """The LoRA registry, its directory made absolute here like jobs.data_dir."""
    config = args.loras
    if config.dir is not None:
        config = config.model_copy(update={"dir": str(Path(config.dir).expanduser().resolve())})
    return LoraRegistry.from_config(config)


def build_app(args: AppArgs) -> Application:
    """Wire PromptEnhancer -> FluxGenerator (and the SDXL generators, if configured) -> ClipScorer
    (and SvdGenerator, if configured) behind the Ingress, and the JobRunner that runs async jobs
    through the same deployments.

    Serve validates a config's `args:` into `AppArgs` (the annotation); a plain dict is accepted too.
    """
    if not isinstance(args, AppArgs):
        args = AppArgs.model_validate(args or {})
    enhancer = PromptEnhancer.options(**args.options_for("PromptEnhancer")).bind(
        args.model_config_for("PromptEnhancer"), metrics=args.metrics
    )
    flux = FluxGenerator.options(**args.options_for("FluxGenerator")).bind(
        args.model_config_for("FluxGenerator"), metrics=args.metrics, lora_cache_size=args.loras.cache_size
    )
    scorer = ClipScorer.options(**args.options_for("ClipScorer")).bind(
        args.model_config_for("ClipScorer"), metrics=args.metrics
    )
    generators = {"flux-schnell": flux}
    for field, name, make_spec in SDXL_MODELS:
        config = getattr(args, field)
        if config is not None:
            model_id = make_spec(config).id
            generators[model_id] = SdxlGenerator.options(name=name, **args.options_for(name)).bind(
                args.model_config_for(name), model_id=model_id, metrics=args.metrics,
                lora_cache_size=args.loras.cache_size,
            )
    video = {}
    if args.svd is not None:
        video["svd"] = SvdGenerator.options(**args.options_for("SvdGenerator")).bind(
            args.model_config_for("SvdGenerator"), metrics=args.metrics
        )
        video["svd_config"] = args.svd
    graph = dict(
        enhancer=enhancer,
        generators=generators,
        scorer=scorer,
        specs=model_specs(args),
        policy=args.policy,
        request_timeout_s=args.request_timeout_s,
        max_input_pixels=args.max_input_pixels,
        metrics=args.metrics,
        blocklist=tuple(args.enhancer.blocklist),
        loras=lora_registry(args),
        gate_metrics=args.gate_metrics(),
        **video,
    )
    runner = JobRunner.options(**args.options_for("JobRunner")).bind(resolved_jobs_config(args), job_slots(args), **graph)
    return Ingress.options(**args.options_for("Ingress")).bind(
        **graph, jobs=runner, retry_limit=args.jobs.retry_limit, max_body_bytes=args.max_body_bytes,
    )

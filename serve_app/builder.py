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
from deployments.svd import SvdGenerator
from serve_app.config import AppArgs, DeploymentOptions, JobsConfig
from serve_app.ingress import Ingress
from serve_app.jobs.runner import JobRunner
from serve_app.models import ModelSpec, flux_schnell_spec


def model_specs(args: AppArgs) -> dict[str, ModelSpec]:
    flux = args.flux
    spec = flux_schnell_spec(flux.default_width, flux.default_height, flux.default_steps)
    return {spec.id: spec}


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
    slots = {"image": configured.image or capacity(args, "FluxGenerator", FluxGenerator)}
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
    """Wire PromptEnhancer -> FluxGenerator -> ClipScorer (and SvdGenerator, if configured) behind the
    Ingress, and the JobRunner that runs async jobs through the same deployments.

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
    video = {}
    if args.svd is not None:
        video["svd"] = SvdGenerator.options(**args.options_for("SvdGenerator")).bind(
            args.model_config_for("SvdGenerator"), metrics=args.metrics
        )
        video["svd_config"] = args.svd
    graph = dict(
        enhancer=enhancer,
        generators={"flux-schnell": flux},
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

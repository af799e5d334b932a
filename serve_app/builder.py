"""The typed application builder: `import_path: serve_app.builder:build_app` in a Serve config.

    applications:
      - name: genserve
        import_path: serve_app.builder:build_app
        args: {...}          # validated as serve_app.config.AppArgs
"""

from __future__ import annotations

from pathlib import Path

from ray.serve import Application

from deployments.enhancer.prompt_enhancer import PromptEnhancer
from deployments.families import BUILTIN
from deployments.image_generator import ImageGenerator
from deployments.lora_registry import LoraRegistry
from deployments.scoring.clip_scorer import ClipScorer
from deployments.video_generator import VideoGenerator
from serve_app.api.ingress import Ingress
from serve_app.config import AppArgs, DeploymentOptions, JobsConfig
from serve_app.jobs import http as jobs_http
from serve_app.jobs.runner import JobRunner
from serve_app.services.validation import ModelSpec


def model_specs(args: AppArgs) -> dict[str, ModelSpec]:
    """What each configured image model accepts, by id, in config order (the default first)."""
    return {entry.id: ModelSpec.of(entry) for entry in args.served_image_models}


def image_deployments(args: AppArgs) -> dict:
    """The image generator deployments this config deploys: name -> deployment (its decorator's defaults)."""
    return {entry.deployment_name: ImageGenerator for entry in args.served_image_models}


def capacity(args: AppArgs, name: str, deployment) -> int:
    """Requests deployment `name` takes at once without queueing at Serve's router: replicas
    (max_replicas when autoscaling) x max_ongoing_requests, from the config or the decorator."""
    options = args.all_deployment_options().get(name, DeploymentOptions())
    replicas = options.autoscaling.max_replicas if options.autoscaling else options.num_replicas
    per_replica = options.max_ongoing_requests or deployment.max_ongoing_requests
    return (replicas or deployment.num_replicas) * per_replica


def job_slots(args: AppArgs) -> dict[str, int]:
    """Jobs of each kind that run at once: the config's, else what the model deployment takes."""
    configured = args.jobs.max_concurrent_jobs
    # Image jobs may name any image model, so together they may use every image generator at once.
    image = sum(capacity(args, name, deployment) for name, deployment in image_deployments(args).items())
    slots = {"image": configured.image or image}
    if args.served_video_models:
        # Video jobs may name any video model, as image jobs any image model.
        video = sum(capacity(args, entry.deployment_name, VideoGenerator) for entry in args.served_video_models)
        slots["video"] = configured.video or video
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
    # The built-in families, and any a config entry names by import path.
    families = dict.fromkeys([*BUILTIN, *(entry.family for entry in args.served_image_models)])
    return LoraRegistry.from_config(config, families=list(families))


def resolved_auth_config(args: AppArgs):
    """The auth config with keys_file made absolute here, where the app is built (replicas run in
    other directories). The file is read by each Ingress replica, which fails to start, saying
    why, if it is missing or broken (`genserve serve` checks it before deploying)."""
    auth = args.auth
    if auth.keys_file is None:
        return auth
    return auth.model_copy(update={"keys_file": str(Path(auth.keys_file).expanduser().resolve())})


def build_app(args: AppArgs) -> Application:
    """Wire PromptEnhancer -> one ImageGenerator per `image_models:` entry -> ClipScorer (and
    one VideoGenerator per `video_models:` entry) behind the Ingress, and the JobRunner that runs async jobs through
    the same deployments.

    Serve validates a config's `args:` into `AppArgs` (the annotation); a plain dict is accepted too.
    """
    if not isinstance(args, AppArgs):
        args = AppArgs.model_validate(args or {})
    enhancer = PromptEnhancer.options(**args.options_for("PromptEnhancer")).bind(
        args.model_config_for("PromptEnhancer"), metrics=args.metrics
    )
    scorer = ClipScorer.options(**args.options_for("ClipScorer")).bind(
        args.model_config_for("ClipScorer"), metrics=args.metrics
    )
    generators = {
        entry.id: ImageGenerator.options(name=entry.deployment_name, **args.options_for(entry.deployment_name)).bind(
            args.model_config_for(entry.deployment_name), metrics=args.metrics, lora_cache_size=args.loras.cache_size
        )
        for entry in args.served_image_models
    }
    video = {}
    if args.served_video_models:
        video["video_generators"] = {
            entry.id: VideoGenerator.options(name=entry.deployment_name, **args.options_for(entry.deployment_name)).bind(
                args.model_config_for(entry.deployment_name), metrics=args.metrics
            )
            for entry in args.served_video_models
        }
        video["video_models"] = {entry.id: entry for entry in args.served_video_models}
        video["default_video_model"] = args.default_video_model_id
    graph = dict(
        enhancer=enhancer,
        generators=generators,
        scorer=scorer,
        specs=model_specs(args),
        default_model=args.default_model_id,
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
        auth=resolved_auth_config(args), limits_storage=args.limits_storage(),
        fallback=args.fallback, replicas={entry.id: entry.deployment.max_replicas for entry in args.served_image_models},
        event_streams=jobs_http.StreamLimits(args.jobs.max_event_streams, args.jobs.max_event_streams_per_client,
                                             args.jobs.event_stream_max_s),
        scores=args.scores,
    )

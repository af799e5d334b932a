"""What the services are built from: `Settings`, read once from the config, and `Handles`, the
deployments they call. `Services.build(settings, handles)` (services/facade.py) is the one way
to build the services, in the Ingress, the JobRunner, the benchmark and the tests.

The builder makes one `Settings` (`Settings.from_args(args)`) and binds it to the Ingress and the
JobRunner: plain data, so it pickles to their replicas. Paths in it are made absolute where the
app is built, since replicas run in other working directories.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deployments.families import BUILTIN
from deployments.image_generator import ImageGenerator
from deployments.lora_registry import LoraRegistry
from deployments.scoring.families import get_scorer_family
from deployments.video_generator import VideoGenerator
from serve_app.config import (
    DEFAULT_RETRY_AFTER_S,
    AppArgs,
    AuthConfig,
    DeploymentOptions,
    FallbackConfig,
    JobsConfig,
    QualityPolicy,
    ScoresConfig,
    VideoModelEntry,
)
from serve_app.services.local import LocalHandle
from serve_app.services.quality import Calibration, load_calibration
from serve_app.services.validation import ModelSpec


@dataclass(frozen=True)
class Handles:
    """The deployments the services call: Serve handles (bound by the builder), or `LocalHandle`s
    over plain objects in one process (`Handles.local`)."""

    enhancer: Any
    generators: dict[str, Any]  # image model id -> its generator
    scorer: Any
    video_generators: dict[str, Any] = field(default_factory=dict)  # video model id -> its generator

    @classmethod
    def local(cls, enhancer, generators: dict, scorer, video_generators: dict | None = None) -> Handles:
        """Plain objects, each behind a `LocalHandle` (the benchmark's baseline, unit tests)."""
        return cls(LocalHandle(enhancer), {model: LocalHandle(each) for model, each in generators.items()},
                   LocalHandle(scorer),
                   {model: LocalHandle(each) for model, each in (video_generators or {}).items()})


@dataclass(frozen=True)
class Settings:
    """Everything the services, the Ingress and the JobRunner read from the config. Made by
    `from_args`, which AppArgs has already validated; it has no defaults of its own."""

    specs: dict[str, ModelSpec]  # what each served image model accepts, in config order
    default_model: str  # the image model a request gets when it names none
    policy: QualityPolicy
    gate_metrics: tuple[str, ...]  # the gate scores the deployed scorers compute
    scorers: tuple[dict, ...]  # each enabled scorer as GET /v1/models shows it (family, licence, metrics)
    blocklist: tuple[str, ...]
    loras: LoraRegistry
    request_timeout_s: float
    max_input_pixels: int
    video_models: dict[str, VideoModelEntry]  # the served video models by id; empty: images only
    default_video_model: str | None  # None only without video models
    scores: ScoresConfig
    fallback: FallbackConfig
    replicas: dict[str, int]  # each image model's deployment's replicas at most (the fallback's wait estimate)
    metrics: bool
    max_body_bytes: int
    auth: AuthConfig
    limits_storage: str
    jobs: JobsConfig
    job_slots: dict[str, int]
    admission: dict[str, tuple[int, float]]  # image model id -> (requests in flight at most, Retry-After s)
    # The profile's starting calibration for quality_percentile (policy.calibration, read here once).
    calibration: Calibration = field(default_factory=dict)

    @classmethod
    def from_args(cls, args: AppArgs) -> Settings:
        return cls(
            specs=model_specs(args),
            default_model=args.default_model_id,
            policy=args.policy,
            gate_metrics=args.gate_metrics(),
            scorers=tuple(get_scorer_family(entry.family).public(entry) for entry in args.served_scorers),
            blocklist=tuple(args.enhancer.blocklist),
            loras=lora_registry(args),
            request_timeout_s=args.request_timeout_s,
            max_input_pixels=args.max_input_pixels,
            video_models={entry.id: entry for entry in args.served_video_models},
            default_video_model=args.default_video_model_id,
            scores=args.scores,
            fallback=args.fallback,
            replicas={entry.id: entry.deployment.max_replicas for entry in args.served_image_models},
            metrics=args.metrics,
            max_body_bytes=args.max_body_bytes,
            auth=resolved_auth_config(args),
            limits_storage=args.limits_storage(),
            jobs=resolved_jobs_config(args),
            job_slots=job_slots(args),
            admission=admission_limits(args),
            calibration=load_calibration(args.policy.calibration),
        )


def model_specs(args: AppArgs) -> dict[str, ModelSpec]:
    """What each configured image model accepts, by id, in config order (the default first)."""
    return {entry.id: ModelSpec.of(entry) for entry in args.served_image_models}


def capacity(args: AppArgs, name: str, deployment) -> int:
    """Requests deployment `name` takes at once without queueing at Serve's router: replicas
    (max_replicas when autoscaling) x max_ongoing_requests, from the config or the decorator."""
    options = args.all_deployment_options().get(name, DeploymentOptions())
    replicas = options.autoscaling.max_replicas if options.autoscaling else options.num_replicas
    per_replica = options.max_ongoing_requests or deployment.max_ongoing_requests
    return (replicas or deployment.num_replicas) * per_replica


def admission_limits(args: AppArgs) -> dict[str, tuple[int, float]]:
    """Per image model with a bounded queue: what its deployment holds for one caller (its capacity
    plus max_queued_requests, which Serve counts per caller) and its Retry-After (services/admission.py)."""
    limits = {}
    for entry in args.served_image_models:
        options = args.all_deployment_options().get(entry.deployment_name, DeploymentOptions())
        if options.max_queued_requests in (None, -1):
            continue
        retry_after_s = DEFAULT_RETRY_AFTER_S if options.retry_after_s is None else options.retry_after_s
        limits[entry.id] = (capacity(args, entry.deployment_name, ImageGenerator) + options.max_queued_requests,
                            retry_after_s)
    return limits


def job_slots(args: AppArgs) -> dict[str, int]:
    """Jobs of each kind that run at once: the config's, else what the model deployment takes."""
    configured = args.jobs.max_concurrent_jobs
    # Image jobs may name any image model, so together they may use every image generator at once.
    image = sum(capacity(args, entry.deployment_name, ImageGenerator) for entry in args.served_image_models)
    slots = {"image": configured.image or image}
    if args.served_video_models:
        # Video jobs may name any video model, as image jobs any image model.
        video = sum(capacity(args, entry.deployment_name, VideoGenerator) for entry in args.served_video_models)
        slots["video"] = configured.video or video
    return slots


def resolved_jobs_config(args: AppArgs) -> JobsConfig:
    """The jobs config with data_dir made absolute."""
    return args.jobs.model_copy(update={"data_dir": str(Path(args.jobs.data_dir).expanduser().resolve())})


def lora_registry(args: AppArgs) -> LoraRegistry:
    """The LoRA registry, its directory made absolute like jobs.data_dir."""
    config = args.loras
    if config.dir is not None:
        config = config.model_copy(update={"dir": str(Path(config.dir).expanduser().resolve())})
    # The built-in families, and any a config entry names by import path.
    families = dict.fromkeys([*BUILTIN, *(entry.family for entry in args.served_image_models)])
    return LoraRegistry.from_config(config, families=list(families))


def resolved_auth_config(args: AppArgs) -> AuthConfig:
    """The auth config with keys_file made absolute. The file is read by each Ingress replica,
    which fails to start, saying why, if it is missing or broken (`genserve serve` checks it
    before deploying)."""
    auth = args.auth
    if auth.keys_file is None:
        return auth
    return auth.model_copy(update={"keys_file": str(Path(auth.keys_file).expanduser().resolve())})

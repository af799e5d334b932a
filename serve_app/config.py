"""The typed application config: what a Serve config's `args:` block may say.

`build_app(args)` validates `args` against `AppArgs`, so a bad config fails when it is loaded,
with pydantic naming the field (for example `policy.threshold`), instead of inside a replica.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Literal, get_args
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from deployments.config import (
    IMAGE_GENERATOR_MAX_ONGOING_REQUESTS,
    SCORER_MAX_ONGOING_REQUESTS,
    BatchingConfig,
    CombinedWeights,
    DeviceOptions,
    EnhancerConfig,
    GpuCard,
    ImageModelConfig,
    LoraConfig,
    ResidencyRoom,
    ScorerConfig,
    ScorerEntry,
    ScoringConfig,
    VideoModelConfig,
    clip_entry,
)
from deployments.families import ImageFamily, get_family, get_video_family
from deployments.families.video_base import VideoFamily
from deployments.names import GATE_METRICS, MAX_CANDIDATES, SCORE_RANGES, GateMetric
from deployments.runtime.memory_plan import CLIP_IMAGE_TOKENS, LLM_TOKENS, SCORE_BATCH, CardPlan
from deployments.scoring.families import get_scorer_family
from deployments.secrets import read_secret, warn_password_in_url

# The deployments every app has; image and video generators are named after their model ids
# (`generator_name`) and configured in their `image_models:` / `video_models:` entries.
DeploymentName = Literal["Ingress", "PromptEnhancer", "ClipScorer", "JobRunner"]
DEPLOYMENT_NAMES: tuple[str, ...] = get_args(DeploymentName)
# The `AppArgs` field holding each model deployment's model config (and so its device options); the
# ClipScorer's is every enabled `scorers:` entry (`AppArgs.scoring_config`).
MODEL_CONFIG_FIELDS = {"PromptEnhancer": "enhancer"}
# Top-level keys of the config shape before `image_models:`, and what replaced each.
REPLACED_KEYS = {
    "flux": "an image_models entry with family: flux (e.g. id: flux-schnell)",
    "sdxl": "an image_models entry with family: sdxl (its controlnets and depth_estimator go under options:)",
    "sdxl_turbo": "an image_models entry with family: sdxl and limits {max_steps: 4, max_guidance: 0}",
}
# Top-level keys of the config shape before `video_models:`.
REPLACED_VIDEO_KEYS = {
    "svd": "a video_models entry with family: svd (e.g. id: svd-xt; its memory: settings go under options:)",
}
_OLD_DEPLOYMENTS = {"FluxGenerator": "flux-schnell", "SdxlGenerator": "sdxl", "SdxlTurboGenerator": "sdxl-turbo"}
_OLD_VIDEO_DEPLOYMENTS = {"SvdGenerator": "svd-xt"}
# Ray keeps resource amounts to 1e-4; shares that sum to 1 in decimal must not fail in binary.
_SHARE_TOLERANCE = 1e-6


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AutoscalingOptions(_Strict):
    """Ray Serve autoscaling for one deployment (see Serve's `autoscaling_config`)."""

    min_replicas: int = Field(1, ge=0, description="Replicas kept even when idle.")
    max_replicas: int = Field(1, ge=1, description="Upper bound on replicas.")
    target_ongoing_requests: float = Field(2.0, gt=0, description="Ongoing requests per replica to aim for.")
    upscale_delay_s: float = Field(30.0, ge=0, description="Load must stay high this long before scaling up.")
    downscale_delay_s: float = Field(600.0, ge=0, description="Load must stay low this long before scaling down.")
    look_back_period_s: float | None = Field(
        None, gt=0, description="Window the load is averaged over; None keeps Serve's default (30 s)."
    )
    metrics_interval_s: float | None = Field(
        None,
        gt=0,
        description=(
            "How often replicas and handles report their load; None keeps Serve's default (10 s). "
            "Serve 2.60 marks it deprecated in favour of environment variables but still uses it."
        ),
    )

    @model_validator(mode="after")
    def _range(self) -> "AutoscalingOptions":
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) must not exceed max_replicas ({self.max_replicas})"
            )
        return self


DEFAULT_RETRY_AFTER_S = 5.0


class DeploymentOptions(_Strict):
    """Replicas and resources of one deployment. Unset fields keep the deployment's defaults."""

    num_replicas: int | None = Field(None, ge=1, description="Fixed replica count; exclusive with autoscaling.")
    autoscaling: AutoscalingOptions | None = Field(None, description="Autoscale instead of a fixed count.")
    num_cpus: float | None = Field(None, ge=0, description="CPUs reserved per replica.")
    num_gpus: float | None = Field(
        None,
        ge=0,
        description=(
            "Share of one GPU reserved per replica: 1 for a whole GPU, a fraction to pack replicas "
            "onto one card (their CUDA memory is then capped to the same fraction)."
        ),
    )
    accelerator_type: str | None = Field(
        None,
        min_length=1,
        description=(
            "Run replicas only on nodes with this GPU type, as Ray names it (H100, H200, L4, A10G, ...); "
            "keeps large models off small cards and small ones off the cards large models need."
        ),
    )
    resources: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources each replica asks for, e.g. {cpu_node: 1} to run only on nodes that "
                    "declare cpu_node (the clusters' CPU nodes, for the Ingress and JobRunner). CPUs and GPUs are "
                    "num_cpus and num_gpus.",
    )
    max_ongoing_requests: int | None = Field(None, ge=1, description="Requests a replica takes at once.")
    max_queued_requests: int | None = Field(
        None, ge=-1, description="Requests queued per caller before Serve answers 503; -1 is unbounded."
    )
    graceful_shutdown_timeout_s: float | None = Field(
        None, ge=0, description="How long a stopping replica lets its ongoing requests finish (Serve's default: 20)."
    )
    retry_after_s: float | None = Field(
        None, gt=0,
        description="Retry-After (seconds) on a rejection past max_queued_requests, through Serve's "
                    "BackpressureConfig; default 5 when max_queued_requests bounds the queue.",
    )

    @field_validator("resources")
    @classmethod
    def _custom_resources(cls, value: dict[str, float]) -> dict[str, float]:
        builtin = sorted(set(value) & {"CPU", "GPU", "memory", "object_store_memory"})
        if builtin:
            raise ValueError(f"resources holds custom resources only; {builtin} are set by num_cpus/num_gpus")
        negative = {name: amount for name, amount in value.items() if amount < 0}
        if negative:
            raise ValueError(f"resource amounts must not be negative; got {negative}")
        return value

    @field_validator("num_gpus")
    @classmethod
    def _one_gpu_at_most(cls, value: float | None) -> float | None:
        # Every model deployment runs its model on one device, so more than one GPU per replica
        # would be reserved and never used (and Ray rejects fractions above 1 only when it schedules).
        if value is not None and value > 1:
            raise ValueError(f"a replica runs its model on one GPU: use at most 1 (a fraction to share one); got {value:g}")
        return value

    @model_validator(mode="after")
    def _replicas_xor_autoscaling(self) -> "DeploymentOptions":
        if self.num_replicas is not None and self.autoscaling is not None:
            raise ValueError("set either num_replicas or autoscaling, not both")
        if self.accelerator_type is not None and not self.num_gpus:
            raise ValueError("accelerator_type picks a GPU type, so it needs num_gpus above 0")
        return self

    @property
    def max_replicas(self) -> int:
        """The most replicas this deployment can have: what must fit when load peaks."""
        if self.autoscaling is not None:
            return self.autoscaling.max_replicas
        return self.num_replicas or 1  # Serve's default is one replica

    def serve_options(self) -> dict:
        """Keyword arguments for `Deployment.options()`."""
        options: dict = {}
        if self.num_replicas is not None:
            options["num_replicas"] = self.num_replicas
        if self.autoscaling is not None:
            options["autoscaling_config"] = self.autoscaling.model_dump(exclude_none=True)
        actor = {
            key: getattr(self, key)
            for key in ("num_cpus", "num_gpus", "accelerator_type")
            if getattr(self, key) is not None
        }
        if self.resources:
            actor["resources"] = dict(self.resources)
        if actor:
            options["ray_actor_options"] = actor
        for key in ("max_ongoing_requests", "max_queued_requests", "graceful_shutdown_timeout_s"):
            if getattr(self, key) is not None:
                options[key] = getattr(self, key)
        if self.max_queued_requests not in (None, -1) or self.retry_after_s is not None:
            from ray.serve.config import BackpressureConfig

            # 503 (not 429): a full queue is the service's capacity, not this client's doing.
            retry_after_s = DEFAULT_RETRY_AFTER_S if self.retry_after_s is None else self.retry_after_s
            options["backpressure_config"] = BackpressureConfig(status_code=503, retry_after_s=retry_after_s)
        return options


def generator_name(model_id: str) -> str:
    """The Serve deployment of an image model: its id in CamelCase + 'Generator' (sdxl-turbo ->
    SdxlTurboGenerator), so it reads like the other deployments in `serve status` and metrics."""
    return "".join(part.capitalize() for part in re.split(r"[.-]", model_id)) + "Generator"


def _family_method(name: str):
    """`entry.<name>()` as entries had it while the config resolved its own family: the family
    computes it now (`entry.model_family.<name>(entry)`); this stand-in warns and asks it."""

    def method(self):
        warnings.warn(f"{type(self).__name__}.{name}() is deprecated: use entry.model_family.{name}(entry)",
                      DeprecationWarning, stacklevel=2)
        return getattr(self.model_family, name)(self)

    method.__name__ = method.__qualname__ = name
    return method


class ImageModelEntry(ImageModelConfig):
    """An `image_models:` entry: the model (see ImageModelConfig) and its deployment's options,
    checked against its family when the config loads."""

    max_pixel_steps: int | None = Field(
        None, ge=1,
        description="Compute budget of one request: width x height x num_inference_steps x num_images x "
                    "max_attempts (rounds) at most this; over it is 422 naming the fields. None: no budget "
                    "beyond each field's own limit.",
    )

    deployment: DeploymentOptions = Field(
        default_factory=DeploymentOptions,
        description="Replicas, GPU share, autoscaling and queue bounds of this model's deployment "
                    "(named generator_name(id), e.g. FluxSchnellGenerator).",
    )
    enabled: bool = Field(
        True,
        description="false: an optional entry, checked when the config loads but not deployed (a model the "
                    "profile can serve once something else makes room for it).",
    )

    @property
    def deployment_name(self) -> str:
        return generator_name(self.id)

    @property
    def model_family(self) -> ImageFamily:
        return get_family(self.family)

    @field_validator("family")
    @classmethod
    def _known_family(cls, value: str) -> str:
        get_family(value)  # UnknownFamily (a ValueError) lists the known ones
        return value

    @model_validator(mode="after")
    def _fits_family(self) -> "ImageModelEntry":
        self.model_family.check_entry(self)
        return self

    # Entries computed these themselves while the config resolved its own family; kept, with a warning.
    step_limits = _family_method("step_limits")
    guidance_limits = _family_method("guidance_limits")
    steps_default = _family_method("steps_default")
    guidance_default = _family_method("guidance_default")
    size_default = _family_method("size_default")

    @model_validator(mode="after")
    def _batches_can_fill(self) -> "ImageModelEntry":
        _check_batches_fit(self.batching, self.deployment.max_ongoing_requests or IMAGE_GENERATOR_MAX_ONGOING_REQUESTS,
                           "deployment.max_ongoing_requests")
        return self


def _check_batches_fit(batching: BatchingConfig, per_replica: int, field: str, batching_field: str = "batching") -> None:
    if batching.enabled and per_replica < batching.max_batch_images:
        raise ValueError(
            f"{field} ({per_replica}) is below {batching_field}.max_batch_images ({batching.max_batch_images}): "
            "a replica would never hold enough requests to fill a batch"
        )


class VideoModelEntry(VideoModelConfig):
    """A `video_models:` entry: the model (see VideoModelConfig) and its deployment's options,
    checked against its family when the config loads."""

    max_pixel_frame_steps: int | None = Field(
        None, ge=1,
        description="Compute budget of one request: width x height x num_frames x num_inference_steps at most "
                    "this; over it is 422 naming the fields. None: no budget beyond each field's own limit.",
    )

    deployment: DeploymentOptions = Field(
        default_factory=DeploymentOptions,
        description="Replicas, GPU share, autoscaling and queue bounds of this model's deployment "
                    "(named generator_name(id), e.g. SvdXtGenerator).",
    )
    enabled: bool = Field(True, description="false: an optional entry, checked when the config loads but not deployed.")

    @property
    def deployment_name(self) -> str:
        return generator_name(self.id)

    @property
    def model_family(self) -> VideoFamily:
        return get_video_family(self.family)

    @field_validator("family")
    @classmethod
    def _known_family(cls, value: str) -> str:
        get_video_family(value)
        return value

    @model_validator(mode="after")
    def _fits_family(self) -> "VideoModelEntry":
        self.model_family.check_entry(self)
        return self

    # Entries computed these themselves while the config resolved its own family; kept, with a warning.
    size_default = _family_method("size_default")
    frames_default = _family_method("frames_default")
    fps_default = _family_method("fps_default")
    steps_default = _family_method("steps_default")


def _default_image_models() -> list[ImageModelEntry]:
    return [ImageModelEntry(id="flux-schnell", family="flux", source="black-forest-labs/FLUX.1-schnell",
                            default_steps=4, limits={"max_steps": 4, "max_guidance": 0})]


def _default_scorers() -> list[ScorerEntry]:
    return [ScorerEntry(family="clip", source="openai/clip-vit-large-patch14")]


def _replace_scorer_block(data: dict) -> dict:
    """The old `scorer:` block as the one `scorers:` entry of family clip (its batching under
    `scores.batching`), with a DeprecationWarning naming the replacement."""
    if "scorer" not in data:
        return data
    data = dict(data)
    old = ScorerConfig.model_validate(data.pop("scorer"))
    warnings.warn("the `scorer:` config block is deprecated: list scorers under `scorers:` instead (an entry "
                  "{family: clip, source, device, options: {laion, aspects, ...}}; batching under "
                  "`scores.batching`); see docs/configuration.md", DeprecationWarning, stacklevel=2)
    if "scorers" in data:
        raise ValueError("give `scorers:` only: the deprecated `scorer:` block cannot be combined with it")
    data["scorers"] = [clip_entry(old)]
    if "batching" in old.model_fields_set:
        scores = data.get("scores") or {}
        scores = scores.model_dump(exclude_unset=True) if isinstance(scores, BaseModel) else dict(scores)
        data["scores"] = {**scores, "batching": old.batching}
    return data


class QualityPolicy(_Strict):
    """When a result is good enough, and how hard to try before returning the best one."""

    metric: GateMetric = Field(
        "aesthetic",
        description="Score that gates regeneration: aesthetic (0-1), alignment (0-100), laion (1-10) or "
                    "combined (0-1, a weighted mean of the others scaled to 0-1).",
    )
    threshold: float = Field(0.0, ge=0, description="An image passes when its gating score is at least this.")
    weights: CombinedWeights | None = Field(
        None,
        description="Weights of the combined score (aesthetic, alignment, laion; unset ones are 0). None: "
                    "equal weights over the scores the scorer computes (laion only when its head is enabled).",
    )
    max_attempts: int = Field(1, ge=1, le=5, description="Generation rounds per request, the first included.")
    revise_prompt: bool = Field(
        False,
        description="Regenerate with feedback: before each later round, the enhancer rewrites the prompt to fix "
                    "the weakest aspect scores. False: a new seed with the same prompt.",
    )
    max_candidates: int = Field(
        8, ge=1, le=MAX_CANDIDATES,
        description="The most images one best-of-N request (`candidates`) may generate per round.",
    )
    calibration: str | None = Field(
        None,
        description="A starting calibration for quality_percentile: a JSON file of score histograms per model "
                    "and metric (`genserve calibrate` writes one). Scores the server sees are added to it. "
                    "None: percentiles work once a model has scored enough images.",
    )

    @model_validator(mode="after")
    def _threshold_in_metric_range(self) -> "QualityPolicy":
        check_threshold(self.metric, self.threshold)
        return self


def gpu_memory_fraction(num_gpus: float | None) -> float | None:
    """The CUDA memory cap for a replica reserving `num_gpus`: the share itself when it is a
    fraction of a GPU; None for a whole GPU (no one else is scheduled on it) or for no GPU."""
    if num_gpus is None or not 0 < num_gpus < 1:
        return None
    return num_gpus


def unplaced_gpu_replicas(replicas: list[tuple[str, float, str | None]], capacity: Mapping[str, int]) -> list[str]:
    """Pack GPU replicas onto the declared GPUs; return the deployment names of those left over.

    `replicas` holds one (deployment, share of one GPU, accelerator type or None) per replica;
    `capacity` maps an accelerator type to a count of GPUs (GPUs under a key no replica is pinned
    to, such as 'any', take unpinned replicas only). A pinned replica goes only on GPUs of its
    type; an unpinned one on any GPU. Like Ray, a replica never spans GPUs.
    First-fit decreasing, pinned replicas first since they have fewer places to go: it can miss
    a packing that exists, but a layout that needs an exact packing also depends on the order in
    which Ray happens to start replicas.
    """
    return pack_gpu_replicas(replicas, capacity)[1]


def pack_gpu_replicas(replicas: list[tuple[str, float, str | None]],
                      capacity: Mapping[str, int]) -> tuple[list[tuple[str, list[tuple[str, float]]]], list[str]]:
    """`unplaced_gpu_replicas`' packing: each declared GPU as (its key, [(deployment, share), ...]),
    and the deployments of the replicas left over."""
    gpus: list[tuple[str, list[tuple[str, float]]]] = [(kind, []) for kind, count in capacity.items()
                                                        for _ in range(count)]
    left = []
    for name, share, kind in sorted(replicas, key=lambda replica: (replica[2] is None, -replica[1])):
        gpu = next((gpu for gpu in gpus if kind in (None, gpu[0])
                    and 1.0 - sum(held for _, held in gpu[1]) + _SHARE_TOLERANCE >= share), None)
        if gpu is None:
            left.append(name)
        else:
            gpu[1].append((name, share))
    return gpus, left


def check_threshold(metric: str, threshold: float) -> None:
    low, high = SCORE_RANGES[metric]
    if not low <= threshold <= high:
        raise ValueError(f"threshold for metric {metric!r} must be between {low:g} and {high:g}; got {threshold:g}")


class JobSlots(_Strict):
    """How many jobs of each kind run at once; more wait as `queued`.

    Unset means what the model deployment takes at once without queueing at Serve's router:
    replicas (max_replicas when autoscaling) x max_ongoing_requests. Jobs beyond that would
    only wait inside Serve, where nobody sees them; here they wait in the job queue instead.
    """

    image: int | None = Field(
        None, ge=1, description="Image jobs running at once (the image generators' capacities added up if unset)."
    )
    video: int | None = Field(
        None, ge=1, description="Video jobs running at once (the video generators' capacities added up if unset)."
    )


class WebhooksConfig(_Strict):
    """Signed webhooks and A2A push notifications, delivered durably from the job store."""

    allow_http: bool = Field(False, description="Deliver to http:// URLs too (default: https only).")
    allowed_hosts: tuple[str, ...] = Field(
        (), description="Host names or IP addresses that may be delivered to although they are (or resolve to) "
                        "loopback, private, link-local or metadata addresses (refused otherwise), e.g. a receiver "
                        "in the same cluster.")
    timeout_s: float = Field(10.0, gt=0, description="Time limit of one delivery attempt (connect, send, answer).")
    max_response_bytes: int = Field(
        64 * 1024, ge=0, description="Most of a receiver's answer that is read; the rest is dropped unread.")
    max_in_flight_per_key: int = Field(
        8, ge=1, description="Deliveries in flight at once for one API key (the others wait their turn).")
    first_retry_s: float = Field(5.0, gt=0, description="Wait before the first retry; it doubles after each failure.")
    max_retry_s: float = Field(3600.0, gt=0, description="Longest wait between two attempts.")
    give_up_after_s: float = Field(
        86400.0, gt=0, description="A delivery still failing this long after the job ended is marked failed.")
    poll_interval_s: float = Field(1.0, gt=0, description="How often the runner looks for deliveries due.")
    secret_env: str | None = Field(
        "GENSERVE_WEBHOOK_SECRET", min_length=1,
        description="Without API keys: the environment variable holding the signing secret (whsec_...), read on "
                    "each replica. With keys, each key's own webhook_secret (genserve keys create) signs.")
    secret_file: str | None = Field(
        None, min_length=1, description="A file holding the signing secret (a mounted Secret); wins over secret_env.")
    public_url: str | None = Field(
        None, description="The service's public base URL (https://genserve.example.com), put before the signed "
                          "result URLs in webhook bodies; unset: the URLs are paths.")

    def secret(self) -> str | None:
        """The service's signing secret (no keys), from secret_file or $secret_env where this runs."""
        return read_secret(self.secret_env, self.secret_file, field="jobs.webhooks.secret")


class FairnessConfig(_Strict):
    """Weighted fair queueing across keys (docs/jobs.md#fair-between-keys): weights come from the
    keys file (`groups:`, a key's `weight`); these are the time constants."""

    half_life_s: float = Field(
        300.0, gt=0,
        description="A finished job's GPU-seconds count half as much after this long: how far back 'recent GPU "
                    "time' reaches when the next job is chosen.")
    priority_age_s: float = Field(
        120.0, ge=0,
        description="Within a key, a `high` job goes ahead of `normal` ones submitted up to this long before it, "
                    "and a `low` job is passed only by jobs submitted less than this long after it: its bound.")
    sync: bool = Field(
        True, description="Synchronous POST /v1/images takes its turn in the same fair order as jobs (a job slot, "
                          "held while it runs) when jobs are queued; false: it goes straight to the model.")
    sync_max_wait_s: float = Field(
        60.0, gt=0,
        description="Longest a synchronous request waits for its turn; then 503 with Retry-After.")


class JobsConfig(_Strict):
    """Durable async jobs (POST /v1/jobs): where the records live and how jobs are run."""

    # A rejected input is not printed: it can hold a Redis password (redis_url, limits_storage).
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    store: Literal["sqlite", "redis"] = Field(
        "sqlite", description="'sqlite': a file in data_dir, no server (one node). 'redis': records and files in Redis."
    )
    data_dir: str = Field(
        "./data/jobs", min_length=1,
        description="SQLite database and result files. A relative path is resolved where the app is built "
                    "(the directory `serve run` starts in); the JobRunner's node must see it.",
    )
    redis_url: str | None = Field(
        None, description="redis://host:port/db (or rediss://, unix://), for store: redis. Its password comes from "
                          "redis_password_env or redis_password_file, not from here.")
    redis_password_env: str | None = Field(
        "GENSERVE_REDIS_PASSWORD", min_length=1,
        description="The environment variable holding the Redis password (jobs, and the rate-limit counters on "
                    "the same server), read on each replica: never a deployment argument. Unset or empty: none.")
    redis_password_file: str | None = Field(
        None, min_length=1, description="A file holding the Redis password (a mounted Secret); read on each "
                                        "replica. Wins over redis_password_env.")
    redis_prefix: str = Field("genserve:jobs", min_length=1, description="Prefix of every Redis key the store writes.")
    redis_config_check: Literal["refuse", "warn"] = Field(
        "refuse",
        description="At start the Redis store checks appendonly yes and maxmemory-policy noeviction and refuses a "
                    "server without them. Where CONFIG GET is forbidden (managed Redis): 'refuse' (default), or "
                    "'warn' to log it and go on when the provider guarantees both.",
    )
    redis_timeout_s: float = Field(10.0, gt=0, description="Redis socket timeout; connecting times out at half of it.")
    runner_lease_s: float = Field(
        30.0, ge=3,
        description="The job runner's lease on the store (both stores), renewed every third of it; a failed renew "
                    "is retried at once. Only its holder claims and records jobs (a runner that lost it writes "
                    "nothing); a standby runner (the replica Serve starts beside a draining one, a second cluster "
                    "on the same Redis) takes over at most this long after the holder dies, within a third of it "
                    "after it stops. More than twice redis_timeout_s, so one renew that times out does not lose it.",
    )
    ttl_s: float = Field(86400.0, gt=0, description="Finished jobs, and their files, are deleted this long after they end.")
    retry_limit: int = Field(
        2, ge=0, le=10,
        description="Re-runs of a job whose run failed or was interrupted (a replica died, the app restarted) "
                    "before it is marked failed with the reasons.",
    )
    max_concurrent_jobs: JobSlots = Field(default_factory=JobSlots, description="Jobs running at once, per kind.")
    sweep_interval_s: float = Field(60.0, gt=0, description="How often expired jobs are deleted.")
    max_event_streams: int = Field(
        256, ge=1, description="Open job event streams per ingress replica; one more gets 503 with Retry-After.")
    max_event_streams_per_client: int = Field(
        16, ge=1, description="Open job event streams per client address per ingress replica; one more gets 429.")
    event_stream_max_s: float = Field(
        3600.0, gt=0,
        description="Longest an event stream stays open; the client reconnects with Last-Event-ID and misses nothing "
                    "of the final state.",
    )
    max_queued_jobs: int = Field(
        10_000, ge=1,
        description="Most jobs waiting at once; a submit past it gets 429 with Retry-After (checked before the "
                    "job is recorded, so concurrent submits can pass it by a few).",
    )
    max_request_bytes: int = Field(
        16 * 1024 * 1024, ge=1024,
        description="Largest stored job request (its JSON, control image included); larger ones get 413.",
    )
    queued_ttl_s: float = Field(
        86400.0, gt=0,
        description="A job still queued this long after its submit fails as expired (its client has most likely "
                    "given up), checked every sweep_interval_s.",
    )
    progress_interval_s: float = Field(
        0.5, ge=0,
        description="Least time between two progress reports of a running job (0: every denoising step). "
                    "Each report is a Serve call and a store write; steps shorter than this are skipped.",
    )
    webhooks: WebhooksConfig = Field(default_factory=WebhooksConfig,
                                     description="Webhooks and A2A push notifications: safety, retries, secret.")
    fairness: FairnessConfig = Field(default_factory=FairnessConfig,
                                     description="How jobs (and sync requests) of different keys share the models.")

    @model_validator(mode="after")
    def _lease_outlasts_a_slow_renew(self) -> "JobsConfig":
        if self.runner_lease_s <= 2 * self.redis_timeout_s:
            raise ValueError(f"runner_lease_s ({self.runner_lease_s:g}) must be more than twice redis_timeout_s "
                             f"({self.redis_timeout_s:g}): the lease is renewed every third of it and a renew that "
                             "times out is retried at once, a third of the lease plus one timeout after the last "
                             "renew; more than twice the timeout leaves that retry a third of a timeout or more "
                             "before the lease ends")
        return self

    def redis_password(self) -> str | None:
        """The Redis password from redis_password_file or $redis_password_env, where this runs."""
        return read_secret(self.redis_password_env, self.redis_password_file, field="jobs.redis_password")

    @model_validator(mode="after")
    def _redis_needs_url(self) -> "JobsConfig":
        if self.store == "redis" and not self.redis_url:
            raise ValueError("store 'redis' needs redis_url, e.g. redis://127.0.0.1:6379/0")
        if self.redis_url is not None and not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            scheme = self.redis_url.split("://", 1)[0] if "://" in self.redis_url else "no scheme"
            raise ValueError(f"redis_url must start with redis://, rediss:// or unix://; got {scheme}")
        # It still works (the URL carries it), but every deployment argument shows the URL.
        warn_password_in_url(self.redis_url, "jobs.redis_url", "jobs.redis_password", self.redis_password_env)
        return self


def redis_server(url: str) -> tuple:
    """The Redis server a URL names, not which database in it: host and port, or a socket's path."""
    split = urlsplit(url)
    if split.hostname is None:
        return ("socket", split.path)
    return (split.hostname, split.port or 6379)


class ClientLimits(_Strict):
    """Limits per client on synchronous requests: the fair share of one caller when the service is busy."""

    concurrent_requests: int | None = Field(
        None, ge=1,
        description="Synchronous requests one client has in flight at once; an API key's own "
                    "limits.concurrent_requests, when set, replaces it for that key. None: no limit.",
    )
    requests_per_minute: int | None = Field(
        None, ge=1,
        description="Synchronous requests one client sends in any 60 s (a moving window; besides a key's own "
                    "requests_per_minute, which counts every request). None: no limit.",
    )


class AuthConfig(_Strict):
    """Who may call the HTTP API (docs/security.md)."""

    # A rejected input is not printed: it can hold a Redis password (redis_url, limits_storage).
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    keys_file: str | None = Field(
        None, min_length=1,
        description="YAML file of API keys (SHA-256 hashes, scopes, limits); re-read when it changes. "
                    "A relative path is resolved where the app is built. Unset: no keys.",
    )
    allow_unauthenticated: bool = Field(
        False,
        description="With no keys_file, answer clients on any address, deliberately open: every caller is one owner "
                    "with the generate and read scopes (never admin); per-address client_limits still apply. Off: only "
                    "callers on this machine, not forwarded by a proxy, are answered (others get 403 saying how to "
                    "add keys).",
    )
    cors_origins: list[str] = Field(
        default_factory=list, description="Origins browsers may call the API from (CORS). Empty: CORS off.")
    docs: bool | None = Field(
        None,
        description="Serve the API docs pages (/docs Swagger UI, /redoc), which load their scripts from a CDN "
                    "onto the console's origin, and /openapi.json without a key. Unset: on without keys_file, "
                    "off with it (then /openapi.json needs an admin key).",
    )
    limits_storage: str | None = Field(
        None, min_length=1,
        description="Where per-key rate-limit counters live, as a `limits` storage URI (memory://, "
                    "redis://host:port/db, no password in it). Default: jobs.redis_url when jobs.store is redis, "
                    "else memory://, which more than one Ingress replica accepts only when set explicitly.",
    )
    limits_storage_password_env: str | None = Field(
        "GENSERVE_LIMITS_REDIS_PASSWORD", min_length=1,
        description="The environment variable holding the password of a Redis for the counters other than the job "
                    "store's (another host or port; on the job store's server they use jobs.redis_password_env or "
                    "_file), read on each Ingress replica: never a deployment argument. Unset or empty: none.",
    )
    limits_storage_password_file: str | None = Field(
        None, min_length=1,
        description="A file holding that password (a mounted Secret), read on each Ingress replica. Wins over "
                    "limits_storage_password_env.",
    )
    signed_url_ttl_s: float = Field(3600.0, gt=0, le=7 * 86400,
                                    description="How long a signed job file URL stays valid (while its key does).")
    signed_downloads_per_minute: int | None = Field(
        600, ge=1,
        description="Signed file URL downloads (sent without a key) one client address may make in any 60 s; 429 "
                    "past it. None: no limit.",
    )
    client_limits: ClientLimits = Field(
        default_factory=ClientLimits,
        description="Per-client limits on synchronous requests (every non-GET outside /v1/jobs and /v1/admin): a "
                    "client is its API key, or its remote address when it sends none; 429 with Retry-After past them.",
    )
    trusted_proxies: list[str] = Field(
        default_factory=list,
        description="Addresses or networks (10.0.0.0/8; never a /0) of reverse proxies or load balancers whose "
                    "X-Forwarded-For names the client: its address then counts as the client's (per-address limits). "
                    "A forwarded request is never a local caller. Needs keys_file or allow_unauthenticated. Empty: "
                    "the client is the peer Ray's HTTP proxy reports (which itself applies X-Forwarded-For sent from "
                    "127.0.0.1 or ::1).",
    )

    @property
    def docs_served(self) -> bool:
        """Whether the app serves the docs pages: `docs` if set, else only without keys."""
        return self.keys_file is None if self.docs is None else self.docs

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        import ipaddress

        for entry in value:
            try:
                network = ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ValueError(f"trusted_proxies: {entry!r} is not an IP address or network (10.0.0.0/8)") from None
            if network.prefixlen == 0:
                raise ValueError(f"trusted_proxies: {entry!r} trusts every address, so any client could name "
                                 "itself; list the proxies' own addresses or networks") from None
        return value

    @model_validator(mode="after")
    def _proxies_need_keys_or_open(self) -> "AuthConfig":
        # Without keys, who may call is decided by address alone; a trusted X-Forwarded-For lets
        # a proxy's clients pick the address they are counted as, so it must be a deliberate choice.
        if self.trusted_proxies and self.keys_file is None and not self.allow_unauthenticated:
            raise ValueError("trusted_proxies needs API keys (auth.keys_file), or auth.allow_unauthenticated: true "
                             "for a service deliberately open to every client the proxies forward")
        return self

    @model_validator(mode="after")
    def _no_password_in_limits_storage(self) -> "AuthConfig":
        # It still works (the URI carries it), but every deployment argument shows the URI.
        warn_password_in_url(self.limits_storage, "auth.limits_storage", "auth.limits_storage_password",
                             self.limits_storage_password_env)
        return self

    def limits_storage_password(self, jobs: JobsConfig) -> str | None:
        """The counters' Redis password, read where this runs: on the job store's Redis server (the default,
        or the same host and port) the job store's; on another, limits_storage_password_file or _env."""
        if self.limits_storage is None:
            return jobs.redis_password() if jobs.store == "redis" else None
        if self.limits_storage.startswith("memory"):
            return None
        if jobs.store == "redis" and redis_server(self.limits_storage) == redis_server(jobs.redis_url):
            return jobs.redis_password()
        return read_secret(self.limits_storage_password_env, self.limits_storage_password_file,
                           field="auth.limits_storage_password")

    @property
    def limits_clients(self) -> bool:
        """Whether any per-client limit is set (the limiter then runs without keys too)."""
        return self.client_limits.concurrent_requests is not None or self.client_limits.requests_per_minute is not None


class FallbackConfig(_Strict):
    """Hybrid serving: a remote OpenAI-compatible images endpoint that may serve an image request
    when the local model cannot take it. Off unless `enabled`; a request opts in with `fallback: true`,
    because its prompt then goes to a third party."""

    enabled: bool = Field(False, description="Allow requests that ask for it (`fallback: true`) to go remote.")
    base_url: str = Field(
        "https://api.openai.com/v1", min_length=1,
        description="The remote API's base URL; requests go to POST {base_url}/images/generations.",
    )
    model: str = Field("gpt-image-1", min_length=1, description="The remote model, sent as `model`.")
    api_key_env: str | None = Field(
        "GENSERVE_FALLBACK_API_KEY",
        description="Environment variable holding the remote API key (read on each ingress replica); "
                    "null (and no api_key_file) sends no key. The key itself never goes in a config.",
    )
    api_key_file: str | None = Field(
        None, min_length=1,
        description="A file holding the remote API key (a mounted Secret), read on each ingress replica. Wins over "
                    "api_key_env.",
    )
    max_estimated_wait_s: float | None = Field(
        None, gt=0,
        description="Also go remote when the local model's estimated wait exceeds this many seconds "
                    "(docs/client.md says how it is estimated); null: only when the model rejects for back-pressure.",
    )
    response_format: Literal["b64_json"] | None = Field(
        None,
        description="b64_json: sent as `response_format`, for endpoints that return URLs unless asked (dall-e "
                    "models, many OpenAI-compatible servers); null omits it (gpt-image models always return base64).",
    )
    timeout_s: float = Field(120.0, gt=0, description="How long one remote call may take before answering 504.")


class ScoresConfig(_Strict):
    """`POST /v1/scores` budgets: the pixels one request's uploads may hold in all (docs/operations.md);
    and how the scorer deployment batches concurrent score calls."""

    video_frames: int = Field(
        4, ge=0, le=32,
        description="Frames of each generated video the scorers see (evenly spaced, first and last included): "
                    "scored against its prompt, and compared frame to frame (temporal consistency); 0: videos are "
                    "not scored.",
    )
    batching: BatchingConfig = Field(
        default_factory=BatchingConfig,
        description="Batch concurrent score calls (the graph's and /v1/scores') into one forward pass per scorer; "
                    "default off.",
    )
    pixel_budget: int = Field(
        16 * 1024 * 1024, ge=65536,
        description="Pixels the images of one request are scored at, in all: over it, each is decoded to a copy "
                    "scaled down by one common factor (never below the CLIP input size on its shorter side). "
                    "CLIP scores keep their meaning (CLIP itself resizes to its input size); perceptual sharpness "
                    "is then the scored copy's.",
    )
    max_total_pixels: int = Field(
        64 * 1024 * 1024, ge=65536,
        description="Pixels the images of one request may declare in all (width x height, read from their "
                    "headers before decoding); over it is 422 naming `images`.",
    )

    @model_validator(mode="after")
    def _budget_within_cap(self) -> "ScoresConfig":
        if self.pixel_budget > self.max_total_pixels:
            raise ValueError(f"pixel_budget ({self.pixel_budget}) must not exceed max_total_pixels "
                             f"({self.max_total_pixels})")
        return self


class AppArgs(_Strict):
    """Everything `configs/*.yaml` choose: model sources, defaults, quality policy, scaling."""

    # A rejected input is not printed: it can hold a Redis password (redis_url, limits_storage).
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    image_models: list[ImageModelEntry] = Field(
        default_factory=_default_image_models, min_length=1,
        description="The image models served, one deployment each; requests name them by id.",
    )
    default_model: str | None = Field(
        None, description="The image model requests get when they name none; default: the first of image_models."
    )
    scorers: list[ScorerEntry] = Field(
        default_factory=_default_scorers, min_length=1,
        description="The scorers (deployments/scoring/families: clip, hps, pickscore), all loaded by the ClipScorer "
                    "deployment; their metrics are the gate's (docs/configuration.md, 'Scorers').",
    )
    enhancer: EnhancerConfig = Field(default_factory=EnhancerConfig, description="The prompt enhancer.")
    video_models: list[VideoModelEntry] = Field(
        default_factory=list,
        description="The video models served (svd, ltx, ...), one deployment each; empty: images only.",
    )
    default_video_model: str | None = Field(
        None, description="The video model requests get when they name none; default: the first of video_models."
    )
    policy: QualityPolicy = Field(default_factory=QualityPolicy, description="Default quality gate.")
    loras: LoraConfig = Field(default_factory=LoraConfig, description="LoRA adapters requests may name.")
    max_input_pixels: int = Field(
        4096 * 4096, ge=65536, description="Largest uploaded image (width x height), checked before decoding."
    )
    metrics: bool = Field(True, description="Record the genserve_* metrics (Ray exports them with a ray_ prefix).")
    request_timeout_s: float = Field(
        600.0, gt=0, description="How long the ingress waits for one downstream call before answering 504."
    )
    gpu_capacity: dict[str, int] = Field(
        default_factory=dict,
        description=(
            "GPUs the cluster has at its largest, by accelerator type (key 'any' for GPUs no deployment "
            "pins by type), e.g. {H100: 4, L4: 4} or {any: 1}. When set, loading the config checks that "
            "every deployment's GPU share fits at max replicas, instead of replicas pending forever."
        ),
    )
    gpu: GpuCard | None = Field(
        None,
        description="The one card this profile runs on (a workstation: {name: rtx-4090, memory_gib: 24}). When set, "
                    "loading the config checks the memory plan of every GPU model against it (docs/gpu.md) and fails "
                    "naming the model, its GiB and the card.",
    )
    scores: ScoresConfig = Field(default_factory=ScoresConfig, description="Pixel budgets of POST /v1/scores.")
    max_body_bytes: int = Field(
        64 * 1024 * 1024, ge=1024,
        description="Largest request body the ingress reads (bytes); larger ones get 413 before they are parsed.",
    )
    jobs: JobsConfig = Field(default_factory=JobsConfig, description="Durable async jobs.")
    auth: AuthConfig = Field(default_factory=AuthConfig, description="API keys, limits and CORS.")
    fallback: FallbackConfig = Field(
        default_factory=FallbackConfig, description="A remote images endpoint for peaks (off by default)."
    )
    deployments: dict[DeploymentName, DeploymentOptions] = Field(
        default_factory=dict,
        description="Replicas and resources of the deployments other than the image generators (theirs are "
                    "in their image_models entries), by deployment name.",
    )

    @model_validator(mode="before")
    @classmethod
    def _no_old_keys(cls, data):
        if not isinstance(data, dict):
            return data
        data = _replace_scorer_block(data)
        for key, replacement in REPLACED_KEYS.items():
            if key in data:
                raise ValueError(f"`{key}:` is no longer read: use `image_models:` instead, {replacement}; "
                                 "see docs/configuration.md")
        for key, replacement in REPLACED_VIDEO_KEYS.items():
            if key in data:
                raise ValueError(f"`{key}:` is no longer read: use `video_models:` instead, {replacement}; "
                                 "see docs/video.md")
        for name, model_id in _OLD_VIDEO_DEPLOYMENTS.items():
            if name in (data.get("deployments") or {}):
                raise ValueError(f"deployments.{name} is no longer read: a video model's deployment options go "
                                 f"in its video_models entry, under `deployment:` (e.g. the entry with id {model_id})")
        for name, model_id in _OLD_DEPLOYMENTS.items():
            if name in (data.get("deployments") or {}):
                raise ValueError(f"deployments.{name} is no longer read: an image model's deployment options go "
                                 f"in its image_models entry, under `deployment:` (e.g. the entry with id {model_id})")
        return data

    @model_validator(mode="after")
    def _image_models_unique(self) -> "AppArgs":
        if not self.served_image_models:
            raise ValueError("image_models: at least one entry must be enabled")
        entries = [*self.image_models, *self.video_models]
        names = [entry.deployment_name for entry in entries]
        ids = [entry.id for entry in entries]
        repeated = sorted({model_id for model_id in ids if ids.count(model_id) > 1})
        if repeated:
            raise ValueError(f"image_models and video_models ids must be unique together; repeated: {repeated}")
        clashing = sorted({name for name in names if names.count(name) > 1 or name in DEPLOYMENT_NAMES})
        if clashing:
            raise ValueError(f"model ids give clashing deployment names {clashing}: pick ids that differ in "
                             "more than '-' versus '.'")
        videos = [entry.id for entry in self.served_video_models]
        if self.default_video_model is not None and self.default_video_model not in videos:
            raise ValueError(f"default_video_model {self.default_video_model!r} is not an enabled video_models id; "
                             f"ids: {videos}")
        served = [entry.id for entry in self.served_image_models]
        if self.default_model is not None and self.default_model not in served:
            raise ValueError(f"default_model {self.default_model!r} is not an enabled image_models id; ids: {served}")
        return self

    @property
    def served_image_models(self) -> list[ImageModelEntry]:
        """The image models deployed: the entries not marked `enabled: false`."""
        return [entry for entry in self.image_models if entry.enabled]

    @property
    def default_model_id(self) -> str:
        return self.default_model or self.served_image_models[0].id

    @property
    def served_video_models(self) -> list[VideoModelEntry]:
        """The video models deployed: the entries not marked `enabled: false`."""
        return [entry for entry in self.video_models if entry.enabled]

    @property
    def default_video_model_id(self) -> str | None:
        served = self.served_video_models
        return self.default_video_model or (served[0].id if served else None)

    def all_deployment_options(self) -> dict[str, DeploymentOptions]:
        """Options of every deployment, the image and video generators' included, by deployment name."""
        served = {entry.deployment_name: entry.deployment
                  for entry in [*self.served_image_models, *self.served_video_models]}
        return {**self.deployments, **served}

    @field_validator("loras")
    @classmethod
    def _hub_families_known(cls, value: LoraConfig) -> LoraConfig:
        for index, entry in enumerate(value.hub):
            try:
                get_family(entry.family)
            except ValueError as error:  # UnknownFamily lists the known ones
                raise ValueError(f"hub.{index}.family: {error}") from None
        return value

    @field_validator("gpu_capacity")
    @classmethod
    def _counts_not_negative(cls, value: dict[str, int]) -> dict[str, int]:
        negative = {kind: count for kind, count in value.items() if count < 0}
        if negative:
            raise ValueError(f"GPU counts must not be negative; got {negative}")
        return value

    @model_validator(mode="after")
    def _gpu_shares_fit(self) -> "AppArgs":
        capacity = self.gpu_capacity
        deployments = self.all_deployment_options()
        if not capacity:  # nothing declared: nothing to check
            return self
        replicas = [
            (name, options.num_gpus, options.accelerator_type)
            for name, options in deployments.items()
            if options.num_gpus
            for _ in range(options.max_replicas)
        ]
        left = unplaced_gpu_replicas(replicas, capacity)
        if left:
            demand = ", ".join(
                f"{name} {options.max_replicas} x {options.num_gpus:g}"
                + (f" {options.accelerator_type}" if options.accelerator_type else "")
                for name, options in deployments.items()
                if options.num_gpus
            )
            short = ", ".join(f"{name} x{left.count(name)}" for name in dict.fromkeys(left))
            raise ValueError(
                f"GPU shares do not fit in gpu_capacity {capacity} at max replicas ({demand} GPU); "
                f"no GPU left for: {short}"
            )
        return self

    @model_validator(mode="after")
    def _fits_its_card(self) -> "AppArgs":
        if self.gpu is not None:
            problems = self.memory_plan().problems()
            if problems:
                raise ValueError(f"gpu ({self.gpu.name}, {self.gpu.memory_gib:g} GiB): " + "; ".join(problems))
        return self

    def memory_plan(self, card: GpuCard | None = None) -> CardPlan:
        """The memory plan of every model this profile puts on a GPU, on `card` (default: its `gpu:`)."""
        from deployments.runtime.memory_plan import image_plan, one_model_plan, video_plan

        card = card or self.gpu or GpuCard(name="unnamed card", memory_gib=1024)
        models = [image_plan(entry, entry.model_family) for entry in self.served_image_models if on_gpu(entry.device)]
        models += [video_plan(entry, entry.model_family) for entry in self.served_video_models if on_gpu(entry.device)]
        scorers = [(entry.source, entry.device) for entry in self.served_scorers if on_gpu(entry.device)]
        if scorers:
            models.append(one_model_plan("scorers", scorers, CLIP_IMAGE_TOKENS, SCORE_BATCH))
        llm = self.enhancer.llm
        if self.enhancer.mode == "llm" and llm.backend == "transformers" and on_gpu(llm.device):
            models.append(one_model_plan("enhancer", [(llm.source, llm.device)], LLM_TOKENS, 1))
        return CardPlan(card.name, card.memory_bytes, tuple(models))

    @model_validator(mode="after")
    def _memory_caps_within_shares(self) -> "AppArgs":
        models = [(name, field + (".llm" if field == "enhancer" else ""), f"deployments.{name}", getattr(self, field))
                  for name, field in MODEL_CONFIG_FIELDS.items()]
        models += [("ClipScorer", f"scorers[{index}]", "deployments.ClipScorer", entry)
                   for index, entry in enumerate(self.scorers) if entry.enabled]
        models += [(entry.deployment_name, f"{kind}[{entry.id}]", f"{kind}[{entry.id}].deployment", entry)
                   for kind, entries in (("image_models", self.served_image_models),
                                         ("video_models", self.served_video_models))
                   for entry in entries]
        for name, where, options_at, config in models:
            cap = device_options(config).memory_fraction
            share = gpu_memory_fraction(self._options(name).num_gpus)
            if cap is not None and share is not None and cap > share:
                raise ValueError(
                    f"{where}.device.memory_fraction ({cap:g}) is more than {options_at}.num_gpus "
                    f"({share:g}): the replica could take memory Ray gave to others on its GPU"
                )
        return self

    def _options(self, name: str) -> DeploymentOptions:
        return self.all_deployment_options().get(name, DeploymentOptions())

    @model_validator(mode="after")
    def _scorer_batches_can_fill(self) -> "AppArgs":
        per_replica = self._options("ClipScorer").max_ongoing_requests or SCORER_MAX_ONGOING_REQUESTS
        _check_batches_fit(self.scores.batching, per_replica, "deployments.ClipScorer.max_ongoing_requests",
                           "scores.batching")
        return self

    @model_validator(mode="after")
    def _scorers_fit(self) -> "AppArgs":
        """Each entry fits its family, and each metric comes from one enabled entry."""
        providers: dict[str, int] = {}
        for index, entry in enumerate(self.scorers):
            try:
                family = get_scorer_family(entry.family)
                family.check_entry(entry)
            except ValueError as error:
                raise ValueError(f"scorers[{index}]: {error}") from None
            for metric in family.metrics(entry) if entry.enabled else ():
                if metric in providers:
                    raise ValueError(f"scorers[{index}] and scorers[{providers[metric]}] both compute {metric!r}: "
                                     "one enabled entry per metric (alignment: set `alignment: false` in one's options)")
                providers[metric] = index
        if not providers:
            raise ValueError("scorers: at least one entry must be enabled")
        return self

    @model_validator(mode="after")
    def _gate_scores_computed(self) -> "AppArgs":
        computed = self.gate_metrics()
        if self.policy.metric not in computed:
            raise ValueError(f"policy.metric {self.policy.metric!r} is not computed by the enabled scorers; "
                             f"computed: {list(computed)}")
        for name, weight in (self.policy.weights.model_dump().items() if self.policy.weights else ()):
            if weight > 0 and name not in computed:
                raise ValueError(f"policy.weights.{name} must be 0: no enabled scorers: entry computes {name}")
        return self

    def gate_metrics(self) -> tuple[str, ...]:
        """The gate scores the enabled scorers compute, `combined` included, in GATE_METRICS order."""
        computed = {metric for entry in self.served_scorers for metric in get_scorer_family(entry.family).metrics(entry)}
        return tuple(metric for metric in GATE_METRICS if metric in computed | {"combined"})

    @property
    def served_scorers(self) -> list[ScorerEntry]:
        """The scorers loaded: the entries not marked `enabled: false`."""
        return [entry for entry in self.scorers if entry.enabled]

    def _with_room(self, config):
        """An on-demand entry with its room on the card filled in from the memory plan."""
        memory = getattr(config, "memory", None)
        if memory is None or memory.residency != "on_demand" or memory.room is not None or self.gpu is None:
            return config
        plan = self.memory_plan()
        model = next(model for model in plan.models if model.name == config.id)
        room = ResidencyRoom(budget_gib=plan.on_demand_budget() / 2**30, model_gib=(model.on_gpu + model.activations) / 2**30)
        return config.model_copy(update={"memory": memory.model_copy(update={"room": room})})

    @model_validator(mode="after")
    def _on_demand_needs_a_card(self) -> "AppArgs":
        for entry in [*self.served_image_models, *self.served_video_models]:
            if entry.memory.residency == "on_demand" and self.gpu is None and entry.memory.room is None:
                raise ValueError(f"{entry.id}: memory.residency 'on_demand' needs `gpu:` (the card whose room the "
                                 "on-demand models share, from the memory plan)")
        return self

    def memory_fraction(self, name: str) -> float | None:
        """The CUDA memory cap of deployment `name`: on a declared card (`gpu:`), its planned peak over the
        card (Ray's num_gpus is then a scheduling unit only: on-demand models share their room, moved by
        the residency broker); else its GPU share when that is a fraction of one GPU."""
        if self.gpu is None:
            return gpu_memory_fraction(self._options(name).num_gpus)
        names = {"ClipScorer": "scorers", "PromptEnhancer": "enhancer",
                 **{entry.deployment_name: entry.id for entry in [*self.served_image_models, *self.served_video_models]}}
        plan = self.memory_plan()
        model = next((model for model in plan.models if model.name == names.get(name)), None)
        return None if model is None else min(1.0, math.ceil(model.peak / plan.capacity * 100) / 100)

    def scoring_config(self) -> ScoringConfig:
        """What the ClipScorer deployment loads, each entry's CUDA memory cap filled in from its GPU share."""
        fraction = self.memory_fraction("ClipScorer")
        entries = [entry if entry.device.memory_fraction is not None or fraction is None
                   else entry.model_copy(update={"device": entry.device.model_copy(update={"memory_fraction": fraction})})
                   for entry in self.served_scorers]
        return ScoringConfig(scorers=tuple(entries), batching=self.scores.batching)

    @model_validator(mode="after")
    def _one_job_runner(self) -> "AppArgs":
        runner = self.deployments.get("JobRunner")
        if runner is not None and (runner.autoscaling is not None or (runner.num_replicas or 1) > 1):
            raise ValueError(
                "deployments.JobRunner runs as exactly one replica: it owns the job queue's dispatch "
                "(concurrency is jobs.max_concurrent_jobs, not replicas)"
            )
        return self

    def limits_storage(self) -> str:
        """The `limits` storage URI per-key counters use."""
        if self.auth.limits_storage is not None:
            return self.auth.limits_storage
        return self.jobs.redis_url if self.jobs.store == "redis" else "memory://"

    @model_validator(mode="after")
    def _shared_limits(self) -> "AppArgs":
        ingress = self.deployments.get("Ingress", DeploymentOptions())
        if (self.auth.keys_file or self.auth.limits_clients) and ingress.max_replicas > 1 \
                and self.auth.limits_storage is None \
                and self.limits_storage().startswith("memory"):
            raise ValueError(
                "auth: more than one Ingress replica needs shared rate-limit counters: set auth.limits_storage "
                "to a redis:// URI (or use jobs.store: redis), or to memory:// to accept that each replica "
                "counts on its own (limits up to replicas x as loose; the active_jobs quota stays exact)"
            )
        return self

    def options_for(self, name: str) -> dict:
        return self._options(name).serve_options()

    def image_model(self, model_id: str) -> ImageModelEntry:
        return next(entry for entry in self.served_image_models if entry.id == model_id)

    def model_config_for(self, name: str) -> ImageModelEntry | VideoModelEntry | ScoringConfig | EnhancerConfig:
        """The model config of deployment `name`, its CUDA memory cap filled in from its GPU share."""
        if name == "ClipScorer":
            return self.scoring_config()
        images = {entry.deployment_name: entry for entry in [*self.served_image_models, *self.served_video_models]}
        config = images[name] if name in images else getattr(self, MODEL_CONFIG_FIELDS[name])
        config = self._with_room(config)
        device = device_options(config)
        fraction = self.memory_fraction(name)
        if device.memory_fraction is not None or fraction is None:
            return config
        device = device.model_copy(update={"memory_fraction": fraction})
        if isinstance(config, EnhancerConfig):  # the LLM's device (the template needs none)
            return config.model_copy(update={"llm": config.llm.model_copy(update={"device": device})})
        return config.model_copy(update={"device": device})


def on_gpu(device: DeviceOptions) -> bool:
    """Whether a model's device is a GPU the memory plan counts: CUDA, 'auto' (CUDA on a GPU host) or simulated."""
    return device.device != "cpu"


def device_options(config: ImageModelConfig | VideoModelConfig | ScorerEntry | ScoringConfig | EnhancerConfig,
                   ) -> DeviceOptions:
    """Where a model deployment's model runs: the enhancer's is its LLM's; the scorer deployment's its
    first scorer's (`scoring_config` fills every entry's memory cap alike)."""
    if isinstance(config, ScoringConfig):
        return config.scorers[0].device
    return config.llm.device if isinstance(config, EnhancerConfig) else config.device


def load_serve_config(path: str | Path) -> dict:
    with open(path) as handle:
        return yaml.safe_load(handle)


def app_args_from_config(path: str | Path, app_name: str | None = None) -> AppArgs:
    """The typed args of application `app_name` (genserve's by default) in a Serve config file."""
    from serve_app import APP_NAME

    app_name = app_name or APP_NAME
    config = load_serve_config(path)
    for application in config.get("applications", []):
        if application.get("name") == app_name:
            return AppArgs.model_validate(application.get("args") or {})
    raise ValueError(f"{path}: no application named {app_name!r} under 'applications'")

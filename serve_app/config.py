"""The typed application config: what a Serve config's `args:` block may say.

`build_app(args)` validates `args` against `AppArgs`, so a bad config fails when it is loaded,
with pydantic naming the field (for example `policy.threshold`), instead of inside a replica.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from deployments.clip_scorer import SCORE_RANGES
from deployments.config import EnhancerConfig, FluxConfig, ScorerConfig, SvdConfig

DeploymentName = Literal["Ingress", "PromptEnhancer", "FluxGenerator", "ClipScorer", "SvdGenerator", "JobRunner"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AutoscalingOptions(_Strict):
    """Ray Serve autoscaling for one deployment (see Serve's `autoscaling_config`)."""

    min_replicas: int = Field(1, ge=0, description="Replicas kept even when idle.")
    max_replicas: int = Field(1, ge=1, description="Upper bound on replicas.")
    target_ongoing_requests: float = Field(2.0, gt=0, description="Ongoing requests per replica to aim for.")
    upscale_delay_s: float = Field(30.0, ge=0, description="Load must stay high this long before scaling up.")
    downscale_delay_s: float = Field(600.0, ge=0, description="Load must stay low this long before scaling down.")

    @model_validator(mode="after")
    def _range(self) -> "AutoscalingOptions":
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) must not exceed max_replicas ({self.max_replicas})"
            )
        return self


class DeploymentOptions(_Strict):
    """Replicas and resources of one deployment. Unset fields keep the deployment's defaults."""

    num_replicas: int | None = Field(None, ge=1, description="Fixed replica count; exclusive with autoscaling.")
    autoscaling: AutoscalingOptions | None = Field(None, description="Autoscale instead of a fixed count.")
    num_cpus: float | None = Field(None, ge=0, description="CPUs reserved per replica.")
    num_gpus: float | None = Field(None, ge=0, description="GPUs reserved per replica (fractions allowed).")
    max_ongoing_requests: int | None = Field(None, ge=1, description="Requests a replica takes at once.")
    max_queued_requests: int | None = Field(
        None, ge=-1, description="Requests queued per caller before Serve answers 503; -1 is unbounded."
    )
    graceful_shutdown_timeout_s: float | None = Field(
        None, ge=0, description="How long a stopping replica lets its ongoing requests finish (Serve's default: 20)."
    )

    @model_validator(mode="after")
    def _replicas_xor_autoscaling(self) -> "DeploymentOptions":
        if self.num_replicas is not None and self.autoscaling is not None:
            raise ValueError("set either num_replicas or autoscaling, not both")
        return self

    def serve_options(self) -> dict:
        """Keyword arguments for `Deployment.options()`."""
        options: dict = {}
        if self.num_replicas is not None:
            options["num_replicas"] = self.num_replicas
        if self.autoscaling is not None:
            options["autoscaling_config"] = self.autoscaling.model_dump()
        actor = {key: getattr(self, key) for key in ("num_cpus", "num_gpus") if getattr(self, key) is not None}
        if actor:
            options["ray_actor_options"] = actor
        for key in ("max_ongoing_requests", "max_queued_requests", "graceful_shutdown_timeout_s"):
            if getattr(self, key) is not None:
                options[key] = getattr(self, key)
        return options


class QualityPolicy(_Strict):
    """When a result is good enough, and how hard to try before returning the best one."""

    metric: Literal["aesthetic", "alignment"] = Field(
        "aesthetic", description="Score that gates regeneration: aesthetic (0-1) or alignment (0-100)."
    )
    threshold: float = Field(0.0, ge=0, description="An image passes when its gating score is at least this.")
    max_attempts: int = Field(1, ge=1, le=5, description="Generation rounds per request, the first included.")

    @model_validator(mode="after")
    def _threshold_in_metric_range(self) -> "QualityPolicy":
        check_threshold(self.metric, self.threshold)
        return self


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

    image: int | None = Field(None, ge=1, description="Image jobs running at once (FluxGenerator's capacity if unset).")
    video: int | None = Field(None, ge=1, description="Video jobs running at once (SvdGenerator's capacity if unset).")


class JobsConfig(_Strict):
    """Durable async jobs (POST /v1/jobs): where the records live and how jobs are run."""

    store: Literal["sqlite", "redis"] = Field(
        "sqlite", description="'sqlite': a file in data_dir, no server (one node). 'redis': records and files in Redis."
    )
    data_dir: str = Field(
        "./data/jobs", min_length=1,
        description="SQLite database and result files. A relative path is resolved where the app is built "
                    "(the directory `serve run` starts in); the JobRunner's node must see it.",
    )
    redis_url: str | None = Field(None, description="redis://[user:password@]host:port/db, for store: redis.")
    redis_prefix: str = Field("genserve:jobs", min_length=1, description="Prefix of every Redis key the store writes.")
    ttl_s: float = Field(86400.0, gt=0, description="Finished jobs, and their files, are deleted this long after they end.")
    retry_limit: int = Field(
        2, ge=0, le=10,
        description="Re-runs of a job whose run failed or was interrupted (a replica died, the app restarted) "
                    "before it is marked failed with the reasons.",
    )
    max_concurrent_jobs: JobSlots = Field(default_factory=JobSlots, description="Jobs running at once, per kind.")
    sweep_interval_s: float = Field(60.0, gt=0, description="How often expired jobs are deleted.")
    progress_interval_s: float = Field(
        0.5, ge=0,
        description="Least time between two progress reports of a running job (0: every denoising step). "
                    "Each report is a Serve call and a store write; steps shorter than this are skipped.",
    )

    @model_validator(mode="after")
    def _redis_needs_url(self) -> "JobsConfig":
        if self.store == "redis" and not self.redis_url:
            raise ValueError("store 'redis' needs redis_url, e.g. redis://127.0.0.1:6379/0")
        if self.redis_url is not None and not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"redis_url must start with redis://, rediss:// or unix://; got {self.redis_url!r}")
        return self


class AppArgs(_Strict):
    """Everything `configs/*.yaml` choose: model sources, defaults, quality policy, scaling."""

    flux: FluxConfig = Field(default_factory=FluxConfig, description="The FLUX.1-schnell generator.")
    scorer: ScorerConfig = Field(default_factory=ScorerConfig, description="The CLIP scorer.")
    enhancer: EnhancerConfig = Field(default_factory=EnhancerConfig, description="The prompt enhancer.")
    svd: SvdConfig | None = Field(None, description="Stable Video Diffusion; omit to serve images only.")
    policy: QualityPolicy = Field(default_factory=QualityPolicy, description="Default quality gate.")
    max_input_pixels: int = Field(
        4096 * 4096, ge=65536, description="Largest uploaded image (width x height), checked before decoding."
    )
    request_timeout_s: float = Field(
        600.0, gt=0, description="How long the ingress waits for one downstream call before answering 504."
    )
    max_body_bytes: int = Field(
        64 * 1024 * 1024, ge=1024,
        description="Largest request body the ingress reads (bytes); larger ones get 413 before they are parsed.",
    )
    jobs: JobsConfig = Field(default_factory=JobsConfig, description="Durable async jobs.")
    deployments: dict[DeploymentName, DeploymentOptions] = Field(
        default_factory=dict, description="Replicas and resources per deployment, by deployment name."
    )

    @model_validator(mode="after")
    def _one_job_runner(self) -> "AppArgs":
        runner = self.deployments.get("JobRunner")
        if runner is not None and (runner.autoscaling is not None or (runner.num_replicas or 1) > 1):
            raise ValueError(
                "deployments.JobRunner runs as exactly one replica: it owns the job queue's dispatch "
                "(concurrency is jobs.max_concurrent_jobs, not replicas)"
            )
        return self

    def options_for(self, name: str) -> dict:
        return self.deployments.get(name, DeploymentOptions()).serve_options()

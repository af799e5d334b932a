"""The HTTP contract of /v1/jobs: submission, status, list, and results with file links."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from serve_app.protocol.schemas import ImageInfo, ImageResponse, VideoInfo

JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]
WebhookEvent = Literal["job.succeeded", "job.failed", "job.cancelled"]
WEBHOOK_EVENTS: tuple[str, ...] = ("job.succeeded", "job.failed", "job.cancelled")


class WebhookSpec(BaseModel):
    """Where to POST, signed (Standard Webhooks), when the job ends."""

    model_config = ConfigDict(extra="forbid", strict=True)

    url: str = Field(max_length=2048, description="https:// URL of the receiver (http:// only where the config "
                                                  "allows it); never a loopback, private or metadata address.")
    events: list[WebhookEvent] = Field(
        default_factory=lambda: list(WEBHOOK_EVENTS), min_length=1,
        description="Which ends to deliver: job.succeeded, job.failed, job.cancelled (default: all three).")


class JobSubmission(BaseModel):
    """`POST /v1/jobs`: what to run. `request` is validated as `kind`'s sync body would be."""

    model_config = ConfigDict(extra="forbid", strict=True)

    kind: Literal["image", "video"] = Field(description="'image' (as POST /v1/images) or 'video' (as POST /v1/videos).")
    request: dict[str, Any] = Field(description="The same body as POST /v1/images or POST /v1/videos.")
    webhook: WebhookSpec | None = Field(
        None, description="Tell a receiver when the job ends: a signed POST, retried until it is answered 2xx.")
    priority: Literal["low", "normal", "high"] = Field(
        "normal", description="Order among this key's own jobs: high goes ahead of normal jobs submitted up to "
                              "jobs.fairness.priority_age_s before it, low behind those submitted up to that long "
                              "after it. It never takes GPU time from other keys' share.")


class JobProgress(BaseModel):
    stage: str = Field(description="What the steps belong to: generate (images), keyframe or video.")
    round: int = Field(description="Generation round of the image graph: 1, more when it regenerates.")
    step: int = Field(description="Denoising steps done in this stage.")
    steps: int = Field(description="Denoising steps in this stage.")
    eta_s: float | None = Field(None, description="Seconds left in this stage at the pace so far.")
    updated_at: float
    preview: str | None = Field(
        None, description="A small approximate picture of the image being denoised (a PNG data: URL), for image "
                          "jobs with `preview` on and models whose family has preview factors; else null.",
    )


class JobHistoryEntry(BaseModel):
    state: JobState
    at: float = Field(description="Unix time of the change.")
    attempt: int = Field(description="The run this change belongs to (0 before the first).")
    reason: str | None = Field(None, description="Why: a retry's cause, a cancel, a failure.")
    requeues: int | None = Field(
        None, description="On a `queued` entry: how many times the job went back to the queue without spending an "
                          "attempt (turned away for capacity), coalesced into this one entry; its time and reason "
                          "are the last one's.")


class JobFileLink(BaseModel):
    name: str
    url: str = Field(description="GET it for the file itself.")
    content_type: str
    size: int = Field(description="Bytes.")


class WebhookDelivery(BaseModel):
    """One notification of a job's end to a receiver: its state, retried with back-off."""

    id: str = Field(description="The webhook-id header: the same on every retry of this delivery.")
    kind: Literal["webhook", "a2a"] = Field(description="A job webhook, or an A2A push notification.")
    event: str = Field(description="job.succeeded, job.failed or job.cancelled.")
    url: str
    state: Literal["pending", "delivered", "failed"] = Field(
        description="pending: not answered 2xx yet (retried); delivered; failed: gave up, or refused to send.")
    attempts: int
    next_attempt_at: float | None = Field(None, description="While pending: when the next attempt is due.")
    last_status: int | None = Field(None, description="The receiver's last HTTP status.")
    last_error: str | None = Field(None, description="Why the last attempt failed.")
    delivered_at: float | None = None


class JobLinks(BaseModel):
    self: str
    events: str
    cancel: str
    result: str | None = Field(None, description="Set once the job succeeded.")


class JobStatus(BaseModel):
    """`GET /v1/jobs/{id}`: where a job is, and what came of it."""

    id: str
    kind: Literal["image", "video"]
    state: JobState
    queue_position: int | None = Field(
        None, description="1 = next of its kind to start, in the fair order across keys (jobs ahead of it + 1); set "
                          "while queued. It can move back when another key's job arrives and that key is behind its "
                          "share. Null while its key is paused (weight 0).")
    estimated_start_s: float | None = Field(
        None, description="Seconds until it is expected to start: the GPU time of the jobs ahead of it (each key's "
                          "recent mean per job) over the job slots of its kind; set while queued. An estimate.")
    priority: Literal["low", "normal", "high"] = Field("normal", description="As submitted.")
    progress: JobProgress | None = Field(None, description="The current (or last) run's denoising progress.")
    attempts: int = Field(description="Runs started, the current one included.")
    max_attempts: int = Field(description="Runs allowed: the first and the configured retries.")
    cancel_requested: bool
    created_at: float
    started_at: float | None = Field(None, description="When the latest run started.")
    finished_at: float | None = None
    expires_at: float | None = Field(None, description="When the job and its files are deleted (finished jobs).")
    timings: dict[str, float] = Field(
        description="Seconds: queued (submit to first start), running (latest run), total (submit to end)."
    )
    error: str | None = Field(None, description="Why the job failed; a message, never a traceback.")
    history: list[JobHistoryEntry] = Field(description="Every state change, oldest first, with reasons.")
    files: list[JobFileLink] = Field(default_factory=list, description="The result's files, once succeeded.")
    webhooks: list[WebhookDelivery] = Field(
        default_factory=list, description="Deliveries of the job's end to its webhook and A2A push receivers.")
    links: JobLinks


class JobList(BaseModel):
    jobs: list[JobStatus]
    next_cursor: str | None = Field(None, description="Pass as `cursor` for the next (older) page; null at the end.")


class JobImage(ImageInfo):
    file: str = Field(description="The PNG's name among the job's files.")
    url: str = Field(description="Where to GET the PNG.")


class ImageJobResult(ImageResponse):
    """The POST /v1/images response, with each image a link to its file instead of base64."""

    images: list[JobImage]


class VideoJobResult(VideoInfo):
    """The POST /v1/videos JSON response, with a link to the file instead of base64."""

    file: str = Field(description="The video's name among the job's files.")
    url: str = Field(description="Where to GET the video.")

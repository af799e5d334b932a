"""The ingress's metrics: stages, outputs, attempts, scores, rejections and errors.

Created once per ingress replica; recording is in-memory only (no I/O on the request path).
Read histograms through their buckets (histogram_quantile): Ray estimates `_sum` from bucket
midpoints, so `_sum / _count` is only exact where the buckets are built for it (attempts).
Exported by Ray with a `ray_` prefix: `genserve_stage_seconds` is scraped as
`ray_genserve_stage_seconds_bucket` and so on. Serve adds `deployment`, `replica` and `application`
tags; its own request, latency, queue and replica metrics sit next to these on the same port.
"""

from __future__ import annotations

from typing import get_args

from pydantic import BaseModel

from deployments.families import VIDEO_BUILTIN, get_video_family
from deployments.names import SCORE_RANGES
from serve_app.protocol.schemas import (
    ControlPreviewRequest,
    EnhanceRequest,
    ImageRequest,
    ImageResponse,
    ScoreRequest,
    VideoRequest,
    VideoResponse,
)

OTHER = "other"

# Seconds: tens of milliseconds (tiny models, scoring) to ten minutes (long videos on a GPU).
STAGE_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0]
# Ray exports a histogram's _sum estimated from bucket midpoints, not the observed values (see
# ray-project/ray#53740). Attempts are integers 1-5, so half-integer boundaries put each value at
# its bucket's midpoint and keep _sum / _count (the mean) exact.
ATTEMPT_BUCKETS = [0.5, 1.5, 2.5, 3.5, 4.5, 5.5]
# Finer boundaries where a score's values cluster (its documented typical range, deployments.names);
# any other gate score is cut into ten equal steps over its range.
SCORE_BOUNDARIES = {
    "alignment": [5.0, 10.0, 15.0, 20.0, 25.0, 30.0, 35.0, 40.0, 50.0, 100.0],
    "laion": [2.0, 3.0, 4.0, 4.5, 5.0, 5.5, 6.0, 6.5, 7.0, 8.0, 10.0],
    "hps": [0.1, 0.15, 0.2, 0.225, 0.25, 0.275, 0.3, 0.325, 0.35, 0.4, 0.5, 1.0],  # real images: 0.2-0.35
    "pickscore": [10.0, 15.0, 18.0, 19.0, 20.0, 21.0, 22.0, 23.0, 24.0, 25.0, 30.0, 100.0],  # real images: 18-24
}
# One histogram per gate score (`genserve_<name>_score`): a score added to SCORE_RANGES gets its own.
SCORE_BUCKETS = {name: SCORE_BOUNDARIES.get(name) or [round(low + (high - low) * step / 10, 6) for step in range(1, 11)]
                 for name, (low, high) in SCORE_RANGES.items()}


def _field_names(model: type[BaseModel], prefix: str = "") -> set[str]:
    """Every field name of `model` and the models nested in it, dotted ('control.image')."""
    names = set()
    for name, info in model.model_fields.items():
        names.add(prefix + name)
        for candidate in (info.annotation, *get_args(info.annotation)):
            for inner in (candidate, *get_args(candidate)):  # list[Lora], Optional[ControlOptions]
                if isinstance(inner, type) and issubclass(inner, BaseModel):
                    names |= _field_names(inner, f"{prefix}{name}.")
    return names


def _video_family_params() -> set[str]:
    """The built-in video families' own parameters: fields of a video request beyond its model's.
    (A parameter of a family from elsewhere is labelled OTHER: its name is request data.)"""
    return {name for family in VIDEO_BUILTIN for name in get_video_family(family).param_names()}


# The only values the `field` label takes (with OTHER): metric labels must never come from request
# data, or an unknown key creates a series per name (and a non-ASCII one made Ray's recorder raise).
_VIDEO_FIELDS = _field_names(VideoRequest) | _video_family_params()
KNOWN_FIELDS = frozenset(
    {"body", "cursor", "state", "limit", "idempotency-key", "job_id", "name", "kind", "request"}
    | _field_names(ImageRequest) | _VIDEO_FIELDS | _field_names(ScoreRequest)
    | _field_names(EnhanceRequest) | _field_names(ControlPreviewRequest)
    | {f"request.{name}" for name in _field_names(ImageRequest) | _VIDEO_FIELDS}
)


def field_label(field: str) -> str:
    """`field` when it is a field of some request model ('images.3' -> 'images'), else 'other'."""
    parts = field.split(".")
    if len(parts) > 1 and parts[0] in ("query", "header", "path"):  # ('query', 'cursor') -> 'cursor'
        parts = parts[1:]
    name = ".".join(part for part in parts if not part.isdigit())
    while name and name not in KNOWN_FIELDS:
        name = name.rpartition(".")[0]  # 'control.bogus' -> 'control'
    return name or OTHER


def _flag(passed: bool | None) -> str:
    return "unscored" if passed is None else str(passed).lower()


class GraphMetrics:
    def __init__(self):
        from ray.serve import metrics

        self.stage_seconds = metrics.Histogram(
            "genserve_stage_seconds",
            description="Seconds per stage of a request (enhance, generate, score, encode, keyframe, video).",
            boundaries=STAGE_BUCKETS,
            tag_keys=("stage", "model"),
        )
        self.images = metrics.Counter(
            "genserve_images_total",
            description="Images returned, by model and by whether they passed the quality gate.",
            tag_keys=("model", "passed"),
        )
        self.videos = metrics.Counter(
            "genserve_videos_total",
            description="Videos returned, by mode and by whether the keyframe passed ('unscored' for uploads).",
            tag_keys=("model", "mode", "passed"),
        )
        self.attempts = metrics.Histogram(
            "genserve_attempts_per_request",
            description="Generation rounds one image request took (1 = no regeneration).",
            boundaries=ATTEMPT_BUCKETS,
            tag_keys=("model",),
        )
        self.scores = {
            name: metrics.Histogram(
                f"genserve_{name}_score",
                description=f"{name} score of every generated candidate image.",
                boundaries=buckets,
                tag_keys=("model",),
            )
            for name, buckets in SCORE_BUCKETS.items()
        }
        self.rejections = metrics.Counter(
            "genserve_validation_rejections_total",
            description="Requests refused with 422, by route and field.",
            tag_keys=("route", "field"),
        )
        self.fallbacks = metrics.Counter(
            "genserve_fallback_requests_total",
            description="Image requests sent to the remote fallback, by local model, reason (backpressure, "
                        "estimated_wait) and outcome (served, failed).",
            tag_keys=("model", "reason", "outcome"),
        )
        self.timeouts = metrics.Counter(
            "genserve_stage_timeouts_total",
            description="Downstream calls that ran past request_timeout_s, by stage.",
            tag_keys=("stage",),
        )

    def image_response(self, response: ImageResponse) -> None:
        model = response.model
        for stage in ("enhance", "preprocess", "generate", "score", "encode"):
            if stage in response.timings:  # preprocess: only when a control map was computed
                self.stage_seconds.observe(response.timings[stage], tags={"stage": stage, "model": model})
        for image in response.images:
            self.images.inc(tags={"model": model, "passed": _flag(image.passed)})
        self.attempts.observe(max(attempt.attempt for attempt in response.attempts), tags={"model": model})
        for attempt in response.attempts:
            for name, histogram in self.scores.items():
                value = getattr(attempt.scores, name, None)
                if value is not None:  # laion is None when the scorer's LAION head is off
                    histogram.observe(value, tags={"model": model})

    def video_response(self, response: VideoResponse) -> None:
        for stage in ("keyframe", "video", "interpolate", "encode"):
            if stage in response.timings:
                model = response.keyframe.model if stage == "keyframe" else response.model
                self.stage_seconds.observe(response.timings[stage], tags={"stage": stage, "model": model})
        passed = None if response.keyframe is None else response.keyframe.passed
        self.videos.inc(tags={"model": response.model, "mode": response.mode, "passed": _flag(passed)})

    def rejection(self, route: str, fields: list[str]) -> None:
        for field in fields:
            self.rejections.inc(tags={"route": route, "field": field_label(field)})

    def fallback(self, model: str, reason: str, outcome: str) -> None:
        self.fallbacks.inc(tags={"model": model, "reason": reason, "outcome": outcome})

    def timeout(self, stage: str) -> None:
        self.timeouts.inc(tags={"stage": stage})


# A gate score as a fraction of its metric's range (0 its low end, 1 its high end), so one set of
# buckets serves every metric; fine near the middle, where CLIP-like scores crowd.
GATE_SCORE_BUCKETS = [0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.8, 0.9, 1.0]


class GateMetrics:
    """The quality gate per model and gate metric, wherever images are made (Ingress and JobRunner):
    first-round pass rate, images generated and accepted, device seconds, the score distribution.
    Read them as ratios: generated / accepted is attempts per accepted image."""

    def __init__(self):
        from ray.serve import metrics

        tags = ("model", "metric")
        self.first_round = metrics.Counter(
            "genserve_gate_first_round_images_total",
            description="Images of a request's first round, by whether they passed the gate.",
            tag_keys=(*tags, "passed"),
        )
        self.generated = metrics.Counter(
            "genserve_gate_generated_images_total", description="Every image generated for a gated request.",
            tag_keys=tags,
        )
        self.accepted = metrics.Counter(
            "genserve_gate_accepted_images_total", description="Images returned that passed the gate.", tag_keys=tags,
        )
        self.device_seconds = metrics.Counter(
            "genserve_gate_device_seconds_total",
            description="Seconds the generator spent on gated requests (GPU time on a GPU; a batch shared by images).",
            tag_keys=tags,
        )
        self.scores = metrics.Histogram(
            "genserve_gate_score_fraction",
            description="The gate metric's score of every generated image, as a fraction of the metric's range.",
            boundaries=GATE_SCORE_BUCKETS, tag_keys=tags,
        )

    def record(self, model: str, metric: str, result, accepted: int) -> None:
        """`result`: a GraphResult (services/graph.py), its candidates scored on `metric`."""
        tags = {"model": model, "metric": metric}
        low, high = SCORE_RANGES[metric]
        for candidate in result.candidates:
            if candidate.attempt == 1:
                self.first_round.inc(tags={**tags, "passed": _flag(candidate.passed)})
            self.scores.observe((candidate.scores[metric] - low) / (high - low), tags=tags)
        self.generated.inc(len(result.candidates), tags=tags)
        if accepted:
            self.accepted.inc(accepted, tags=tags)
        if result.device_seconds > 0:
            self.device_seconds.inc(result.device_seconds, tags=tags)

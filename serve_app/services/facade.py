"""The `Services` facade: what one Ingress replica serves with, and the local-or-remote policy.

Every front end (REST routers, OpenAI, MCP, A2A, the handle API) calls these methods, so none has
its own copy of limits, validation, metrics or the remote fallback (services/fallback.py).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from serve_app.protocol.errors import JobError, RequestError, VideoNotDeployed, field_of
from serve_app.protocol.schemas import ImageRequest, ImageResponse, VideoRequest
from serve_app.services.fallback import Fallback, FallbackFailed
from serve_app.services.graph import Overloaded
from serve_app.services.health import Diagnostics, Readiness
from serve_app.services.images import ImageService
from serve_app.services.metrics import GateMetrics, GraphMetrics
from serve_app.services.scores import ScoreService
from serve_app.services.settings import Handles, Settings
from serve_app.services.videos import VideoService


@dataclass
class Services:
    """What one Ingress replica serves with: the services over the deployment handles, and metrics."""

    images: ImageService
    scores: ScoreService
    videos: VideoService | None = None
    # The jobs API (serve_app.jobs.http.JobsApi), set by the ingress: jobs sit above services.
    jobs: Any = None
    metrics: GraphMetrics | None = None
    fallback: Fallback | None = None
    readiness: Readiness = field(default_factory=Readiness)
    diagnostics: Diagnostics = field(default_factory=Diagnostics)

    @classmethod
    def build(cls, settings: Settings, handles: Handles, *, ingress: bool = True) -> Services:
        """The services over `handles`, configured by `settings`: the one way they are built.
        `ingress=False` (the JobRunner's) leaves out what serves only the ingress's own requests:
        the remote fallback and the request metrics."""
        images = ImageService(settings, handles)
        if settings.metrics:  # the gate's metrics count job requests too, so the JobRunner's services have them
            images.gate_metrics_recorder = GateMetrics()
        fallback = None
        if ingress and settings.fallback.enabled:
            fallback = Fallback(settings.fallback, settings.replicas, images)
        return cls(
            images=images,
            scores=ScoreService(settings, handles.scorer),
            videos=VideoService(settings, handles, images) if settings.video_models else None,
            # One set of metrics per replica.
            metrics=GraphMetrics() if ingress and settings.metrics else None,
            fallback=fallback,
        )

    def jobs_api(self):
        if self.jobs is None:
            raise JobError(501, "async jobs are not deployed")
        return self.jobs

    def video_service(self) -> VideoService:
        if self.videos is None:
            raise VideoNotDeployed()
        return self.videos

    async def generate_images(self, request: ImageRequest | dict) -> ImageResponse:
        if not isinstance(request, ImageRequest):
            request = ImageRequest.model_validate(request)
        if request.fallback and self.fallback is None:
            raise RequestError("fallback", "this service has no remote fallback (fallback.enabled is false in "
                               "its config)", "false")
        if self.fallback is None:
            response = await self.images.generate_images(request)
        else:
            response = await self._local_or_remote(request, self.fallback)
        if self.metrics is not None:
            self.metrics.image_response(response)
        return response

    async def _local_or_remote(self, request: ImageRequest, fallback: Fallback) -> ImageResponse:
        """Local unless the request allows fallback and the model is saturated (services/fallback.py)."""
        model = self.images.spec_of(request.model).id
        if request.fallback:
            fallback.check(request)
            reason = fallback.reason_to_skip_local(model)
            if reason is not None:
                return await self._remote(request, fallback, model, reason)
        try:
            with fallback.estimator.tracking(model) as alone:
                response = await self.images.generate_images(request)
        except Overloaded as error:  # the model's queue was full (call_stage's form of Serve's BackPressureError)
            if not request.fallback or error.unavailable:
                raise
            return await self._remote(request, fallback, model, "backpressure")
        if alone:
            fallback.estimator.record(model, response.timings.get("generate", 0.0))
        return response

    async def _remote(self, request: ImageRequest, fallback: Fallback, model: str, reason: str) -> ImageResponse:
        try:
            response = await fallback.generate(request, reason)
        except FallbackFailed:
            if self.metrics is not None:
                self.metrics.fallback(model, reason, "failed")
            raise
        if self.metrics is not None:
            self.metrics.fallback(model, reason, "served")
        return response

    async def generate_video(self, request: VideoRequest | dict):
        response, output = await self.video_service().run(request)
        if self.metrics is not None:
            self.metrics.video_response(response)
        return response, output

    def record_rejection(self, route: str, fields: list[str]) -> None:
        if self.metrics is not None:
            self.metrics.rejection(route, fields)

    @contextlib.contextmanager
    def rejections_recorded(self, route: str):
        """Count bad input from handle callers too (HTTP's is counted by the error handlers)."""
        try:
            yield
        except RequestError as error:
            self.record_rejection(route, [error.field])
            raise
        except ValidationError as error:
            self.record_rejection(route, [field_of(("body", *item["loc"])) for item in error.errors()])
            raise

"""The FastAPI app the Ingress serves: middleware, error handlers, and one router per resource.

Routes reach the services through `services(request)`: the Ingress replica puts its `Services` on
the app's state when it starts, so the routers hold no state and no model-specific code.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from ray.exceptions import RayActorError

from serve_app.api.body_limit import BodyLimit
from serve_app.api.errors import explain_errors
from serve_app.api.metrics import GraphMetrics
from serve_app.api.schemas import (
    ControlPreviewRequest,
    EnhanceRequest,
    ImageRequest,
    ImageResponse,
    ScoreRequest,
    VideoRequest,
)
from serve_app.jobs import http as jobs_http
from serve_app.jobs.schemas import JobSubmission
from serve_app.services.graph import StageTimeout
from serve_app.services.images import ImageService
from serve_app.services.scores import ScoreService
from serve_app.services.validation import RequestError
from serve_app.services.videos import VideoService


class VideoNotDeployed(LookupError):
    pass


@dataclass
class Services:
    """What one Ingress replica serves with: the services over the deployment handles, and metrics."""

    images: ImageService
    scores: ScoreService
    videos: VideoService | None = None
    jobs: jobs_http.JobsApi | None = None
    metrics: GraphMetrics | None = None

    def jobs_api(self) -> jobs_http.JobsApi:
        if self.jobs is None:
            raise jobs_http.JobError(501, "async jobs are not deployed")
        return self.jobs

    def video_service(self) -> VideoService:
        if self.videos is None:
            raise VideoNotDeployed()
        return self.videos

    async def generate_images(self, request: ImageRequest | dict) -> ImageResponse:
        response = await self.images.generate_images(request)
        if self.metrics is not None:
            self.metrics.image_response(response)
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


def services(request: Request) -> Services:
    """The serving replica's services (a FastAPI dependency)."""
    # The app serving the request, not a module global: Serve ships the ingress (and the app it
    # refers to) to the replica by value, while this module is imported there by reference.
    return request.app.state.services


def field_of(loc) -> str:
    """'width' for ('body', 'width'); 'body' for errors about the body as a whole."""
    parts = [str(part) for part in loc[1:]] if loc and loc[0] == "body" else [str(part) for part in loc]
    return ".".join(parts) or "body"


# The request model of each route prefix, for naming fields and their allowed values in 422s.
_BODY_MODELS: tuple[tuple[str, type[BaseModel]], ...] = (
    ("/v1/videos", VideoRequest),
    ("/v1/jobs", JobSubmission),
    ("/v1/prompts", EnhanceRequest),
    ("/v1/controls", ControlPreviewRequest),
    ("/v1/scores", ScoreRequest),
)


def _record(request: Request, fields: list[str]) -> None:
    state = getattr(request.app.state, "services", None)
    if state is not None:
        state.record_rejection(request.url.path, fields)


async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    path = request.url.path
    model = next((model for prefix, model in _BODY_MODELS if path.startswith(prefix)), ImageRequest)
    detail = explain_errors(list(error.errors()), model)
    _record(request, [field_of(item["loc"]) for item in detail])
    return JSONResponse(status_code=422, content={"detail": jsonable_encoder(detail)})


async def _job_error(_: Request, error: jobs_http.JobError) -> JSONResponse:
    return JSONResponse(status_code=error.status, content={"detail": error.detail})


async def _request_error(request: Request, error: RequestError) -> JSONResponse:
    _record(request, [error.field])
    return JSONResponse(status_code=error.status, content={"detail": error.detail()})


async def _video_not_deployed(_: Request, __: VideoNotDeployed) -> JSONResponse:
    return JSONResponse(status_code=501, content={"detail": "video generation is not deployed: add a video_models entry to the config"})


async def _stage_timeout(request: Request, error: StageTimeout) -> JSONResponse:
    state = getattr(request.app.state, "services", None)
    if state is not None and state.metrics is not None:
        state.metrics.timeout(error.stage)
    return JSONResponse(status_code=504, content={"detail": str(error)})


async def _replica_lost(_: Request, error: RayActorError) -> JSONResponse:
    # A downstream replica died mid-request (its node or process went away). Serve replaces it
    # on its own, so this is a retryable 503, not a server bug; the request can be sent again
    # as it was (with its seed, it gives the same images).
    return JSONResponse(
        status_code=503,
        headers={"Retry-After": "5"},
        content={"detail": f"a replica serving this request was lost; retry. ({type(error).__name__})"},
    )


def build_api() -> FastAPI:
    """The app with every router; the Ingress serves it and puts its `Services` on `app.state`."""
    from serve_app.api.routers import ROUTERS

    api = FastAPI(
        title="genserve",
        description="Self-hosted image and video generation on Ray Serve: enhance, generate, score, regenerate.",
        version="0.1.0",
    )
    api.add_middleware(BodyLimit)
    api.add_exception_handler(RequestValidationError, _validation_error)
    api.add_exception_handler(jobs_http.JobError, _job_error)
    api.add_exception_handler(RequestError, _request_error)
    api.add_exception_handler(VideoNotDeployed, _video_not_deployed)
    api.add_exception_handler(StageTimeout, _stage_timeout)
    api.add_exception_handler(RayActorError, _replica_lost)
    for router in ROUTERS:
        api.include_router(router)
    return api

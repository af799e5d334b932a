"""The FastAPI app the Ingress serves: middleware, error handlers, and every front end's routes.

Routes reach the services through `serve_app.api.deps.services(request)`: the Ingress replica puts
its `Services` on the app's state when it starts, so the routers hold no state and no model-specific
code.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from starlette.exceptions import HTTPException
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from deployments.runtime.types import ModelOutOfMemory
from serve_app.api.a2a.agent import a2a_routes
from serve_app.api.body_limit import BodyLimit
from serve_app.api.headers import SecurityHeaders
from serve_app.api.mcp.tools import build_mcp, streamable_http_app
from serve_app.api.openai import routes as openai_routes
from serve_app.api.openai.routes import http_exception
from serve_app.api.rest import admin, catalog, health, images, jobs, scores, videos
from serve_app.api.schema_security import secured_openapi
from serve_app.protocol.errors import JobError, RequestError, VideoNotDeployed, explain_errors, field_of
from serve_app.protocol.jobs import JobSubmission
from serve_app.protocol.schemas import (
    ControlPreviewRequest,
    EnhanceRequest,
    ImageRequest,
    ScoreRequest,
    VideoRequest,
)
from serve_app.security.guard import Guard, limit_response_headers
from serve_app.security.limiter import LimitExceeded
from serve_app.services.fallback import FallbackFailed
from serve_app.services.graph import Overloaded, StageTimeout, cause_of, deadline
from serve_app.ui import mount_console


class RequestDeadline:
    """ASGI middleware: one deadline (request_timeout_s) for everything a request calls downstream,
    across stages and regeneration rounds; past it the request ends in 504 with Retry-After."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        state = getattr(scope.get("app"), "state", None) if scope["type"] == "http" else None
        served = getattr(state, "services", None)
        if served is None:
            return await self.app(scope, receive, send)
        with deadline(served.images.request_timeout_s):
            await self.app(scope, receive, send)


# Every router, in the order of the OpenAPI document.
ROUTERS = (images.router, videos.router, scores.router, jobs.router, catalog.router, health.router,
           openai_routes.router, admin.router)


# The request model of each route prefix, for naming fields and their allowed values in 422s.
_BODY_MODELS: tuple[tuple[str, type[BaseModel]], ...] = (
    ("/v1/videos", VideoRequest),
    ("/v1/jobs", JobSubmission),
    ("/v1/prompts", EnhanceRequest),
    ("/v1/controls", ControlPreviewRequest),
    ("/v1/scores", ScoreRequest),
)


def route_label(request: Request) -> str:
    """The matched route's template ('/v1/jobs/{job_id}'), never the path itself: a label from
    request data would make a series per job id (or per scanner's made-up path)."""
    route = request.scope.get("route")
    return getattr(route, "path", None) or "other"


def _record(request: Request, fields: list[str]) -> None:
    state = getattr(request.app.state, "services", None)
    if state is not None:
        state.record_rejection(route_label(request), fields)


# Each error's handler, registered where the handler is written (`_handles`); build_api adds them all.
EXCEPTION_HANDLERS: dict[type[BaseException], Callable] = {}


def _handles(kind: type[BaseException]):
    def register(handler: Callable) -> Callable:
        EXCEPTION_HANDLERS[kind] = handler
        return handler

    return register


@_handles(RequestValidationError)
async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    path = request.url.path
    model = next((model for prefix, model in _BODY_MODELS if path.startswith(prefix)), ImageRequest)
    detail = explain_errors(list(error.errors()), model)
    _record(request, [field_of(item["loc"]) for item in detail])
    return JSONResponse(status_code=422, content={"detail": jsonable_encoder(detail)})


@_handles(JobError)
async def _job_error(_: Request, error: JobError) -> JSONResponse:
    return JSONResponse(status_code=error.status, content={"detail": error.detail}, headers=error.headers)


@_handles(RequestError)
async def _request_error(request: Request, error: RequestError) -> JSONResponse:
    _record(request, [error.field])
    return JSONResponse(status_code=error.status, content={"detail": error.detail()})


@_handles(VideoNotDeployed)
async def _video_not_deployed(_: Request, __: VideoNotDeployed) -> JSONResponse:
    return JSONResponse(status_code=501, content={"detail": "video generation is not deployed: add a video_models entry to the config"})


# How long a client should wait before sending again a request that ran out of time or met a
# full queue, when the deployment's BackpressureConfig names no retry_after_s.
RETRY_AFTER_S = 5


@_handles(StageTimeout)
async def _stage_timeout(request: Request, error: StageTimeout) -> JSONResponse:
    state = getattr(request.app.state, "services", None)
    if state is not None and state.metrics is not None:
        state.metrics.timeout(error.stage)
    return JSONResponse(status_code=504, headers={"Retry-After": str(RETRY_AFTER_S)},
                        content={"detail": str(error), "reason": "deadline"})


def backpressure_of(error: BaseException) -> BackPressureError | None:
    """The BackPressureError behind `error`: raised by a handle, or by a chained downstream call."""
    error = cause_of(error)
    return error if isinstance(error, BackPressureError) else None


def overloaded(error: BaseException) -> JSONResponse:
    """A downstream queue was full (Serve's max_queued_requests): 503 or 429 with Retry-After, as
    the deployment's BackpressureConfig says. Answered at once: the request never queued."""
    pressure = backpressure_of(error)
    status = pressure.status_code if pressure is not None else 503
    retry = pressure.retry_after_s if pressure is not None and pressure.retry_after_s is not None else RETRY_AFTER_S
    return JSONResponse(status_code=status, headers={"Retry-After": str(max(1, math.ceil(retry)))},
                        content={"detail": "the service is at capacity (a queue is full); retry later",
                                 "reason": "overloaded"})


@_handles(BackPressureError)
async def _overloaded(_: Request, error: Exception) -> JSONResponse:
    return overloaded(error)


# Serve's replica wrapper replaces the handlers of BackPressureError and DeploymentUnavailableError
# with its own plain-text 503 once the app is built; calls through `call_stage` arrive as
# Overloaded instead, answered here in JSON.
@_handles(Overloaded)
async def _stage_overloaded(_: Request, error: Overloaded) -> JSONResponse:
    retry = RETRY_AFTER_S if error.retry_after_s is None else error.retry_after_s
    detail = ("a deployment this request needs is not available; retry later" if error.unavailable
              else "the service is at capacity (a queue is full); retry later")
    return JSONResponse(status_code=error.status, headers={"Retry-After": str(max(1, math.ceil(retry)))},
                        content={"detail": detail, "reason": "unavailable" if error.unavailable else "overloaded"})


@_handles(ModelOutOfMemory)
async def _out_of_memory(_: Request, error: ModelOutOfMemory) -> JSONResponse:
    # The replica freed its cache and serves on; a smaller request (fewer images, pixels or
    # frames) fits sooner than the same one sent again at once.
    return JSONResponse(status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)},
                        content={"detail": f"{error.model} ran out of accelerator memory for this request; retry, "
                                           "or ask for fewer images, pixels or frames", "reason": "out_of_memory"})


@_handles(DeploymentUnavailableError)
async def _unavailable(_: Request, error: DeploymentUnavailableError) -> JSONResponse:
    return JSONResponse(status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)},
                        content={"detail": "a deployment this request needs is not available; retry later",
                                 "reason": "unavailable"})


@_handles(RayActorError)
async def _replica_lost(_: Request, error: RayActorError) -> JSONResponse:
    # A downstream replica died mid-request (its node or process went away). Serve replaces it
    # on its own, so this is a retryable 503, not a server bug; the request can be sent again
    # as it was (with its seed, it gives the same images).
    return JSONResponse(
        status_code=503,
        headers={"Retry-After": "5"},
        content={"detail": f"a replica serving this request was lost; retry. ({type(error).__name__})"},
    )


@_handles(LimitExceeded)
async def _limit_exceeded(_: Request, error: LimitExceeded) -> JSONResponse:
    return JSONResponse(status_code=429, content=error.body(), headers=limit_response_headers(error))


@_handles(FallbackFailed)
async def _fallback_failed(_: Request, error: FallbackFailed) -> JSONResponse:
    return JSONResponse(status_code=error.status, content={"detail": error.detail})


def build_api(cors_origins: tuple[str, ...] | list[str] = (), trusted_proxies: tuple[str, ...] | list[str] = (),
              docs: bool = True) -> FastAPI:
    """The app with every router; the Ingress serves it and puts its `Services` (and its `Auth`,
    which the Guard reads) on `app.state`. Every route is behind the Guard (serve_app.security).
    `docs`: serve /docs and /redoc, and /openapi.json without a key (AuthConfig.docs_served); off,
    the pages do not exist and the schema needs an admin key."""
    mcp = build_mcp(lambda: api.state.services, _base_url)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        # Serve runs only the top-level app's lifespan: mounted protocol servers start from here.
        async with mcp.session_manager.run():
            yield

    api = FastAPI(
        title="genserve",
        description="Self-hosted image and video generation on Ray Serve: enhance, generate, score, regenerate.",
        version="0.1.0",
        lifespan=lifespan,
        docs_url="/docs" if docs else None,
        redoc_url="/redoc" if docs else None,
    )
    api.state.docs = docs  # the Guard reads it: the schema is public only with the docs pages
    api.add_middleware(BodyLimit)
    api.add_middleware(RequestDeadline)
    api.add_middleware(Guard)  # outside BodyLimit: a request without a key is refused before its body is read
    if cors_origins:  # outermost: preflights need no key, and refusals carry the CORS headers
        api.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["*"],
                           allow_headers=["Authorization", "Content-Type", "Idempotency-Key"],
                           expose_headers=["Location", "Retry-After"])
    if trusted_proxies:  # outermost of all: every layer inside sees the client the proxy names
        api.add_middleware(ProxyHeadersMiddleware, trusted_hosts=list(trusted_proxies))
    api.add_middleware(SecurityHeaders)  # outermost: refusals and errors carry the headers too
    for kind, handler in EXCEPTION_HANDLERS.items():
        api.add_exception_handler(kind, handler)
    for router in ROUTERS:
        api.include_router(router)
    api.add_exception_handler(HTTPException, http_exception)
    api.router.routes.extend(streamable_http_app(mcp).routes)  # POST/GET /mcp: MCP over streamable HTTP
    api.router.routes.extend(a2a_routes(lambda: api.state.services))  # the Agent Card; POST /a2a: A2A JSON-RPC
    mount_console(api)
    api.openapi = secured_openapi(api.openapi)  # the bearer scheme, and each operation's scope
    return api


def _base_url(ctx) -> str:
    """'http://host:port' of the HTTP request an MCP tool call came in on (for absolute file links)."""
    request = getattr(ctx.request_context, "request", None)
    return str(request.base_url).rstrip("/") if request is not None else ""

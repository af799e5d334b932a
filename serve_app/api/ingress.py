"""The Ingress deployment: the HTTP app (`serve_app.api.app`, every front end's routes) and the
Python handle API, over the same services (`serve_app.services.facade.Services`, built once from
the settings).

Routes (OpenAPI at /openapi.json, Swagger UI at /docs; with keys, the docs only if auth.docs):
- POST /v1/images   generate, score and regenerate; JSON in, JSON with base64 PNGs out
- POST /v1/prompts/enhance  the enhance step alone (LLM or template), with prompt advice
- POST /v1/videos   text- or image-to-video with any configured video model; MP4/GIF/WebP, JSON or binary
- POST /v1/scores   score uploaded images against a prompt (every CLIP, LAION, aspect and perceptual score)
- GET  /v1/models   the deployed image and video models with their limits and defaults; /v1/models/{model} one
- GET  /v1/loras    the LoRA adapters requests may name, by model family
- GET  /v1/controls  the ControlNet control types, their parameters and the models that take them
- POST /v1/controls/preview  the control map (canny edges, depth) a request's `control` would use
- /v1/jobs          durable async jobs: submit (202), list, status, delete, events (SSE), cancel, result, files
- GET  /v1/admin/usage  each configured key and what it uses now against its limits (admin scope)
- POST /v1/images/generations, /v1/images/edits  the OpenAI Images API (serve_app.api.openai)
- POST/GET /mcp     MCP tools over streamable HTTP (serve_app.api.mcp)
- POST /a2a, GET /.well-known/agent-card.json  the A2A agent and its card (serve_app.api.a2a)
- GET  /ui/         the browser console (static files)
- GET  /livez       liveness: the ingress answers (no downstream call)
- GET  /readyz      readiness: every deployment has a healthy running replica (Serve controller, cached)
- GET  /healthz     each downstream deployment's info; 503 naming the one that did not answer

Bodies over `max_body_bytes` get 413 before they are parsed (serve_app.api.body_limit).

Python: `serve.get_app_handle("genserve").generate_images.remote(ImageRequest(...))`,
`.generate_video.remote(VideoRequest(...))`, `.enhance_prompt.remote(EnhanceRequest(...))` and
`.score_images.remote(ScoreRequest(...))`, with the types from `serve_app.types`.
"""

import contextlib

from ray import serve

from serve_app.api.app import build_api
from serve_app.api.body_limit import BodyLimit
from serve_app.jobs import http as jobs_http
from serve_app.jobs.quality import RunnerQualityBook
from serve_app.jobs.webhooks import build_gate
from serve_app.protocol.schemas import (
    EnhanceRequest,
    EnhanceResponse,
    ImageRequest,
    ImageResponse,
    ScoreRequest,
    ScoreResponse,
    VideoRequest,
    VideoResponse,
)
from serve_app.security.guard import Auth
from serve_app.services.facade import Services
from serve_app.services.graph import deadline
from serve_app.services.settings import Handles, Settings


@serve.deployment(name="Ingress", max_ongoing_requests=64, ray_actor_options={"num_cpus": 0.25})
@serve.ingress()
class Ingress:
    """The HTTP app is built on the replica, after the constructor, by `__serve_build_asgi_app__`
    (Serve's late-bound ingress): the app and whatever it mounts never need to be pickled, and the
    routes find this replica's services on `app.state`."""

    def __init__(self, settings: Settings, handles: Handles, jobs=None):
        """`jobs`: the JobRunner's handle (None: /v1/jobs answers 501)."""
        self._services = Services.build(settings, handles)
        if jobs is not None:  # the jobs API sits above the services, so it is attached here
            # One calibration and one set of pass rates for every replica: the job store's.
            self._services.images.quality = RunnerQualityBook(jobs, settings.calibration)
            self._services.jobs = jobs_http.JobsApi(jobs, self._services.images, self._services.videos,
                                                    settings.jobs.retry_limit, jobs_http.StreamLimits.of(settings.jobs),
                                                    settings.jobs.fairness, webhooks=build_gate(settings.jobs.webhooks))
        BodyLimit.configure(settings.max_body_bytes)
        self._auth_config = settings.auth
        # A concurrency slot outlives no request: the longest is bounded by the request timeout.
        # The counters' Redis password is read here, on the replica: no deployment argument holds it.
        self._auth = Auth.from_config(settings.auth, settings.limits_storage, metrics=settings.metrics,
                                      hold_s=2 * settings.request_timeout_s + 60,
                                      storage_password=settings.auth.limits_storage_password(settings.jobs))

    def __serve_build_asgi_app__(self):
        app = build_api(cors_origins=tuple(self._auth_config.cors_origins),
                        trusted_proxies=tuple(self._auth_config.trusted_proxies), docs=self._auth_config.docs_served)
        app.state.services = self._services
        app.state.auth = self._auth
        return app

    @contextlib.contextmanager
    def _handle_call(self, route: str):
        """A handle call gets the HTTP request's deadline, and its bad input is counted."""
        with deadline(self._services.images.request_timeout_s), self._services.rejections_recorded(route):
            yield

    async def generate_images(self, request: ImageRequest | dict) -> ImageResponse:
        """The Python API: the same request model and response as POST /v1/images.

        Raises `pydantic.ValidationError` or `serve_app.types.RequestError` (a
        `ValueError`) for bad input, naming the field.
        """
        with self._handle_call("handle:generate_images"):
            return await self._services.generate_images(request)

    async def enhance_prompt(self, request: EnhanceRequest | dict) -> EnhanceResponse:
        """The Python API of POST /v1/prompts/enhance."""
        with self._handle_call("handle:enhance_prompt"):
            return await self._services.images.enhance_prompt(request)

    async def generate_video(self, request: VideoRequest | dict) -> VideoResponse:
        """The Python API for videos: the same request model and JSON response as POST /v1/videos."""
        with self._handle_call("handle:generate_video"):
            response, _ = await self._services.generate_video(request)
        return response

    async def score_images(self, request: ScoreRequest | dict) -> ScoreResponse:
        """The Python API for scoring: the same request model and response as POST /v1/scores."""
        with self._handle_call("handle:score_images"):
            return await self._services.scores.score(request)

"""The HTTP ingress: a FastAPI app served by Ray Serve, plus the Python handle API.

Routes (OpenAPI at /docs):
- POST /v1/images   generate, score and regenerate; JSON in, JSON with base64 PNGs out
- POST /v1/prompts/enhance  the enhance step alone (LLM or template), with prompt advice
- POST /v1/videos   image-to-video, or text-to-video through a keyframe; MP4/GIF/WebP, JSON or binary
- POST /v1/scores   score uploaded images against a prompt (every CLIP, LAION, aspect and perceptual score)
- GET  /v1/models   the deployed models with their limits and defaults
- GET  /v1/loras    the LoRA adapters requests may name, by model family
- GET  /v1/controls  the ControlNet control types, their parameters and the models that take them
- POST /v1/controls/preview  the control map (canny edges, depth) a request's `control` would use
- GET  /healthz     200 when every downstream deployment answers, 503 naming the one that did not
- /v1/jobs          durable async jobs: submit (202), status, list, events (SSE), cancel, result, files

Bodies over `max_body_bytes` get 413 before they are parsed (serve_app.body_limit).

Python: `serve.get_app_handle("genserve").generate_images.remote(ImageRequest(...))`,
`.generate_video.remote(VideoRequest(...))`, `.enhance_prompt.remote(EnhanceRequest(...))` and
`.score_images.remote(ScoreRequest(...))`.
"""


import asyncio
import contextlib
import json

from fastapi import FastAPI, Header, Query, Request
from pydantic import ValidationError
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.exceptions import RayActorError

from serve_app.body_limit import DEFAULT_MAX_BYTES, BodyLimit
from serve_app.config import QualityPolicy
from serve_app.errors import explain_errors
from serve_app.metrics import GraphMetrics
from serve_app.graph import StageTimeout
from serve_app.jobs import http as jobs_http
from serve_app.jobs.schemas import ImageJobResult, JobList, JobState, JobStatus, JobSubmission, VideoJobResult
from serve_app.models import ModelSpec, RequestError
from serve_app.schemas import (
    ControlPreviewRequest,
    ControlPreviewResponse,
    EnhanceRequest,
    EnhanceResponse,
    ImageRequest,
    ImageResponse,
    ScoreRequest,
    ScoreResponse,
    VideoRequest,
    VideoResponse,
)
from serve_app.scoring import ScoreService
from serve_app.service import ImageService
from deployments.clip_scorer import GATE_METRICS
from deployments.config import SvdConfig
from deployments.lora import LoraRegistry
from serve_app.video import VideoService

HEALTH_TIMEOUT_S = 5.0

api = FastAPI(
    title="genserve",
    description="Self-hosted image generation on Ray Serve: enhance, generate, score, regenerate.",
    version="0.1.0",
)
api.add_middleware(BodyLimit)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    path = request.url.path
    model = (VideoRequest if path.startswith("/v1/videos") else JobSubmission if path.startswith("/v1/jobs")
             else EnhanceRequest if path.startswith("/v1/prompts")
             else ControlPreviewRequest if path.startswith("/v1/controls")
             else ScoreRequest if path.startswith("/v1/scores") else ImageRequest)
    detail = explain_errors(list(error.errors()), model)
    _record_rejection(_metrics_of(request), request.url.path, [_field_of(item["loc"]) for item in detail])
    return JSONResponse(status_code=422, content={"detail": jsonable_encoder(detail)})


@api.exception_handler(jobs_http.JobError)
async def _job_error(_: Request, error: jobs_http.JobError) -> JSONResponse:
    return JSONResponse(status_code=error.status, content={"detail": error.detail})


@api.exception_handler(RequestError)
async def _request_error(request: Request, error: RequestError) -> JSONResponse:
    _record_rejection(_metrics_of(request), request.url.path, [error.field])
    return JSONResponse(status_code=error.status, content={"detail": error.detail()})


def _field_of(loc) -> str:
    """'width' for ('body', 'width'); 'body' for errors about the body as a whole."""
    parts = [str(part) for part in loc[1:]] if loc and loc[0] == "body" else [str(part) for part in loc]
    return ".".join(parts) or "body"


def _metrics_of(request: Request) -> GraphMetrics | None:
    # The app serving the request, not the module's `api`: Serve ships the ingress class (and the
    # app it refers to) to the replica by value, while these handlers are imported by reference.
    return getattr(request.app.state, "metrics", None)


def _record_rejection(metrics: GraphMetrics | None, route: str, fields: list[str]) -> None:
    if metrics is not None:
        metrics.rejection(route, fields)


class VideoNotDeployed(LookupError):
    pass


@api.exception_handler(VideoNotDeployed)
async def _video_not_deployed(_: Request, __: VideoNotDeployed) -> JSONResponse:
    return JSONResponse(status_code=501, content={"detail": "video generation is not deployed: add `svd:` to the config"})


@api.exception_handler(StageTimeout)
async def _stage_timeout(request: Request, error: StageTimeout) -> JSONResponse:
    metrics = _metrics_of(request)
    if metrics is not None:
        metrics.timeout(error.stage)
    return JSONResponse(status_code=504, content={"detail": str(error)})


@api.exception_handler(RayActorError)
async def _replica_lost(_: Request, error: RayActorError) -> JSONResponse:
    # A downstream replica died mid-request (its node or process went away). Serve replaces it
    # on its own, so this is a retryable 503, not a server bug; the request can be sent again
    # as it was (with its seed, it gives the same images).
    return JSONResponse(
        status_code=503,
        headers={"Retry-After": "5"},
        content={"detail": f"a replica serving this request was lost; retry. ({type(error).__name__})"},
    )


async def _info(handle) -> dict:
    return await handle.info.remote()


@serve.deployment(name="Ingress", max_ongoing_requests=64, ray_actor_options={"num_cpus": 0.25})
@serve.ingress(api)
class Ingress:
    def __init__(self, enhancer, generators: dict, scorer, specs: dict[str, ModelSpec], policy: QualityPolicy,
                 request_timeout_s: float = 600.0, svd=None, svd_config: SvdConfig | None = None,
                 max_input_pixels: int = 4096 * 4096, metrics: bool = True, jobs=None, retry_limit: int = 2,
                 max_body_bytes: int = DEFAULT_MAX_BYTES, gate_metrics: tuple[str, ...] = GATE_METRICS,
                 blocklist: tuple[str, ...] = (), loras: LoraRegistry | None = None):
        self._service = ImageService(enhancer, generators, scorer, specs, policy, request_timeout_s,
                                     max_input_pixels=max_input_pixels, gate_metrics=gate_metrics,
                                     blocklist=blocklist, loras=loras)
        self._scores = ScoreService(scorer, policy, gate_metrics, max_input_pixels, request_timeout_s)
        # One set of metrics per replica; the error handlers find it on the app serving the request.
        self._metrics = GraphMetrics() if metrics else None
        api.state.metrics = self._metrics
        self._videos = None
        if svd is not None:
            self._videos = VideoService(svd, svd_config, self._service, max_input_pixels)
        self._jobs = None
        if jobs is not None:
            self._jobs = jobs_http.JobsApi(jobs, self._service, self._videos, retry_limit)
        BodyLimit.configure(max_body_bytes)

    def _jobs_api(self) -> jobs_http.JobsApi:
        if self._jobs is None:
            raise jobs_http.JobError(501, "async jobs are not deployed")
        return self._jobs

    def _video_service(self) -> VideoService:
        if self._videos is None:
            raise VideoNotDeployed()
        return self._videos

    async def generate_images(self, request: ImageRequest | dict) -> ImageResponse:
        """The Python API: the same request model and response as POST /v1/images.

        Raises `pydantic.ValidationError` or `serve_app.models.RequestError` (a `ValueError`)
        for bad input, naming the field.
        """
        with self._rejections_recorded("handle:generate_images"):
            return await self._images(request)

    @api.post("/v1/images", response_model=ImageResponse,
              responses={400: {"description": "The prompt contains a blocklisted term."}})
    async def post_images(self, request: ImageRequest) -> ImageResponse:
        return await self._images(request)

    async def _images(self, request: ImageRequest | dict) -> ImageResponse:
        response = await self._service.generate_images(request)
        if self._metrics is not None:
            self._metrics.image_response(response)
        return response

    async def enhance_prompt(self, request: EnhanceRequest | dict) -> EnhanceResponse:
        """The Python API of POST /v1/prompts/enhance."""
        with self._rejections_recorded("handle:enhance_prompt"):
            return await self._service.enhance_prompt(request)

    @api.post("/v1/prompts/enhance", response_model=EnhanceResponse,
              responses={400: {"description": "The prompt contains a blocklisted term."}})
    async def post_enhance(self, request: EnhanceRequest) -> EnhanceResponse:
        """The enhance step alone, as `POST /v1/images` would run it for `model`: the prompt the model
        would see, which enhancer made it (and why the template answered, if the LLM was asked), and
        advice on the prompt as written. Nothing is generated."""
        return await self._service.enhance_prompt(request)

    async def _video(self, request: VideoRequest | dict):
        response, output = await self._video_service().run(request)
        if self._metrics is not None:
            self._metrics.video_response(response)
        return response, output

    @contextlib.contextmanager
    def _rejections_recorded(self, route: str):
        """Count bad input from handle callers too (HTTP's is counted by the 422 handlers)."""
        try:
            yield
        except RequestError as error:
            _record_rejection(self._metrics, route, [error.field])
            raise
        except ValidationError as error:
            _record_rejection(self._metrics, route, [_field_of(("body", *item["loc"])) for item in error.errors()])
            raise

    async def generate_video(self, request: VideoRequest | dict) -> VideoResponse:
        """The Python API for videos: the same request model and JSON response as POST /v1/videos."""
        with self._rejections_recorded("handle:generate_video"):
            response, _ = await self._video(request)
        return response

    @api.post(
        "/v1/videos",
        response_model=VideoResponse,
        responses={200: {"content": {"video/mp4": {}, "image/gif": {}, "image/webp": {}}}},
    )
    async def post_videos(self, request: VideoRequest):
        response, output = await self._video(request)
        if request.response_format == "json":
            return response
        metadata = response.model_dump(exclude={"b64_video", "keyframe"})
        if response.keyframe is not None:
            metadata["keyframe"] = response.keyframe.model_dump(exclude={"attempts"})
        return Response(
            content=output.data,
            media_type=output.content_type,
            headers={"X-Genserve-Metadata": json.dumps(metadata, separators=(",", ":"))},
        )

    async def score_images(self, request: ScoreRequest | dict) -> ScoreResponse:
        """The Python API for scoring: the same request model and response as POST /v1/scores."""
        with self._rejections_recorded("handle:score_images"):
            return await self._scores.score(request)

    @api.post("/v1/scores", response_model=ScoreResponse)
    async def post_scores(self, request: ScoreRequest) -> ScoreResponse:
        """Score 1-16 uploaded images against a prompt in one batch: every score per image, which
        pass the quality gate, and the best one."""
        return await self._scores.score(request)

    @api.post("/v1/jobs", status_code=202, response_model=JobStatus,
              responses={202: {"description": "Recorded durably; poll the Location or stream its events."},
                         409: {"description": "The Idempotency-Key was used for a different request."}})
    async def post_jobs(self, submission: JobSubmission, request: Request, response: Response,
                        idempotency_key: str | None = Header(None, min_length=1, max_length=255)) -> JobStatus:
        """Submit an image or video job. Answers only once the job is durably recorded."""
        return await self._jobs_api().submit(submission, request, response, idempotency_key)

    @api.get("/v1/jobs", response_model=JobList)
    async def get_jobs(self, request: Request, state: JobState | None = None,
                       limit: int = Query(20, ge=1, le=200), cursor: str | None = None) -> JobList:
        """Jobs, newest first, optionally in one state; pass `next_cursor` back for older ones."""
        return await self._jobs_api().list(request, state, limit, cursor)

    @api.get("/v1/jobs/{job_id}", response_model=JobStatus)
    async def get_job(self, job_id: str, request: Request) -> JobStatus:
        return await self._jobs_api().status(job_id, request)

    @api.get("/v1/jobs/{job_id}/events", response_class=StreamingResponse,
             responses={200: {"content": {"text/event-stream": {}}}})
    async def get_job_events(self, job_id: str, request: Request) -> StreamingResponse:
        """Server-Sent Events: `state` on every state change, `progress` per denoising step, ending
        with the final `state`. Closing the stream does not cancel the job."""
        return await self._jobs_api().events(job_id, request)

    @api.post("/v1/jobs/{job_id}/cancel", response_model=JobStatus)
    async def cancel_job(self, job_id: str, request: Request) -> JobStatus:
        """A queued job is cancelled at once; a running one stops within a step or two. 409 if finished."""
        return await self._jobs_api().cancel(job_id, request)

    @api.get("/v1/jobs/{job_id}/result", response_model=ImageJobResult | VideoJobResult)
    async def get_job_result(self, job_id: str, request: Request):
        """The sync endpoint's JSON, with links to the files instead of base64. 409 until succeeded."""
        return await self._jobs_api().result(job_id, request)

    @api.get("/v1/jobs/{job_id}/files/{name}", name="get_job_file",
             responses={200: {"content": {"image/png": {}, "video/mp4": {}, "image/gif": {}, "image/webp": {}}}})
    async def get_job_file(self, job_id: str, name: str) -> Response:
        return await self._jobs_api().file(job_id, name)

    @api.get("/v1/controls")
    async def get_controls(self) -> dict:
        """ControlNet control types (as the A1111 extension's module list): each one's parameters
        with defaults and ranges, and the deployed models that take it."""
        return {"controls": self._service.controls()}

    @api.post(
        "/v1/controls/preview",
        response_model=ControlPreviewResponse,
        responses={200: {"content": {"image/png": {}}}},
    )
    async def post_control_preview(self, request: ControlPreviewRequest):
        """The control map alone (the A1111 extension's /controlnet/detect): what the model would follow."""
        response, png = await self._service.preview_control(request)
        if request.response_format == "json":
            return response
        metadata = response.model_dump(exclude={"b64_png"})
        return Response(content=png, media_type="image/png",
                        headers={"X-Genserve-Metadata": json.dumps(metadata, separators=(",", ":"))})

    @api.get("/v1/models")
    async def get_models(self) -> dict:
        """Each model's limits and defaults, with where its replica loaded it from and on what."""
        service = self._service
        infos = await asyncio.gather(*(_info(service.generators[spec["id"]]) for spec in service.models()))
        models = [{**spec, "deployment": info} for spec, info in zip(service.models(), infos)]
        videos = []
        if self._videos is not None:
            config = self._videos.config
            videos.append({
                "id": "svd", "default_width": config.default_width, "default_height": config.default_height,
                "default_steps": config.default_steps, "deployment": await _info(self._videos.svd),
            })
        return {"models": models, "video_models": videos, "quality_policy": service.policy.model_dump()}

    @api.get("/v1/loras")
    async def get_loras(self) -> dict:
        """LoRA adapters a request may name in `loras`, each with its model family and the deployed
        models that take it; `families` groups the names by family."""
        # A rescan (when the directory changed) reads safetensors headers: off the event loop.
        return await asyncio.to_thread(self._service.loras_available)

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        service = self._service
        downstream = {"enhancer": service.enhancer, "scorer": service.scorer}
        downstream.update({f"generator:{name}": handle for name, handle in service.generators.items()})
        if self._videos is not None:
            downstream["video"] = self._videos.svd
        if self._jobs is not None:
            downstream["jobs"] = self._jobs.runner
        results = await asyncio.gather(
            *(asyncio.wait_for(_info(handle), HEALTH_TIMEOUT_S) for handle in downstream.values()),
            return_exceptions=True,
        )
        report = {}
        for name, result in zip(downstream, results):
            if isinstance(result, BaseException):
                report[name] = {"ok": False, "error": f"{type(result).__name__}: {result}"[:300]}
            else:
                report[name] = {"ok": True, **result}
        healthy = all(entry["ok"] for entry in report.values())
        return JSONResponse(
            status_code=200 if healthy else 503,
            content={"status": "ok" if healthy else "unavailable", "deployments": report},
        )

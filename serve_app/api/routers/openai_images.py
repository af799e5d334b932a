"""The OpenAI Images API: POST /v1/images/generations and GET /v1/models/{model}.

The official `openai` SDK works against `base_url=http://host:8000/v1`. Requests are translated to
`ImageRequest` (serve_app.api.openai_protocol) and run by the same services as POST /v1/images;
`response_format: url` runs a durable job and links its files. Errors on these routes, and only
these, use OpenAI's envelope `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import math

from fastapi import APIRouter, Depends, Request
from starlette.exceptions import HTTPException
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from ray.exceptions import RayActorError

from serve_app.api.app import Services, VideoNotDeployed, field_of, services
from serve_app.api.errors import explain_errors
from serve_app.api.openai_protocol import (
    openai_errors,
    OpenAIError,
    OpenAIImageRequest,
    from_detail,
    images_response,
    openai_model,
    param_name,
    to_image_request,
)
from serve_app.api.schemas import ImageRequest
from serve_app.jobs import http as jobs_http
from serve_app.jobs.model import SUCCEEDED
from serve_app.jobs.schemas import JobSubmission
from serve_app.services.graph import Overloaded, StageTimeout
from serve_app.services.validation import RequestError


class OpenAIRoute(APIRoute):
    """Answers this router's errors in OpenAI's envelope; the rest of the app keeps genserve's shape."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def route(request: Request):
            try:
                return await handler(request)
            except Exception as error:  # noqa: BLE001 - translated or re-raised below
                translated = _openai_error(error)
                if translated is None:
                    raise
                state = getattr(request.app.state, "services", None)
                if state is not None and translated.status < 500:
                    state.record_rejection(self.path, [_metric_field(translated.param)])
                return JSONResponse(status_code=translated.status, content=translated.body(),
                                    headers=translated.headers)

        return route


async def http_exception(request: Request, error: HTTPException):
    """The app's HTTPException handler: OpenAI's envelope on this router's paths (FastAPI raises
    "There was an error parsing the body" before the route's own handler runs), FastAPI's answer elsewhere."""
    from fastapi.exception_handlers import http_exception_handler

    if request.url.path in {route.path for route in router.routes} and 400 <= error.status_code < 500:
        translated = OpenAIError(error.status_code, str(error.detail), "body", None)
        return JSONResponse(status_code=translated.status, content=translated.body(), headers=error.headers)
    return await http_exception_handler(request, error)


def _metric_field(param: str | None) -> str:
    """The field as a metric label: a known field's name, never a caller's key (labels are a fixed set)."""
    name = (param or "body").split(".")[0]
    return name if name in _KNOWN_FIELDS else "unknown_field"


_KNOWN_FIELDS = frozenset({"body", *OpenAIImageRequest.model_fields, *ImageRequest.model_fields})


def _openai_error(error: Exception) -> OpenAIError | None:
    if isinstance(error, OpenAIError):
        return error
    if isinstance(error, RequestValidationError):
        detail = explain_errors(list(error.errors()), OpenAIImageRequest)
        first = detail[0]
        loc = first.get("loc", ())
        param = param_name(loc[1:]) if loc and loc[0] == "body" else field_of(loc)
        more = f" (and {len(detail) - 1} more)" if len(detail) > 1 else ""
        return OpenAIError(400, first["msg"] + more, param, first.get("type"))
    if isinstance(error, RequestError):
        return from_detail(error.detail(), error.status)
    if isinstance(error, jobs_http.JobError):
        if isinstance(error.detail, list):
            return from_detail(error.detail, error.status)
        return OpenAIError(error.status, str(error.detail), None, None,
                           "invalid_request_error" if error.status < 500 else "server_error")
    if isinstance(error, Overloaded):
        retry = error.retry_after_s if error.retry_after_s is not None else 5
        return OpenAIError(error.status, str(error), None, "overloaded", "server_error",
                           headers={"Retry-After": str(max(1, math.ceil(retry)))})
    if isinstance(error, StageTimeout):
        return OpenAIError(504, str(error), None, "timeout", "server_error")
    if isinstance(error, RayActorError):
        # As the app's handler: a lost downstream replica is retryable (Serve replaces it); the
        # SDK retries 503s by itself, honouring Retry-After.
        return OpenAIError(503, f"a replica serving this request was lost; retry. ({type(error).__name__})",
                           None, "replica_lost", "server_error", headers={"Retry-After": "5"})
    if isinstance(error, VideoNotDeployed):
        return OpenAIError(501, "video generation is not deployed", None, None, "server_error")
    return None


router = APIRouter(tags=["openai"], route_class=OpenAIRoute)


@router.post("/v1/images/generations", responses=openai_errors(400, 500, 503, 504))
async def create_image(body: OpenAIImageRequest, request: Request, service: Services = Depends(services)) -> dict:
    """OpenAI's `images.generate`: genserve's generate-score-regenerate graph behind OpenAI's fields.
    `revised_prompt` is the enhanced prompt; `genserve` carries seeds, scores, attempts and timings."""
    image_request = to_image_request(body)
    if body.response_format == "b64_json":
        return images_response(await service.generate_images(image_request))
    return await _url_response(image_request, request, service)


async def _url_response(image_request, request: Request, service: Services) -> dict:
    """Run the request as a durable job (the same as POST /v1/jobs) and link its PNG files."""
    jobs = service.jobs_api()
    submission = JobSubmission(kind="image", request=image_request.model_dump(mode="json", exclude_unset=True))
    status = await jobs.submit(submission, request, JSONResponse(content=None), None)
    job = await jobs.wait(status.id, service.images.request_timeout_s)
    if job is None or not job.finished:
        raise OpenAIError(504, f"job {status.id} did not finish in time; GET /v1/jobs/{status.id} follows it",
                          None, "timeout", "server_error")
    if job.state != SUCCEEDED:
        raise OpenAIError(500, f"job {job.id} {job.state}: {job.error or 'no reason recorded'}", None,
                          job.state, "server_error")
    result = jobs.result_of(job, request)
    base = str(request.base_url).rstrip("/")
    return images_response(result, urls=[base + image.url for image in result.images])


@router.get("/v1/models/{model}", responses=openai_errors(404))
async def retrieve_model(model: str, service: Services = Depends(services)) -> dict:
    """OpenAI's `models.retrieve`: one image model in OpenAI's Model shape."""
    for spec in service.images.models():
        if spec["id"] == model:
            return openai_model(spec["id"])
    raise OpenAIError(404, f"model {model!r} is not deployed (GET /v1/models lists them)", "model", "model_not_found")

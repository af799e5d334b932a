"""The OpenAI Images API: POST /v1/images/generations, POST /v1/images/edits and GET /v1/models/{model}.

The official `openai` SDK works against `base_url=http://host:8000/v1`. Requests are translated to
`ImageRequest` (serve_app.api.openai.protocol) and run by the same services as POST /v1/images;
`response_format: url` runs a durable job and links its files. Errors on these routes, and only
these, use OpenAI's envelope `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import math

from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import ValidationError
from ray.exceptions import RayActorError
from starlette.exceptions import HTTPException

from serve_app.api.deps import services
from serve_app.api.openai.protocol import (
    EDIT_NAMES,
    GENERATION_NAMES,
    OpenAIError,
    OpenAIImageRequest,
    check_stream,
    edit_files,
    form_fields,
    from_detail,
    from_validation_error,
    images_response,
    instruction_edit_files,
    openai_errors,
    openai_model,
    param_name,
    to_image_request,
)
from serve_app.api.openai.streaming import StreamOptions, image_events
from serve_app.jobs.model import SUCCEEDED
from serve_app.protocol.errors import JobError, RequestError, VideoNotDeployed, explain_errors, field_of
from serve_app.protocol.jobs import JobSubmission
from serve_app.protocol.schemas import MAX_REFERENCE_IMAGES, ImageRequest
from serve_app.security.guard import charge_images
from serve_app.services.facade import Services
from serve_app.services.graph import Overloaded, StageTimeout


class OpenAIRoute(APIRoute):
    """Answers this router's errors in OpenAI's envelope; the rest of the app keeps genserve's shape."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def route(request: Request):
            try:
                return await handler(request)
            except Exception as error:  # noqa: BLE001 - translated or re-raised below
                translated = _openai_error(error, EDIT_NAMES if self.path == EDITS_PATH else GENERATION_NAMES)
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


_KNOWN_FIELDS = frozenset({"body", "image", *OpenAIImageRequest.model_fields, *ImageRequest.model_fields})


def _openai_error(error: Exception, names: dict[str, str] = GENERATION_NAMES) -> OpenAIError | None:
    if isinstance(error, OpenAIError):
        return error
    if isinstance(error, RequestValidationError):
        detail = explain_errors(list(error.errors()), OpenAIImageRequest)
        first = detail[0]
        loc = first.get("loc", ())
        param = param_name(loc[1:], names) if loc and loc[0] == "body" else field_of(loc)
        more = f" (and {len(detail) - 1} more)" if len(detail) > 1 else ""
        return OpenAIError(400, first["msg"] + more, param, first.get("type"))
    if isinstance(error, RequestError):
        return from_detail(error.detail(), error.status, names)
    if isinstance(error, JobError):
        if isinstance(error.detail, list):
            return from_detail(error.detail, error.status, names)
        return OpenAIError(error.status, str(error.detail), None, None,
                           "invalid_request_error" if error.status < 500 else "server_error", headers=error.headers)
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


_STREAMED = {200: {"description": "OpenAI's ImagesResponse; with `stream: true`, Server-Sent Events: "
                                  "`partial_image` events, then a `completed` event per image.",
                   "content": {"text/event-stream": {}}}}


@router.post("/v1/images/generations", responses={**_STREAMED, **openai_errors(400, 500, 503, 504)})
async def create_image(body: OpenAIImageRequest, request: Request, service: Services = Depends(services)) -> dict:
    """OpenAI's `images.generate`: genserve's generate-score-regenerate graph behind OpenAI's fields.
    `revised_prompt` is the enhanced prompt; `genserve` carries seeds, scores, attempts and timings.
    genserve's `webhook` ({url, events}, as on POST /v1/jobs) tells a receiver when a `url` job ends."""
    check_stream(body)
    webhook = (body.model_extra or {}).pop("webhook", None)  # the job's, not an image request field
    return await _respond(to_image_request(body), body, request, service, "image_generation", webhook)


EDITS_PATH = "/v1/images/edits"
# Form limits: the files are `image` (several as references) and `mask` (the SDK sends a list of images
# as `image[]`); a text field may carry a base64 control image, so parts are bounded by max_body_bytes
# (BodyLimit), not 1 MiB.
_MAX_FILES, _MAX_FIELDS, _MAX_PART_BYTES = MAX_REFERENCE_IMAGES + 1, 200, 64 * 1024 * 1024


@router.post(EDITS_PATH, responses={**_STREAMED, **openai_errors(400, 500, 503, 504)}, openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {
    "schema": {"type": "object", "required": ["image", "prompt"], "properties": {
        "image": {"type": "string", "format": "binary", "description":
                  "The PNG, JPEG or WebP to edit (init_image); on a model with instruction_edits and no mask, one "
                  "or several (`image[]`), each a reference image, the prompt the instruction."},
        "mask": {"type": "string", "format": "binary", "description":
                 "Where to repaint: fully transparent pixels (OpenAI's convention), or white in an opaque "
                 "black-and-white mask; the image's size."},
        **{name: schema for name, schema in OpenAIImageRequest.model_json_schema()["properties"].items()},
    }, "additionalProperties": True}}}}})
async def edit_image(request: Request, service: Services = Depends(services)) -> dict:
    """OpenAI's `images.edit`: multipart `image` (+ `mask`) and the generations fields. On a model that
    edits by instruction (instruction_edits in GET /v1/models) and without a mask, the images (one or
    several) are reference_images and the prompt the instruction; otherwise image-to-image (no mask) or
    inpainting, by the same graph as POST /v1/images with init_image/mask. genserve's own fields
    (`strength`, `seed`, `mask_blur`, ...) go beside them (the SDK's `extra_body`)."""
    if not request.headers.get("content-type", "").startswith(("multipart/form-data",
                                                                "application/x-www-form-urlencoded")):
        raise OpenAIError(400, "send multipart/form-data with the image as a file (POST /v1/images takes JSON "
                               "with a base64 init_image)", None, "invalid_content_type")
    try:
        form = await request.form(max_files=_MAX_FILES, max_fields=_MAX_FIELDS, max_part_size=_MAX_PART_BYTES)
    except HTTPException as error:
        raise OpenAIError(400, f"the multipart body could not be read: {error.detail}", None,
                          "invalid_multipart") from None
    try:
        fields = form_fields([(key, value) for key, value in form.multi_items()
                              if key not in ("image", "image[]", "mask")])
        images = await _uploads(form.getlist("image") + form.getlist("image[]"), "image", required=True)
        masks = await _uploads(form.getlist("mask"), "mask", required=False)
    finally:
        await form.close()
    try:
        body = OpenAIImageRequest.model_validate(fields, strict=False)  # form values are all text
    except ValidationError as error:
        raise from_validation_error(error, OpenAIImageRequest, EDIT_NAMES) from None
    mask = _one(masks, "mask")
    if not masks and _edits_by_instruction(service, body.model):
        files = instruction_edit_files(images)
    else:
        files = edit_files(_one(images, "image"), mask, service.images.max_input_pixels)
    check_stream(body)
    image_request = to_image_request(body, files, EDIT_NAMES, form=True)
    return await _respond(image_request, body, request, service, "image_edit")


def _edits_by_instruction(service: Services, model: str | None) -> bool:
    """Whether the model an edit names (the default when none) edits by instruction; an unknown model is
    not, and its 400 comes from the request's own checks, naming `model`."""
    try:
        return service.images.spec_of(model).instruction_edits
    except RequestError:
        return False


async def _uploads(values: list, field: str, required: bool) -> list[bytes]:
    """The bytes of each file sent as `field`; an OpenAIError naming it for a missing one or a text value."""
    if not values and required:
        raise OpenAIError(400, f"{field}: Field required (a PNG, JPEG or WebP file part)", field, "missing")
    if any(isinstance(upload, str) for upload in values):
        raise OpenAIError(400, f"{field}: send it as a file part (multipart filename=...), not a text field",
                          field, "invalid_value")
    return [await upload.read() for upload in values]


def _one(values: list[bytes], field: str) -> bytes | None:
    """The one file of `field` an image-to-image or inpainting edit takes; an OpenAIError for several."""
    if len(values) > 1:
        raise OpenAIError(400, f"{field}: this model edits one image per request (image-to-image); got "
                               f"{len(values)}. Several images are reference images on a model with "
                               "instruction_edits (GET /v1/models)", field, "too_many_files")
    return values[0] if values else None


async def _respond(image_request: ImageRequest, body: OpenAIImageRequest, request: Request, service: Services,
                   kind: str, webhook: dict | None = None):
    """b64_json: run it now, charged to the caller's daily image budget as POST /v1/images is;
    url or stream: a durable job (charged when it is submitted); a url job is told to `webhook` too when it ends."""
    if webhook is not None and (body.stream or body.response_format != "url"):
        raise OpenAIError(400, "webhook: a webhook is told when a job ends; use response_format url (a durable job)",
                          "webhook", "invalid_value")
    if body.stream:
        return await _streamed(image_request, body, request, service, kind)
    if body.response_format == "b64_json":
        await charge_images(request, image_request.num_images)
        return images_response(await service.generate_images(image_request),
                               output_format=image_request.output_format)
    return await _url_response(image_request, request, service, webhook)


async def _streamed(image_request: ImageRequest, body: OpenAIImageRequest, request: Request, service: Services,
                    kind: str):
    """Submit the request as a job (with previews when partial images are wanted) and stream it. The
    stream's slot is taken first, so a client at its cap of open streams makes no job."""
    jobs = service.jobs_api()
    wanted = body.partial_images or 0
    data = {**image_request.model_dump(mode="json", exclude_unset=True), "preview": wanted > 0}
    slot = jobs.open_stream(request)
    try:
        job, _, _ = await jobs.create(JobSubmission(kind="image", request=data), request)
    except BaseException:
        slot.release()
        raise
    options = StreamOptions(kind, wanted, body.quality or "auto", image_request.output_format,
                            service.images.request_timeout_s)
    return jobs.stream_response(image_events(jobs, job.id, request, options), slot)


async def _url_response(image_request, request: Request, service: Services, webhook: dict | None = None) -> dict:
    """Run the request as a durable job (the same as POST /v1/jobs) and link its image files."""
    jobs = service.jobs_api()
    try:
        submission = JobSubmission.model_validate({
            "kind": "image", "request": image_request.model_dump(mode="json", exclude_unset=True),
            **({"webhook": webhook} if webhook is not None else {})})
    except ValidationError as error:
        first = error.errors(include_url=False)[0]
        field = ".".join(str(part) for part in first["loc"])
        raise OpenAIError(400, f"{field}: {first['msg']}", field, "invalid_value") from None
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
    return images_response(result, urls=[base + image.url for image in result.images],
                           output_format=image_request.output_format)


@router.get("/v1/models/{model}", responses=openai_errors(404))
async def retrieve_model(model: str, service: Services = Depends(services)) -> dict:
    """OpenAI's `models.retrieve`: one image model in OpenAI's Model shape."""
    for spec in service.images.models():
        if spec["id"] == model:
            return openai_model(spec["id"])
    raise OpenAIError(404, f"model {model!r} is not deployed (GET /v1/models lists them)", "model", "model_not_found")

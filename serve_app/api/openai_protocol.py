"""The OpenAI Images API's wire format, translated to and from genserve's own request and response.

`POST /v1/images/generations` takes OpenAI's fields (`prompt`, `model`, `n`, `size`,
`response_format`, `quality`, `style`, `user`) and genserve's own `ImageRequest` fields beside them
(the SDK sends those through `extra_body`). Nothing is validated here that `ImageRequest` and the
image service validate: OpenAI's fields are renamed, the result goes through `ImageRequest`, and its
errors come back in OpenAI's envelope with `param` naming the field as the client sent it.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from deployments.names import OPENAI_QUALITIES, OPENAI_STYLES, QUALITIES, STYLES
from serve_app.api.errors import explain_errors
from serve_app.api.schemas import ImageRequest, ImageResponse

_SIZE = re.compile(r"^([1-9][0-9]{0,4})x([1-9][0-9]{0,4})$")
# genserve's field -> the OpenAI field a client set it with.
_OPENAI_NAMES = {"num_images": "n", "width": "size", "height": "size"}


class OpenAIError(Exception):
    """An error answered in OpenAI's envelope: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error (4xx) or server_error (5xx).")
    param: str | None = Field(None, description="The request field at fault, as the client named it.")
    code: str | None = None


class OpenAIErrorBody(BaseModel):
    """OpenAI's error envelope, which the OpenAI-compatible routes answer in."""

    error: OpenAIErrorDetail


def openai_errors(*statuses: int) -> dict[int, dict]:
    """`responses=` for an OpenAI-compatible route: its own errors in OpenAI's envelope, and what the
    app answers before the route runs (the key check, the body limit) in genserve's shape."""
    from serve_app.api.responses import GUARDED, errors

    described = {status: {"model": OpenAIErrorBody, "description": text} for status, text in {
        400: "A field is invalid; `param` names it.", 404: "No such model.",
        500: "The job behind a `url` result failed.", 501: "Not deployed.",
        503: "Overloaded or a replica was lost; retry after `Retry-After` seconds.",
        504: "The request's deadline passed.",
    }.items() if status in statuses}
    return {**errors(413, *GUARDED), **described}


class OpenAIImageRequest(BaseModel):
    """`POST /v1/images/generations`: OpenAI's fields, and any `POST /v1/images` field beside them."""

    model_config = ConfigDict(extra="allow")

    prompt: str = Field(description="What to draw (1-2000 characters).")
    model: str | None = Field(None, description="A model id from GET /v1/models; default: the config's default model.")
    n: int | None = Field(None, description="Images to return (genserve's num_images, 1-4).")
    size: str | None = Field(
        None, description="'WxH' (each 256-2048, a multiple of 16) or 'auto' (the model's default size)."
    )
    response_format: Literal["b64_json", "url"] = Field(
        "b64_json", description="b64_json: the PNGs inline; url: links to the PNGs of a durable job."
    )
    quality: str | None = Field(
        None, description="OpenAI's " + ", ".join(map(repr, OPENAI_QUALITIES)) + " or genserve's "
                          + ", ".join(map(repr, QUALITIES)) + " (docs/agents.md has the mapping)."
    )
    style: str | None = Field(
        None, description="OpenAI's " + ", ".join(map(repr, OPENAI_STYLES)) + " or genserve's "
                          + ", ".join(map(repr, STYLES)) + "."
    )
    user: str | None = Field(None, max_length=256, description="An end-user id; accepted, not stored.")
    safety_identifier: str | None = Field(None, max_length=256, description="As `user`: accepted, not stored.")
    output_format: Literal["png"] | None = Field(None, description="Only 'png' (with the generation parameters).")


def _mapped(value: str | None, field: str, table: dict, own: tuple[str, ...]):
    if value is None or value in own:
        return value
    if value in table:
        return table[value]
    allowed = ", ".join(map(repr, (*table, *own)))
    raise OpenAIError(400, f"{field}: {value!r} is not supported (allowed: {allowed})", field, "invalid_value")


def _size(size: str | None) -> dict:
    if size is None or size == "auto":
        return {}
    match = _SIZE.match(size)
    if match is None:
        raise OpenAIError(400, f"size: {size!r} is not 'WxH' or 'auto' (allowed: 'auto' or 'WxH', each 256-2048, "
                               "a multiple of 16)", "size", "invalid_value")
    return {"width": int(match.group(1)), "height": int(match.group(2))}


def to_image_request(body: OpenAIImageRequest) -> ImageRequest:
    """The genserve request an OpenAI one means; an `OpenAIError` naming the field if it is not valid."""
    own = dict(body.model_extra or {})
    for openai_name, names in (("n", ("num_images",)), ("size", ("width", "height"))):
        given = [name for name in names if name in own]
        if getattr(body, openai_name) is not None and given:
            raise OpenAIError(400, f"{openai_name}: give {openai_name} or {' and '.join(given)}, not both",
                              openai_name, "conflicting_fields")
    data = {**own, "prompt": body.prompt}
    if body.model is not None:
        data["model"] = body.model
    if body.n is not None:
        data["num_images"] = body.n
    data.update(_size(body.size))
    quality = _mapped(body.quality, "quality", OPENAI_QUALITIES, QUALITIES)
    if quality is not None:
        data["quality"] = quality
    style = _mapped(body.style, "style", OPENAI_STYLES, STYLES)
    if style is not None:
        data["style"] = style
    try:
        return ImageRequest.model_validate(data)
    except ValidationError as error:
        raise from_validation_error(error, ImageRequest) from None


def param_name(loc) -> str:
    """The field as the OpenAI client named it: 'n' for num_images, 'size' for width or height."""
    parts = [str(part) for part in loc]
    if parts and parts[0] in _OPENAI_NAMES:
        return _OPENAI_NAMES[parts[0]]
    return ".".join(parts) or "body"


def from_validation_error(error: ValidationError, model: type[BaseModel]) -> OpenAIError:
    """The first schema error, in OpenAI's envelope, its message naming the allowed values."""
    errors = [{**item, "loc": ("body", *item["loc"])} for item in error.errors(include_url=False)]
    return from_detail(explain_errors(errors, model), 400)


def from_detail(detail: list[dict], status: int) -> OpenAIError:
    """genserve's 422 detail items (schema or `RequestError`) as one OpenAI error about the first field."""
    first = detail[0]
    loc = [part for part in first.get("loc", ()) if part not in ("body", "request")]
    param = param_name(loc)
    message = first["msg"]
    if first.get("allowed") and "(allowed:" not in message:
        message += f" (allowed: {first['allowed']})"
    field = ".".join(str(part) for part in loc)
    if field and param != field and message.startswith(f"{field}:"):
        message = f"{param} ({field}):" + message[len(field) + 1:]
    if len(detail) > 1:
        message += f" (and {len(detail) - 1} more: " + "; ".join(item["msg"] for item in detail[1:]) + ")"
    return OpenAIError(400 if status == 422 else status, message, param, first.get("type"))


def openai_model(model_id: str) -> dict:
    """A model in OpenAI's Model shape (GET /v1/models's `data`, GET /v1/models/{id})."""
    return {"id": model_id, "object": "model", "created": 0, "owned_by": "genserve"}


def size_of(width: int, height: int) -> str:
    return f"{width}x{height}"


def genserve_metadata(response: ImageResponse) -> dict:
    """What genserve adds beside OpenAI's fields: the full response (seeds, scores, attempts,
    timings) without the pixels, so a client of the OpenAI route can still reproduce and judge."""
    return response.model_dump(mode="json", exclude={"images": {"__all__": {"b64_png"}}})


def images_response(response: ImageResponse, urls: list[str] | None = None) -> dict:
    """OpenAI's ImagesResponse: `created`, `data[]` (b64_json or url, revised_prompt), and genserve's metadata."""
    if urls is None:
        data = [{"b64_json": image.b64_png, "revised_prompt": response.enhanced_prompt} for image in response.images]
    else:
        data = [{"url": url, "revised_prompt": response.enhanced_prompt} for url in urls]
    return {
        "created": response.created,
        "data": data,
        "output_format": "png",
        "size": size_of(response.width, response.height),
        "genserve": genserve_metadata(response),
    }

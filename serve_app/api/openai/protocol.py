"""The OpenAI Images API's wire format, translated to and from genserve's own request and response.

`POST /v1/images/generations` (JSON) and `POST /v1/images/edits` (multipart: the `image` and `mask`
files become `init_image` and `mask`) take OpenAI's fields (`prompt`, `model`, `n`, `size`,
`response_format`, `quality`, `style`, `user`) and genserve's own `ImageRequest` fields beside them
(the SDK sends those through `extra_body`). Nothing is validated here that `ImageRequest` and the
image service validate: OpenAI's fields are renamed, the result goes through `ImageRequest`, and its
errors come back in OpenAI's envelope with `param` naming the field as the client sent it.
"""

from __future__ import annotations

import base64
import io
import json
import re
import time
import warnings
from typing import Literal

from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from deployments.names import OPENAI_QUALITIES, OPENAI_STYLES, QUALITIES, STYLES
from serve_app.protocol.errors import explain_errors
from serve_app.protocol.schemas import ImageRequest, ImageResponse

MAX_PARTIAL_IMAGES = 3  # OpenAI's range for partial_images
_SIZE = re.compile(r"^([1-9][0-9]{0,4})x([1-9][0-9]{0,4})$")
# genserve's field -> the OpenAI field a client set it with.
_OPENAI_NAMES = {"num_images": "n", "width": "size", "height": "size"}
# ... and on POST /v1/images/edits, where the `image` files are genserve's init_image, or its
# reference_images on a model that edits by instruction.
GENERATION_NAMES = _OPENAI_NAMES
EDIT_NAMES = {**_OPENAI_NAMES, "init_image": "image", "reference_images": "image"}


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

    # Strict as genserve's own bodies ("stream": 0 is not a bool); the edits route's form values,
    # all text, are validated with strict=False.
    model_config = ConfigDict(extra="allow", strict=True)

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
    output_format: str | None = Field(
        None, description="png (the default, with the generation parameters in its text chunks), jpeg or webp (the "
                          "parameters in EXIF): genserve's output_format.")
    output_compression: int | None = Field(
        None, description="jpeg and webp only: the quality, 0-100 (genserve's output_compression).")
    stream: bool = Field(
        False, description="Answer with Server-Sent Events: `partial_images` denoising previews, then each image "
                           "(`image_generation.completed`, `image_edit.completed` on edits). The request runs as a "
                           "durable job, which goes on if the stream is closed.")
    partial_images: int | None = Field(
        None, ge=0, le=MAX_PARTIAL_IMAGES,
        description=f"With stream: how many denoising previews to send before the image, 0-{MAX_PARTIAL_IMAGES} "
                    "(fewer when the model has no preview factors or finishes first).")


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


def to_image_request(body: OpenAIImageRequest, files: dict[str, str] | None = None,
                     names: dict[str, str] = _OPENAI_NAMES, form: bool = False) -> ImageRequest:
    """The genserve request an OpenAI one means; an `OpenAIError` naming the field if it is not valid.

    `files`: the edits route's uploads as genserve fields (`init_image`, `mask`: base64). `form`: the
    values came from a multipart form, where every value is text, so "7" may stand for 7 (JSON
    bodies stay strict)."""
    own = dict(body.model_extra or {})
    files = files or {}
    for name in ("init_image", "reference_images"):
        if name in files and name in own:
            raise OpenAIError(400, f"image: give the image files or {name}, not both", "image", "conflicting_fields")
    for openai_name, fields in (("n", ("num_images",)), ("size", ("width", "height"))):
        given = [name for name in fields if name in own]
        if getattr(body, openai_name) is not None and given:
            raise OpenAIError(400, f"{openai_name}: give {openai_name} or {' and '.join(given)}, not both",
                              openai_name, "conflicting_fields")
    data = {**own, **files, "prompt": body.prompt}
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
    for name in ("output_format", "output_compression"):  # genserve's fields of the same name and meaning
        if getattr(body, name) is not None:
            data[name] = getattr(body, name)
    try:
        return ImageRequest.model_validate(data, strict=False if form else None)
    except ValidationError as error:
        raise from_validation_error(error, ImageRequest, names) from None


def param_name(loc, names: dict[str, str] = _OPENAI_NAMES) -> str:
    """The field as the OpenAI client named it: 'n' for num_images, 'size' for width or height."""
    parts = [str(part) for part in loc]
    if parts and parts[0] in names:
        return names[parts[0]]
    return ".".join(parts) or "body"


def from_validation_error(error: ValidationError, model: type[BaseModel],
                          names: dict[str, str] = _OPENAI_NAMES) -> OpenAIError:
    """The first schema error, in OpenAI's envelope, its message naming the allowed values."""
    errors = [{**item, "loc": ("body", *item["loc"])} for item in error.errors(include_url=False)]
    return from_detail(explain_errors(errors, model), 400, names)


def from_detail(detail: list[dict], status: int, names: dict[str, str] = _OPENAI_NAMES) -> OpenAIError:
    """genserve's 422 detail items (schema or `RequestError`) as one OpenAI error about the first field."""
    first = detail[0]
    loc = [part for part in first.get("loc", ()) if part not in ("body", "request")]
    param = param_name(loc, names)
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
    return response.model_dump(mode="json", exclude={"images": {"__all__": {"b64_png", "b64_image"}}})


def images_response(response: ImageResponse, urls: list[str] | None = None, output_format: str = "png") -> dict:
    """OpenAI's ImagesResponse: `created`, `data[]` (b64_json or url, revised_prompt), `output_format`,
    and genserve's metadata."""
    if urls is None:
        data = [{"b64_json": image.b64_png if image.output_format == "png" else image.b64_image,
                 "revised_prompt": response.enhanced_prompt} for image in response.images]
    else:
        data = [{"url": url, "revised_prompt": response.enhanced_prompt} for url in urls]
    return {
        "created": response.created,
        "data": data,
        "output_format": output_format,
        "size": size_of(response.width, response.height),
        "genserve": genserve_metadata(response),
    }


def check_stream(body: OpenAIImageRequest) -> None:
    """`partial_images` only with `stream`, and a stream sends base64 images, never links."""
    if body.partial_images is not None and not body.stream:
        raise OpenAIError(400, "partial_images: partial images are sent only on a stream; set stream: true",
                          "partial_images", "invalid_value")
    if body.stream and body.response_format == "url":
        raise OpenAIError(400, "response_format: a stream sends b64_json images; 'url' cannot be streamed "
                               "(allowed with stream: 'b64_json')", "response_format", "invalid_value")


def partial_image_event(kind: str, index: int, b64_png: str, size: str, quality: str) -> dict:
    """OpenAI's ImageGenPartialImageEvent (`kind` image_generation) or ImageEditPartialImageEvent (image_edit):
    a denoising preview, always a PNG, `size` its own."""
    return {"type": f"{kind}.partial_image", "partial_image_index": index, "b64_json": b64_png,
            "background": "opaque", "created_at": int(time.time()), "output_format": "png", "size": size,
            "quality": quality}


def completed_event(kind: str, b64_image: str, response: ImageResponse, output_format: str, quality: str) -> dict:
    """OpenAI's ImageGenCompletedEvent or ImageEditCompletedEvent: one image, with `revised_prompt` and
    genserve's metadata beside OpenAI's fields. `usage` counts tokens of OpenAI's GPT image models, which
    genserve does not have: zeros."""
    return {"type": f"{kind}.completed", "b64_json": b64_image, "background": "opaque",
            "created_at": int(time.time()), "output_format": output_format,
            "size": size_of(response.width, response.height), "quality": quality,
            "usage": {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0,
                      "input_tokens_details": {"image_tokens": 0, "text_tokens": 0}},
            "revised_prompt": response.enhanced_prompt, "genserve": genserve_metadata(response)}


def error_event(message: str, code: str | None) -> dict:
    """A stream's failure after it began, in OpenAI's error envelope (the SDK raises `openai.APIError`)."""
    return {"type": "error", **OpenAIError(500, message, None, code, "server_error").body()}


# POST /v1/images/edits: OpenAI's multipart form.

# genserve fields that hold objects or lists: a form may send them as JSON text (`-F 'hires={"scale": 2}'`)
# or in the bracket notation the openai SDK writes for `extra_body` (`hires[scale]`, `loras[][name]`).
_STRUCTURED = frozenset(
    name for name, schema in ImageRequest.model_json_schema()["properties"].items()
    if any(marker in json.dumps(schema) for marker in ('"$ref"', '"array"', '"object"'))
)
_KEY = re.compile(r"^([^\[\]]+)((?:\[[^\[\]]*\])*)$")


def form_fields(items: list[tuple[str, object]]) -> dict:
    """A multipart form's fields as a JSON-like dict: `a[b]` nests, `a[]` appends, `a[][k]` builds a
    list of objects (a new one whenever `k` repeats), a repeated plain key becomes a list; JSON text
    is parsed for genserve's object and list fields. Values stay strings: the request models coerce them."""
    data: dict = {}
    for key, value in items:
        match = _KEY.match(key)
        if match is None:
            raise OpenAIError(400, f"{key}: not a field name (use name, name[key] or name[])", key, "invalid_field")
        path = [match.group(1), *re.findall(r"\[([^\[\]]*)\]", match.group(2))]
        if len(path) == 1:
            name = path[0]
            if isinstance(value, str) and name in _STRUCTURED and value.lstrip()[:1] in ("{", "["):
                try:
                    value = json.loads(value)
                except ValueError:
                    raise OpenAIError(400, f"{name}: not valid JSON", name, "invalid_json") from None
            if name in data:
                data[name] = [*data[name], value] if isinstance(data[name], list) else [data[name], value]
            else:
                data[name] = value
            continue
        _insert(data, path, value, key)
    return data


def _insert(node, path: list[str], value, key: str) -> None:
    for index, part in enumerate(path):
        last = index == len(path) - 1
        following = None if last else path[index + 1]
        if part == "":
            if not isinstance(node, list):
                raise OpenAIError(400, f"{key}: mixes a list and an object", path[0], "invalid_field")
            if last:
                node.append(value)
                return
            if not node or not isinstance(node[-1], dict) or following in node[-1]:
                node.append({})
            node = node[-1]
            continue
        if not isinstance(node, dict):
            raise OpenAIError(400, f"{key}: mixes a list and an object", path[0], "invalid_field")
        if last:
            node[part] = value
            return
        node = node.setdefault(part, [] if following == "" else {})


def _rgba(raw: bytes, max_pixels: int) -> Image.Image | None:
    """The upload with its alpha channel, if it has one and can be read within the pixel limit
    (checked before decoding); None otherwise (then genserve's own checks judge the bytes)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(raw))
            if image.width * image.height > max_pixels:
                return None
            if image.mode not in ("RGBA", "LA", "PA") and "transparency" not in image.info:
                return None
            return image.convert("RGBA")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning, UnidentifiedImageError, OSError,
            SyntaxError, ValueError):
        return None


def transparent_mask(raw: bytes, max_pixels: int) -> bytes | None:
    """OpenAI's mask convention in genserve's: where the upload is fully transparent (alpha 0) is
    repainted. A PNG mask (white = repaint, black = kept) as bytes, or None when the upload has no
    fully transparent pixel (then it is read as genserve's own black-and-white mask, or has none)."""
    image = _rgba(raw, max_pixels)
    if image is None:
        return None
    alpha = image.getchannel("A")
    if alpha.getextrema()[0] != 0:
        return None
    mask = alpha.point(lambda level: 255 if level == 0 else 0)
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    return buffer.getvalue()


def instruction_edit_files(images: list[bytes]) -> dict[str, list[str]]:
    """The edits route's uploads, without a mask, for a model that edits by instruction: each image a
    reference (base64), the prompt the instruction."""
    return {"reference_images": [base64.b64encode(image).decode() for image in images]}


def edit_files(image: bytes, mask: bytes | None, max_pixels: int) -> dict[str, str]:
    """The edits route's uploads as genserve's base64 `init_image` and `mask`.

    As OpenAI's edits API: the mask's fully transparent pixels mark what to repaint; without a mask,
    the image's own fully transparent pixels do (and without either, the whole image is edited:
    image-to-image). A mask without transparency is genserve's (white = repaint), passed on as sent."""
    files = {"init_image": base64.b64encode(image).decode()}
    if mask is not None:
        files["mask"] = base64.b64encode(transparent_mask(mask, max_pixels) or mask).decode()
    else:
        derived = transparent_mask(image, max_pixels)
        if derived is not None:
            files["mask"] = base64.b64encode(derived).decode()
    return files

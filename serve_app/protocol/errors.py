"""The error envelope: the errors every layer raises for a caller, and the 422 bodies that say
what is allowed, not only what was wrong.

Every error body is `{"detail": ...}`; a 422's detail is a list of `{loc, msg, type, allowed}`, the
shape of pydantic's errors, whether the schema or a model-dependent rule refused the request.

Pydantic reports the first constraint a value breaks ("Input should be a multiple of 16"). The
handler below adds the field's whole allowed range, read from the request model's JSON schema, so
the message and the schema at /docs can never disagree.
"""

from __future__ import annotations

from functools import lru_cache
from typing import get_args

from pydantic import BaseModel


@lru_cache(maxsize=32)
def _properties(model: type[BaseModel]) -> dict:
    return model.model_json_schema().get("properties", {})


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _describe(schema: dict) -> str | None:
    for option in schema.get("anyOf", []):  # Optional[...] fields: describe the non-null branch
        if option.get("type") != "null":
            return _describe(option)
    parts = []
    if "enum" in schema:
        parts.append("one of " + ", ".join(repr(value) for value in schema["enum"]))
    if "const" in schema:
        parts.append(f"exactly {schema['const']!r}")
    low, high = schema.get("minimum"), schema.get("maximum")
    if low is not None and high is not None:
        parts.append(f"{_number(low)}-{_number(high)}")
    elif low is not None:
        parts.append(f"at least {_number(low)}")
    elif high is not None:
        parts.append(f"at most {_number(high)}")
    if "multipleOf" in schema:
        parts.append(f"a multiple of {_number(schema['multipleOf'])}")
    if "minItems" in schema or "maxItems" in schema:
        parts.append(f"{schema.get('minItems', 0)}-{schema.get('maxItems', 'any')} items")
    if "minLength" in schema or "maxLength" in schema:
        parts.append(f"{schema.get('minLength', 0)}-{schema.get('maxLength', 'any')} characters")
    return ", ".join(parts) or None


def allowed_values(model: type[BaseModel], field: str, *nested: str) -> str | None:
    """What `field` of `model` accepts, e.g. '256-2048, a multiple of 16'; None if unconstrained.

    `nested` names a field inside a nested model field, e.g. ("control", "conditioning_scale")."""
    if nested:
        inner = _nested_model(model, field)
        return allowed_values(inner, *nested) if inner is not None else None
    schema = _properties(model).get(field)
    return _describe(schema) if schema else None


def _nested_model(model: type[BaseModel], field: str) -> type[BaseModel] | None:
    """The model class of field `field` (Optional unwrapped), or None when it is not a model."""
    info = model.model_fields.get(field)
    if info is None:
        return None
    for candidate in (info.annotation, *get_args(info.annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def explain_errors(errors: list[dict], model: type[BaseModel], prefix: tuple[str, ...] = ()) -> list[dict]:
    """FastAPI's error items, each body-field error named in `msg`, with `allowed` where known.

    `prefix`: where `model` sits inside the body, e.g. ("request",) for the request of a job
    submission; its fields are then named `request.width` and so on.
    """
    explained = []
    start = 1 + len(prefix)
    for error in errors:
        error = {key: value for key, value in error.items() if key != "url"}
        loc = tuple(error.get("loc", ()))
        if len(loc) > start and loc[:start] == ("body", *prefix) and isinstance(loc[start], str):
            field = ".".join(str(part) for part in loc[1:])
            names = []
            for part in loc[start:]:
                if not isinstance(part, str):
                    break
                names.append(part)
            allowed = allowed_values(model, *names)
            error["msg"] = f"{field}: {error['msg']}"
            if allowed:
                error["allowed"] = allowed
                error["msg"] += f" (allowed: {allowed})"
        explained.append(error)
    return explained


class RequestError(ValueError):
    """A request field the chosen model or config cannot accept. The ingress answers 422."""

    status = 422

    def __init__(self, field: str, message: str, allowed: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        self.allowed = allowed

    def __reduce__(self):  # Ray pickles it back to a handle caller
        return (type(self), (self.field, self.message, self.allowed))

    def renamed(self, field: str) -> "RequestError":
        """The same error about `field` (where the request sits inside a larger one)."""
        return type(self)(field, self.message, self.allowed)

    def detail(self, prefix: tuple[str, ...] = ()) -> list[dict]:
        """The shape of schema errors (see explain_errors above), so clients parse one format.

        `prefix`: where the request sits inside the body (("request",) in a job submission)."""
        field = ".".join((*prefix, self.field))
        # A nested field ("loras.0.name") gets pydantic's loc: ["body", "loras", 0, "name"].
        path = [int(part) if part.isdigit() else part for part in self.field.split(".")]
        return [{"loc": ["body", *prefix, *path], "msg": f"{field}: {self.message}", "type": self.kind,
                 "allowed": self.allowed}]

    kind = "value_error"


class PromptBlocked(RequestError):
    """The prompt contains a term of the configured blocklist: refused with 400, naming the field."""

    status = 400
    kind = "blocked"


class JobError(Exception):
    """An HTTP error of the jobs API (404, 409, 422, 501), answered as {"detail": ...}."""

    def __init__(self, status: int, detail, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers


class VideoNotDeployed(LookupError):
    """A video request to a service whose config has no video_models: 501."""


def field_of(loc) -> str:
    """'width' for ('body', 'width'); 'body' for errors about the body as a whole."""
    parts = [str(part) for part in loc[1:]] if loc and loc[0] == "body" else [str(part) for part in loc]
    return ".".join(parts) or "body"

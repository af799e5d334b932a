"""The error statuses each route can answer, with one error model, for the OpenAPI document.

Every error body is `{"detail": ...}`: a sentence, or (400, 422) a list of items that name the
field (`loc`, `msg`, `type`, and `allowed` where known). Overload and health answers add `reason`.
A route lists exactly the statuses it can return, so a client generated from /openapi.json
(or a fuzzer checking conformance) knows each one.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class ErrorItem(BaseModel):
    model_config = ConfigDict(extra="allow")  # pydantic adds `input` and `ctx`

    loc: list[str | int] = Field(description="Where the bad value is: ['body', 'width'], ['query', 'cursor'].")
    msg: str = Field(description="What is wrong, naming the field.")
    type: str = Field(description="The error's kind, e.g. 'value_error', 'missing', 'bool_type'.")
    allowed: str | None = Field(None, description="What the field accepts, where it is a range or a set.")


class ErrorBody(BaseModel):
    detail: str | list[ErrorItem] = Field(description="What went wrong: a sentence, or one item per bad field.")
    reason: str | None = Field(None, description="Why a 503 or 504: overloaded, out_of_memory, deadline, ...")


_DESCRIPTIONS = {
    401: "Missing, wrong, expired or revoked API key (`WWW-Authenticate: Bearer`); see docs/security.md.",
    403: "The key lacks the scope this route needs, or (no keys configured) the client is not on loopback.",
    400: "The body is not valid JSON, or the prompt contains a blocklisted term.",
    404: "No such job (it never existed or expired), or no such file of it.",
    409: "The job is not in a state that allows this (see `detail`).",
    413: "The body is larger than max_body_bytes.",
    422: "A field is missing, of the wrong type or out of range; `detail` names it and what it allows.",
    429: "A per-key or per-client limit (requests per minute, concurrent requests, active jobs, daily images; "
         "auth.client_limits per remote address without a key) was reached, "
         "too many open event streams, or the job queue is full; retry after `Retry-After` seconds.",
    501: "This feature is not deployed (video needs a `video_models:` entry in the config; jobs need `jobs:`).",
    503: "Overloaded (a queue is full) or a replica is unavailable; retry after `Retry-After` seconds.",
    504: "The request's deadline (request_timeout_s) passed before it finished; retry after `Retry-After` seconds.",
}

# What every route that calls a deployment can answer: back-pressure and lost replicas.
OVERLOAD = (503,)
# What a POST with a JSON body can answer before it reaches a deployment.
BODY = (400, 413, 422)


# What the key check in front of every route but the public ones can answer (serve_app.security).
GUARDED = (401, 403, 429)


def errors(*statuses: int, public: bool = False) -> dict[int, dict]:
    """`responses=` for a route: each status with its description and the error model; a route
    that is not public can also answer the key check's statuses."""
    statuses = (*statuses, *(() if public else GUARDED))
    return {status: {"model": ErrorBody, "description": _DESCRIPTIONS[status]} for status in sorted(set(statuses))}

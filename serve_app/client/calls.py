"""What each client method sends and how its answer is read: shared by `Client` and `AsyncClient`,
which differ only in how they wait. A `Call` is one HTTP request, whether it may be retried, and
the function that turns a 2xx response into the server's model; `outcome` decides what one
attempt's response means (the answer, a retry after a delay, or an error) and `Waiting` what each
event of a `wait` means, so the two clients only send, read and sleep."""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

import httpx
from pydantic import BaseModel, TypeAdapter

from serve_app.client.errors import JobFailed, RequestRejected, ServerError, ServiceBusy, Unreachable
from serve_app.client.events import JobEvent
from serve_app.client.retry import RETRY_STATUSES, RetryPolicy, retry_after
from serve_app.types import (
    EnhanceRequest,
    EnhanceResponse,
    ImageJobResult,
    ImageRequest,
    ImageResponse,
    JobList,
    JobStatus,
    ScoreRequest,
    ScoreResponse,
    VideoJobResult,
    VideoRequest,
    VideoResponse,
)

DEFAULT_URL = "http://127.0.0.1:8000"
URL_ENV = "GENSERVE_URL"
API_KEY_ENV = "GENSERVE_API_KEY"
# Generation can take minutes on a busy GPU; reads are quick. The read timeout applies per call.
DEFAULT_TIMEOUT = httpx.Timeout(600.0, connect=10.0)
_JOB_RESULT = TypeAdapter(ImageJobResult | VideoJobResult)


def base_url(url: str | None) -> str:
    return (url or os.environ.get(URL_ENV) or DEFAULT_URL).rstrip("/")


def auth_headers(api_key: str | None) -> dict[str, str]:
    key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
    return {"Authorization": f"Bearer {key}"} if key else {}


@dataclass
class Call:
    method: str
    path: str
    parse: Callable[[httpx.Response], Any]
    retryable: bool
    json: Any = None
    params: dict | None = None
    headers: dict = field(default_factory=dict)


def _model(kind: type[BaseModel]) -> Callable[[httpx.Response], Any]:
    return lambda response: kind.model_validate(response.json())


def _json(response: httpx.Response) -> Any:
    return response.json()


def _request(kind: type[BaseModel], request: BaseModel | dict | None, fields: dict) -> BaseModel:
    """The request model, validated here first: a bad field fails before anything is sent."""
    if request is None:
        return kind(**fields)
    if fields:
        raise TypeError(f"pass either a {kind.__name__} or its fields as keywords, not both")
    return request if isinstance(request, kind) else kind.model_validate(request)


def _body(request: BaseModel) -> dict:
    return request.model_dump(mode="json", exclude_unset=True)


def images(request: ImageRequest | dict | None, fields: dict) -> Call:
    request = _request(ImageRequest, request, fields)
    # With a seed, sending it again gives the same images: safe to retry.
    return Call("POST", "/v1/images", _model(ImageResponse), retryable=request.seed is not None, json=_body(request))


def videos(request: VideoRequest | dict | None, fields: dict) -> Call:
    request = _request(VideoRequest, request, fields)
    if request.response_format != "json":
        raise ValueError("the client reads videos as JSON; use response_format='json' (the default)")
    return Call("POST", "/v1/videos", _model(VideoResponse), retryable=request.seed is not None, json=_body(request))


def enhance(request: EnhanceRequest | dict | None, fields: dict) -> Call:
    request = _request(EnhanceRequest, request, fields)
    return Call("POST", "/v1/prompts/enhance", _model(EnhanceResponse), retryable=True, json=_body(request))


def scores(request: ScoreRequest | dict | None, fields: dict) -> Call:
    request = _request(ScoreRequest, request, fields)
    return Call("POST", "/v1/scores", _model(ScoreResponse), retryable=True, json=_body(request))


def get(path: str, params: dict | None = None) -> Call:
    return Call("GET", path, _json, retryable=True, params=params)


def submit(kind: str, request: BaseModel | dict, idempotency_key: str | None) -> Call:
    model = ImageRequest if kind == "image" else VideoRequest
    if kind not in ("image", "video"):
        raise ValueError(f"kind must be 'image' or 'video'; got {kind!r}")
    body = _body(_request(model, request, {}))
    # A key of our own when the caller gives none: the server answers a repeat with the first job,
    # so a submit whose answer was lost can be sent again without running the job twice.
    key = idempotency_key or str(uuid.uuid4())
    return Call("POST", "/v1/jobs", _model(JobStatus), retryable=True, json={"kind": kind, "request": body},
                headers={"Idempotency-Key": key})


def job(job_id: str) -> Call:
    return Call("GET", f"/v1/jobs/{job_id}", _model(JobStatus), retryable=True)


def jobs(state: str | None, limit: int, cursor: str | None) -> Call:
    params = {key: value for key, value in {"state": state, "limit": limit, "cursor": cursor}.items()
              if value is not None}
    return Call("GET", "/v1/jobs", _model(JobList), retryable=True, params=params)


def cancel(job_id: str) -> Call:
    # Cancelling twice is answered 409 the second time, never cancels anything else: safe.
    return Call("POST", f"/v1/jobs/{job_id}/cancel", _model(JobStatus), retryable=True)


def result(job_id: str) -> Call:
    return Call("GET", f"/v1/jobs/{job_id}/result", lambda response: _JOB_RESULT.validate_python(response.json()),
                retryable=True)


def file(job_id: str, name: str) -> Call:
    return Call("GET", f"/v1/jobs/{job_id}/files/{name}", lambda response: response.content, retryable=True)


def health() -> Call:
    # 503 from /healthz is an answer (which deployment is down), not back-pressure.
    return Call("GET", "/healthz", _json, retryable=False)


def detail_of(response: httpx.Response):
    try:
        body = response.json()
    except ValueError:
        return response.text[:500]
    return body.get("detail", body) if isinstance(body, dict) else body


def raise_for(call: Call, response: httpx.Response) -> None:
    """A non-2xx answer that is not to be retried, as the client's error."""
    if response.status_code < 400 or (call.path == "/healthz" and response.status_code == 503):
        return
    if 400 <= response.status_code < 500 and response.status_code not in RETRY_STATUSES:
        raise RequestRejected(response.status_code, detail_of(response), call.method, call.path)
    raise ServerError(response.status_code, detail_of(response))


def outcome(call: Call, response: httpx.Response, retry: RetryPolicy, attempt: int, waited: float) -> tuple[Any, float | None]:
    """What attempt `attempt` of `call` got, after `waited` seconds of waiting so far: (the parsed
    answer, None), or (None, the seconds to wait before sending it again). Raises the client's error
    for a refusal, or for 503/429 on a call that may not be retried or has no wait left."""
    if response.status_code not in RETRY_STATUSES or call.path == "/healthz":
        raise_for(call, response)
        return call.parse(response), None
    hint = retry_after(response.headers.get("Retry-After"))
    delay = retry.delay(attempt, hint)
    if not call.retryable or waited + delay > retry.max_wait_s:
        raise ServiceBusy(response.status_code, detail_of(response), hint, attempt)
    return None, delay


@contextlib.contextmanager
def reaching(where: str):
    """A transport failure inside (no connection, a dropped stream) as `Unreachable`, naming `where`."""
    try:
        yield
    except httpx.TransportError as error:
        raise Unreachable(f"{where}: {type(error).__name__}: {error}") from error


def finished(status: JobStatus) -> JobStatus:
    """A succeeded job's status; a failed or cancelled one raises `JobFailed`."""
    if status.state != "succeeded":
        raise JobFailed(status)
    return status


class Waiting:
    """One `wait` for a job: what each event, or each status read after a dropped stream, means, and
    its deadline. The clients only read the stream and sleep between tries."""

    def __init__(self, job_id: str, on_event: Callable[[JobEvent], object] | None, timeout_s: float | None):
        self.job_id = job_id
        self.on_event = on_event
        self.timeout_s = timeout_s
        self.deadline = None if timeout_s is None else time.monotonic() + timeout_s

    def past_deadline(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline

    @contextlib.contextmanager
    def reopening(self):
        """A stream that drops inside (`Unreachable`) just ends, to be read again, until the deadline."""
        try:
            yield
        except Unreachable:
            if self.past_deadline():
                raise

    def event(self, event: JobEvent) -> JobStatus | None:
        """The final status when `event` carries one, else None (raises past the deadline)."""
        if self.on_event is not None:
            self.on_event(event)
        if event.event == "error":
            raise RequestRejected(404, event.detail, "GET", f"/v1/jobs/{self.job_id}/events")
        if event.job is not None:
            return finished(event.job)
        self._check(event.state or "running")
        return None

    def status(self, status: JobStatus) -> JobStatus | None:
        """The final status when the job has finished, else None (raises past the deadline)."""
        if status.state in ("succeeded", "failed", "cancelled"):
            return finished(status)
        self._check(status.state)
        return None

    def _check(self, state: str) -> None:
        if self.past_deadline():
            raise TimeoutError(f"job {self.job_id} still {state} after {self.timeout_s:g}s")

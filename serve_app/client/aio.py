"""`AsyncClient`: the asyncio client, method for method the same as `Client` (sync.py), awaited."""

from __future__ import annotations

import asyncio
import time
from typing import AsyncIterator, Awaitable, Callable

import httpx
from httpx_sse import aconnect_sse

from serve_app.client import calls
from serve_app.client.errors import RequestRejected, ServiceBusy, Unreachable
from serve_app.client.events import JobEvent
from serve_app.client.retry import RETRY_STATUSES, RetryPolicy, retry_after
from serve_app.client.sync import STREAM_READ_TIMEOUT_S, _finished
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


class AsyncClient:
    """A running genserve over HTTP, with the server's own request and response models.

    `url` defaults to $GENSERVE_URL, else http://127.0.0.1:8000; `api_key` to $GENSERVE_API_KEY
    (sent as `Authorization: Bearer`). `retry` bounds the waiting on 503/429 (see `retry.py`).
    Raises `RequestRejected` (4xx), `ServiceBusy` (503/429 past the retries), `ServerError`,
    `Unreachable`; `wait` raises `JobFailed` for a job that failed or was cancelled.
    """

    def __init__(self, url: str | None = None, api_key: str | None = None, *, timeout=calls.DEFAULT_TIMEOUT,
                 retry: RetryPolicy | None = None, transport: httpx.AsyncBaseTransport | None = None,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep):
        self.url = calls.base_url(url)
        self.retry = retry or RetryPolicy()
        self._sleep = sleep
        self._http = httpx.AsyncClient(base_url=self.url, headers=calls.auth_headers(api_key), timeout=timeout,
                                  transport=transport)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    # Generation, scoring, prompts

    async def images(self, request: ImageRequest | dict | None = None, **fields) -> ImageResponse:
        """POST /v1/images: generate, score, regenerate. Retried on 503/429 only with a `seed`."""
        return await self._send(calls.images(request, fields))

    async def videos(self, request: VideoRequest | dict | None = None, **fields) -> VideoResponse:
        """POST /v1/videos (JSON): image-to-video, or text-to-video. Retried only with a `seed`."""
        return await self._send(calls.videos(request, fields))

    async def enhance(self, request: EnhanceRequest | dict | None = None, **fields) -> EnhanceResponse:
        """POST /v1/prompts/enhance: the prompt the model would see, and advice on it."""
        return await self._send(calls.enhance(request, fields))

    async def scores(self, request: ScoreRequest | dict | None = None, **fields) -> ScoreResponse:
        """POST /v1/scores: score base64 images against a prompt."""
        return await self._send(calls.scores(request, fields))

    # Catalogue

    async def models(self) -> dict:
        """GET /v1/models: each model's limits and defaults, and the default model."""
        return await self._send(calls.get("/v1/models"))

    async def loras(self) -> dict:
        return await self._send(calls.get("/v1/loras"))

    async def controls(self) -> dict:
        return await self._send(calls.get("/v1/controls"))

    async def health(self) -> dict:
        """GET /healthz: {"status": "ok" | "unavailable", "deployments": {...}} (never raises on 503)."""
        return await self._send(calls.health())

    # Jobs

    async def submit(self, kind: str, request: ImageRequest | VideoRequest | dict,
               idempotency_key: str | None = None) -> JobStatus:
        """POST /v1/jobs. Sent with an Idempotency-Key (a fresh one unless given), so it is retried safely."""
        return await self._send(calls.submit(kind, request, idempotency_key))

    async def submit_image(self, request: ImageRequest | dict | None = None, **fields) -> JobStatus:
        return await self.submit("image", calls._request(ImageRequest, request, fields))

    async def submit_video(self, request: VideoRequest | dict | None = None, **fields) -> JobStatus:
        return await self.submit("video", calls._request(VideoRequest, request, fields))

    async def job(self, job_id: str) -> JobStatus:
        return await self._send(calls.job(job_id))

    async def jobs(self, state: str | None = None, limit: int = 20, cursor: str | None = None) -> JobList:
        """GET /v1/jobs: newest first; pass `next_cursor` back as `cursor` for older ones."""
        return await self._send(calls.jobs(state, limit, cursor))

    async def cancel(self, job_id: str) -> JobStatus:
        return await self._send(calls.cancel(job_id))

    async def result(self, job_id: str) -> ImageJobResult | VideoJobResult:
        return await self._send(calls.result(job_id))

    async def file(self, job_id: str, name: str) -> bytes:
        return await self._send(calls.file(job_id, name))

    async def events(self, job_id: str) -> AsyncIterator[JobEvent]:
        """The job's event stream, from its first state change to its final state."""
        try:
            async with aconnect_sse(self._http, "GET", f"/v1/jobs/{job_id}/events",
                             timeout=httpx.Timeout(STREAM_READ_TIMEOUT_S, connect=10.0)) as source:
                if source.response.status_code != 200:
                    await source.response.aread()
                    calls.raise_for(calls.job(job_id), source.response)
                async for sse in source.aiter_sse():
                    yield JobEvent.from_sse(sse.event, sse.json())
        except httpx.TransportError as error:
            raise Unreachable(f"{self.url}: {type(error).__name__}: {error}") from error

    async def wait(self, job_id: str, on_event: Callable[[JobEvent], object] | None = None,
             timeout_s: float | None = None) -> JobStatus:
        """Follow the job's events until it finishes; `on_event` sees each one (progress bars).

        Returns the final `JobStatus` of a succeeded job; raises `JobFailed` for a failed or
        cancelled one, `TimeoutError` past `timeout_s`. A dropped stream is reopened (it replays
        the state changes), so a restart of the ingress does not lose the wait."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            try:
                async for event in self.events(job_id):
                    if on_event is not None:
                        on_event(event)
                    if event.event == "error":
                        raise RequestRejected(404, event.detail, "GET", f"/v1/jobs/{job_id}/events")
                    if event.job is not None:
                        return _finished(event.job)
                    if deadline is not None and time.monotonic() > deadline:
                        raise TimeoutError(f"job {job_id} still {event.state or 'running'} after {timeout_s:g}s")
            except Unreachable:
                if deadline is not None and time.monotonic() > deadline:
                    raise
            status = await self.job(job_id)  # the stream ended early: the job may have finished meanwhile
            if status.state in ("succeeded", "failed", "cancelled"):
                return _finished(status)
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {status.state} after {timeout_s:g}s")
            await self._sleep(self.retry.backoff_s)

    # The one place a call goes out

    async def _send(self, call: calls.Call):
        attempt, waited = 0, 0.0
        while True:
            attempt += 1
            try:
                response = await self._http.request(call.method, call.path, json=call.json, params=call.params,
                                              headers=call.headers)
            except httpx.TransportError as error:
                raise Unreachable(f"{call.method} {self.url}{call.path}: {type(error).__name__}: {error}") from error
            if response.status_code not in RETRY_STATUSES or call.path == "/healthz":
                calls.raise_for(call, response)
                return call.parse(response)
            hint = retry_after(response.headers.get("Retry-After"))
            delay = self.retry.delay(attempt, hint)
            if not call.retryable or waited + delay > self.retry.max_wait_s:
                raise ServiceBusy(response.status_code, calls.detail_of(response), hint, attempt)
            await self._sleep(delay)
            waited += delay


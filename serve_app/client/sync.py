"""`Client`: the blocking client. `AsyncClient` (aio.py) has the same methods, awaited."""

from __future__ import annotations

import time
from typing import Callable, Iterator

import httpx
from httpx_sse import connect_sse

from serve_app import types
from serve_app.client import calls
from serve_app.client.events import JobEvent
from serve_app.client.retry import RetryPolicy

STREAM_READ_TIMEOUT_S = 60.0  # the event stream sends a keep-alive every 15 s; silence past this is a lost stream


class Client:
    """A running genserve over HTTP, with the server's own request and response models.

    `url` defaults to $GENSERVE_URL, else http://127.0.0.1:8000; `api_key` to $GENSERVE_API_KEY
    (sent as `Authorization: Bearer`). `retry` bounds the waiting on 503/429 (see `retry.py`).
    Raises `RequestRejected` (4xx), `ServiceBusy` (503/429 past the retries), `ServerError`,
    `Unreachable`; `wait` raises `JobFailed` for a job that failed or was cancelled.
    """

    def __init__(self, url: str | None = None, api_key: str | None = None, *, timeout=calls.DEFAULT_TIMEOUT,
                 retry: RetryPolicy | None = None, transport: httpx.BaseTransport | None = None,
                 sleep: Callable[[float], None] = time.sleep):
        self.url = calls.base_url(url)
        self.retry = retry or RetryPolicy()
        self._sleep = sleep
        self._http = httpx.Client(base_url=self.url, headers=calls.auth_headers(api_key), timeout=timeout,
                                  transport=transport)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # Generation, scoring, prompts

    def images(self, request: types.ImageRequest | dict | None = None, **fields) -> types.ImageResponse:
        """POST /v1/images: generate, score, regenerate. Retried on 503/429 only with a `seed`."""
        return self._send(calls.images(request, fields))

    def videos(self, request: types.VideoRequest | dict | None = None, **fields) -> types.VideoResponse:
        """POST /v1/videos (JSON): image-to-video, or text-to-video. Retried only with a `seed`."""
        return self._send(calls.videos(request, fields))

    def enhance(self, request: types.EnhanceRequest | dict | None = None, **fields) -> types.EnhanceResponse:
        """POST /v1/prompts/enhance: the prompt the model would see, and advice on it."""
        return self._send(calls.enhance(request, fields))

    def scores(self, request: types.ScoreRequest | dict | None = None, **fields) -> types.ScoreResponse:
        """POST /v1/scores: score base64 images against a prompt."""
        return self._send(calls.scores(request, fields))

    # Catalogue

    def models(self) -> dict:
        """GET /v1/models: each model's limits and defaults, and the default model."""
        return self._send(calls.get("/v1/models"))

    def loras(self) -> dict:
        return self._send(calls.get("/v1/loras"))

    def controls(self) -> dict:
        return self._send(calls.get("/v1/controls"))

    def health(self) -> dict:
        """GET /healthz: {"status": "ok" | "unavailable", "deployments": {...}} (never raises on 503)."""
        return self._send(calls.health())

    # Jobs

    def submit(self, kind: str, request: types.ImageRequest | types.VideoRequest | dict,
               idempotency_key: str | None = None) -> types.JobStatus:
        """POST /v1/jobs. Sent with an Idempotency-Key (a fresh one unless given), so it is retried safely."""
        return self._send(calls.submit(kind, request, idempotency_key))

    def submit_image(self, request: types.ImageRequest | dict | None = None, **fields) -> types.JobStatus:
        return self.submit("image", calls._request(types.ImageRequest, request, fields))

    def submit_video(self, request: types.VideoRequest | dict | None = None, **fields) -> types.JobStatus:
        return self.submit("video", calls._request(types.VideoRequest, request, fields))

    def job(self, job_id: str) -> types.JobStatus:
        return self._send(calls.job(job_id))

    def jobs(self, state: str | None = None, limit: int = 20, cursor: str | None = None) -> types.JobList:
        """GET /v1/jobs: newest first; pass `next_cursor` back as `cursor` for older ones."""
        return self._send(calls.jobs(state, limit, cursor))

    def cancel(self, job_id: str) -> types.JobStatus:
        return self._send(calls.cancel(job_id))

    def result(self, job_id: str) -> types.ImageJobResult | types.VideoJobResult:
        return self._send(calls.result(job_id))

    def file(self, job_id: str, name: str) -> bytes:
        return self._send(calls.file(job_id, name))

    def events(self, job_id: str) -> Iterator[JobEvent]:
        """The job's event stream, from its first state change to its final state."""
        with calls.reaching(self.url):
            with connect_sse(self._http, "GET", f"/v1/jobs/{job_id}/events",
                             timeout=httpx.Timeout(STREAM_READ_TIMEOUT_S, connect=10.0)) as source:
                if source.response.status_code != 200:
                    source.response.read()
                    calls.raise_for(calls.job(job_id), source.response)
                for sse in source.iter_sse():
                    yield JobEvent.from_sse(sse.event, sse.json())

    def wait(self, job_id: str, on_event: Callable[[JobEvent], None] | None = None,
             timeout_s: float | None = None) -> types.JobStatus:
        """Follow the job's events until it finishes; `on_event` sees each one (progress bars).

        Returns the final `JobStatus` of a succeeded job; raises `JobFailed` for a failed or
        cancelled one, `TimeoutError` past `timeout_s`. A dropped stream is reopened (it replays
        the state changes), so a restart of the ingress does not lose the wait."""
        waiting = calls.Waiting(job_id, on_event, timeout_s)
        while True:
            with waiting.reopening():
                for event in self.events(job_id):
                    final = waiting.event(event)
                    if final is not None:
                        return final
            status = self.job(job_id)  # the stream ended early: the job may have finished meanwhile
            final = waiting.status(status)
            if final is not None:
                return final
            self._sleep(self.retry.backoff_s)

    # The one place a call goes out

    def _send(self, call: calls.Call):
        attempt, waited = 0, 0.0
        while True:
            attempt += 1
            with calls.reaching(f"{call.method} {self.url}{call.path}"):
                response = self._http.request(call.method, call.path, json=call.json, params=call.params,
                                              headers=call.headers)
            answer, delay = calls.outcome(call, response, self.retry, attempt, waited)
            if delay is None:
                return answer
            self._sleep(delay)
            waited += delay

"""`AsyncClient`: the asyncio client, method for method the same as `Client` (sync.py), awaited."""

from __future__ import annotations

import asyncio
from typing import AsyncIterator, Awaitable, Callable

import httpx
from httpx_sse import aconnect_sse

from serve_app import types
from serve_app.client import calls
from serve_app.client.events import JobEvent
from serve_app.client.retry import RetryPolicy
from serve_app.client.sync import STREAM_READ_TIMEOUT_S


class AsyncClient:
    """`Client` for asyncio: the same arguments, methods and errors, each method awaited (`sleep`
    is awaited too); `async with` closes it."""

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

    async def images(self, request: types.ImageRequest | dict | None = None, **fields) -> types.ImageResponse:
        """POST /v1/images: generate, score, regenerate. Retried on 503/429 only with a `seed`."""
        return await self._send(calls.images(request, fields))

    async def videos(self, request: types.VideoRequest | dict | None = None, **fields) -> types.VideoResponse:
        """POST /v1/videos (JSON): image-to-video, or text-to-video. Retried only with a `seed`."""
        return await self._send(calls.videos(request, fields))

    async def enhance(self, request: types.EnhanceRequest | dict | None = None, **fields) -> types.EnhanceResponse:
        """POST /v1/prompts/enhance: the prompt the model would see, and advice on it."""
        return await self._send(calls.enhance(request, fields))

    async def scores(self, request: types.ScoreRequest | dict | None = None, **fields) -> types.ScoreResponse:
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

    async def submit(self, kind: str, request: types.ImageRequest | types.VideoRequest | dict,
               idempotency_key: str | None = None) -> types.JobStatus:
        """POST /v1/jobs. Sent with an Idempotency-Key (a fresh one unless given), so it is retried safely."""
        return await self._send(calls.submit(kind, request, idempotency_key))

    async def submit_image(self, request: types.ImageRequest | dict | None = None, **fields) -> types.JobStatus:
        return await self.submit("image", calls._request(types.ImageRequest, request, fields))

    async def submit_video(self, request: types.VideoRequest | dict | None = None, **fields) -> types.JobStatus:
        return await self.submit("video", calls._request(types.VideoRequest, request, fields))

    async def job(self, job_id: str) -> types.JobStatus:
        return await self._send(calls.job(job_id))

    async def jobs(self, state: str | None = None, limit: int = 20, cursor: str | None = None) -> types.JobList:
        """GET /v1/jobs: newest first; pass `next_cursor` back as `cursor` for older ones."""
        return await self._send(calls.jobs(state, limit, cursor))

    async def cancel(self, job_id: str) -> types.JobStatus:
        return await self._send(calls.cancel(job_id))

    async def result(self, job_id: str) -> types.ImageJobResult | types.VideoJobResult:
        return await self._send(calls.result(job_id))

    async def file(self, job_id: str, name: str) -> bytes:
        return await self._send(calls.file(job_id, name))

    async def events(self, job_id: str) -> AsyncIterator[JobEvent]:
        """The job's event stream, from its first state change to its final state."""
        with calls.reaching(self.url):
            async with aconnect_sse(self._http, "GET", f"/v1/jobs/{job_id}/events",
                                    timeout=httpx.Timeout(STREAM_READ_TIMEOUT_S, connect=10.0)) as source:
                if source.response.status_code != 200:
                    await source.response.aread()
                    calls.raise_for(calls.job(job_id), source.response)
                async for sse in source.aiter_sse():
                    yield JobEvent.from_sse(sse.event, sse.json())

    async def wait(self, job_id: str, on_event: Callable[[JobEvent], object] | None = None,
             timeout_s: float | None = None) -> types.JobStatus:
        """As `Client.wait`: follow the job's events until it finishes (a dropped stream is reopened);
        the final status of a succeeded job, else `JobFailed`, or `TimeoutError` past `timeout_s`."""
        waiting = calls.Waiting(job_id, on_event, timeout_s)
        while True:
            with waiting.reopening():
                async for event in self.events(job_id):
                    final = waiting.event(event)
                    if final is not None:
                        return final
            status = await self.job(job_id)  # the stream ended early: the job may have finished meanwhile
            final = waiting.status(status)
            if final is not None:
                return final
            await self._sleep(self.retry.backoff_s)

    # The one place a call goes out

    async def _send(self, call: calls.Call):
        attempt, waited = 0, 0.0
        while True:
            attempt += 1
            with calls.reaching(f"{call.method} {self.url}{call.path}"):
                response = await self._http.request(call.method, call.path, json=call.json, params=call.params,
                                                    headers=call.headers)
            answer, delay = calls.outcome(call, response, self.retry, attempt, waited)
            if delay is None:
                return answer
            await self._sleep(delay)
            waited += delay


"""A deterministic stand-in for an LLM server, speaking Ollama's `/api/generate` and OpenAI's
`/v1/chat/completions` (non-streaming), served by uvicorn on loopback in a background thread.

What it answers depends on the user's text, so one server covers every case:
- contains "slowly": waits `slow_s` before answering (past the client's timeout);
- contains "crash": HTTP 500;
- contains "offtopic": a fluent answer about something else;
- otherwise: a chatty, quoted answer that keeps the idea, as real instruction models often give.
Every request body is kept in `requests` for the tests to inspect.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tests.helpers import free_port, wait_until


def answer_for(idea: str) -> str:
    idea = idea.split(" | ")[0].strip()
    if "offtopic" in idea:
        return "A quiet harbour at sunrise with fishing boats and gulls over calm water."
    return f'Here is your prompt: "{idea}, rendered in rich detail with soft golden light and a balanced composition."'


class FakeLlmServer:
    def __init__(self, slow_s: float = 5.0):
        self.slow_s = slow_s
        self.requests: list[tuple[str, dict]] = []
        self.authorizations: list[str | None] = []  # each OpenAI-style request's Authorization header
        self.port = free_port()
        app = Starlette(routes=[
            Route("/api/generate", self._ollama, methods=["POST"]),
            Route("/v1/chat/completions", self._openai, methods=["POST"]),
        ])
        self._server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _reply(self, text: str):
        if "crash" in text:
            return JSONResponse({"error": "model crashed"}, status_code=500)
        if "slowly" in text:
            await asyncio.sleep(self.slow_s)
        return None

    async def _ollama(self, request: Request) -> JSONResponse:
        body = await request.json()
        self.requests.append(("ollama", body))
        failure = await self._reply(body["prompt"])
        if failure is not None:
            return failure
        return JSONResponse({"model": body["model"], "created_at": "2026-11-23T00:00:00Z",
                             "response": answer_for(body["prompt"]), "done": True})

    async def _openai(self, request: Request) -> JSONResponse:
        body = await request.json()
        self.requests.append(("openai", body))
        self.authorizations.append(request.headers.get("authorization"))
        idea = body["messages"][-1]["content"]
        failure = await self._reply(idea)
        if failure is not None:
            return failure
        message = {"role": "assistant", "content": answer_for(idea)}
        return JSONResponse({"id": "chatcmpl-1", "object": "chat.completion", "model": body["model"],
                             "choices": [{"index": 0, "message": message, "finish_reason": "stop"}]})

    def __enter__(self) -> "FakeLlmServer":
        self._thread.start()
        wait_until(lambda: self._server.started, timeout_s=30, what="the fake LLM server to start")
        return self

    def __exit__(self, *exc) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)


@contextlib.contextmanager
def fake_llm_server(slow_s: float = 5.0):
    with FakeLlmServer(slow_s) as server:
        yield server

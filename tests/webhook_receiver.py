"""A webhook receiver for tests: a Starlette app served by uvicorn on loopback, in a thread.

It records every POST (headers and raw body) and answers each with the next scripted status
(then 200); "hang" holds that request open until `release()`, as a receiver that never answers.
"""

from __future__ import annotations

import asyncio
import threading
import time

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route


class Receiver:
    def __init__(self, script: list | None = None):
        self.script = list(script or [])
        self.received: list[tuple[dict[str, str], bytes]] = []
        self._lock = threading.Lock()
        self._released: asyncio.Event | None = None
        app = Starlette(routes=[Route("/hook", self._hook, methods=["POST"])])
        self._server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                                     lifespan="off"))
        self._thread = threading.Thread(target=self._server.run, name="webhook-receiver", daemon=True)

    async def _hook(self, request: Request) -> Response:
        body = await request.body()
        with self._lock:
            self.received.append(({k.lower(): v for k, v in request.headers.items()}, body))
            answer = self.script.pop(0) if self.script else 200
        if answer == "hang":
            self._loop = asyncio.get_running_loop()
            self._released = self._released or asyncio.Event()
            await self._released.wait()
            answer = 200
        return Response(status_code=answer)

    def __enter__(self) -> Receiver:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("the webhook receiver did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.release()
        self._server.should_exit = True
        self._thread.join(5)

    @property
    def url(self) -> str:
        port = self._server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/hook"

    def release(self) -> None:
        """Let a hanging request answer (200)."""
        if self._released is not None:
            self._loop.call_soon_threadsafe(self._released.set)  # the event belongs to the server's loop

    def wait_for(self, count: int, timeout_s: float = 20.0) -> list[tuple[dict[str, str], bytes]]:
        """The requests received once there are `count` (polling), else AssertionError."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if len(self.received) >= count:
                    return list(self.received)
            time.sleep(0.02)
        raise AssertionError(f"the receiver got {len(self.received)} request(s), expected {count}")

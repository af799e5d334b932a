"""A stand-in for a remote OpenAI-compatible images API (`POST /v1/images/generations`), served by
uvicorn on loopback in a background thread: the remote end of the hybrid fallback in tests.

It answers `n` solid-colour PNGs of the asked `size` as `b64_json`, with a `revised_prompt`; a
prompt containing "crash" gets a 500 in OpenAI's error shape. Every request (body and
Authorization header) is kept in `requests`.
"""

from __future__ import annotations

import threading

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tests.helpers import free_port, image_b64, wait_until

REMOTE_GREY = 200  # the stand-in's pixels, so tests can tell its images from the local model's


class FakeImagesServer:
    def __init__(self):
        self.requests: list[dict] = []
        self.port = free_port()
        app = Starlette(routes=[Route("/v1/images/generations", self._generate, methods=["POST"])])
        self._server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def _generate(self, request: Request) -> JSONResponse:
        body = await request.json()
        self.requests.append({"body": body, "authorization": request.headers.get("authorization")})
        if "crash" in body["prompt"]:
            return JSONResponse({"error": {"message": "the remote model crashed", "type": "server_error"}},
                                status_code=500)
        width, height = (int(part) for part in body.get("size", "256x256").split("x"))
        image = image_b64(size=(width, height), color=(REMOTE_GREY,) * 3)
        data = [{"b64_json": image, "revised_prompt": f"{body['prompt']}, as drawn remotely"}
                for _ in range(body.get("n", 1))]
        return JSONResponse({"created": 1, "data": data})

    def __enter__(self) -> "FakeImagesServer":
        self._thread.start()
        wait_until(lambda: self._server.started, timeout_s=30, what="the fake images server to start")
        return self

    def __exit__(self, *exc) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)

"""ASGI middleware answering 413 for request bodies over a size limit, before they are parsed.

A declared Content-Length over the limit is refused without reading a byte; a body without one
(chunked) is counted as it streams in and refused as soon as it passes the limit.

Serve runs the ingress's FastAPI app from a frozen copy made at deployment time, so the limit
cannot live on the app object the Ingress constructor sees; it is a per-process setting instead,
which the Ingress replica sets when it starts (`BodyLimit.configure`).
"""

from __future__ import annotations

import json

from starlette.exceptions import HTTPException

DEFAULT_MAX_BYTES = 64 * 1024 * 1024


def _message(limit: int) -> str:
    return f"request body is larger than the limit of {limit} bytes (max_body_bytes)"


class BodyLimit:
    max_bytes = DEFAULT_MAX_BYTES

    def __init__(self, app):
        self.app = app

    @classmethod
    def configure(cls, max_bytes: int) -> None:
        cls.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.max_bytes
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await _refuse(send, limit)
        received = 0

        async def counted_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # FastAPI passes an HTTPException raised while it reads the body through to
                    # its handler, which answers with this status.
                    raise HTTPException(status_code=413, detail=_message(limit))
            return message

        await self.app(scope, counted_receive, send)


async def _refuse(send, limit: int) -> None:
    body = json.dumps({"detail": _message(limit)}).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})

"""A typed Python client for a running genserve: `Client` (blocking) and `AsyncClient` (asyncio).

It speaks HTTP through httpx and returns the server's own pydantic models (`ImageResponse`,
`JobStatus`, ...), and imports nothing heavier than httpx and pydantic: no torch, no Ray, so an
agent's process that only calls the service stays light.

- `errors`: what a call raises (`RequestRejected`, `ServiceBusy`, `Unreachable`, `JobFailed`);
- `retry`: which calls may be retried and how long to wait (503/429, `Retry-After`, a total bound);
- `sync`, `aio`: the two clients, method for method the same.

    from serve_app.client import Client
    with Client("http://127.0.0.1:8000") as genserve:
        image = genserve.images(prompt="a lighthouse at dusk", seed=7)
"""

from serve_app.client.aio import AsyncClient
from serve_app.client.errors import GenserveError, JobFailed, RequestRejected, ServiceBusy, Unreachable
from serve_app.client.events import JobEvent
from serve_app.client.sync import Client

__all__ = ["AsyncClient", "Client", "GenserveError", "JobEvent", "JobFailed", "RequestRejected", "ServiceBusy",
           "Unreachable"]

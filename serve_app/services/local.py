"""In-process stand-ins for Ray Serve handles: `LocalHandle(obj).method.remote(...)`.

They let the graph policy and the ingress service run over plain Python objects, for unit tests
(fake deployments) and for the benchmark's in-process baseline (the real deployment classes,
without Ray). Awaitable arguments are resolved before the call, as Serve resolves a
`DeploymentResponse` passed to another handle.
"""

from __future__ import annotations

import asyncio
import inspect


class _LocalMethod:
    def __init__(self, method):
        self._method = method

    def remote(self, *args, **kwargs) -> asyncio.Task:
        return asyncio.ensure_future(self._run(*args, **kwargs))

    async def _run(self, *args, **kwargs):
        args = [await arg if inspect.isawaitable(arg) else arg for arg in args]
        kwargs = {key: await value if inspect.isawaitable(value) else value for key, value in kwargs.items()}
        result = self._method(*args, **kwargs)
        return await result if inspect.isawaitable(result) else result


class LocalHandle:
    def __init__(self, target):
        self._target = target

    def __getattr__(self, name: str) -> _LocalMethod:
        return _LocalMethod(getattr(self._target, name))

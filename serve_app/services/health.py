"""Readiness (GET /readyz) and the deployments' info behind GET /healthz.

Readiness: whether every deployment of this application has a running, healthy replica.

Read from the Serve controller (`serve.status()`), which health-checks every replica itself
(`check_health`, on the replica's control path): so a probe never waits in a generation queue
behind image requests, and a model that is merely busy is still ready. The answer is cached for
`cache_s`, so a probe every second from each kubelet costs one controller call per few seconds,
and a controller slower than `timeout_s` makes the ingress not ready rather than a hung probe.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Callable

from deployments.config import is_local_path

READY_STATES = {"HEALTHY", "UPSCALING", "DOWNSCALING"}


def serve_app_status() -> dict[str, dict]:
    """{deployment: {"status": ..., "running": replicas running}} of the application this replica serves."""
    from ray import serve

    app_name = serve.get_replica_context().app_name
    app = serve.status().applications[app_name]
    return {
        name: {"status": str(getattr(d.status, "value", d.status)),
               "running": sum(n for state, n in d.replica_states.items()
                              if str(getattr(state, "value", state)) == "RUNNING")}
        for name, d in app.deployments.items()
    }


class Readiness:
    def __init__(self, probe: Callable[[], dict[str, dict]] = serve_app_status, timeout_s: float = 2.0,
                 cache_s: float = 3.0):
        self.probe = probe
        self.timeout_s = timeout_s
        self.cache_s = cache_s
        self._cached: tuple[float, dict] | None = None
        self._lock = asyncio.Lock()

    async def report(self) -> dict:
        """{"ready": bool, "deployments": {name: {"ready", "status", "running"}}}, cached for cache_s."""
        async with self._lock:  # concurrent probes share one controller call
            now = time.monotonic()
            if self._cached is not None and now - self._cached[0] < self.cache_s:
                return self._cached[1]
            report = await self._fresh()
            self._cached = (time.monotonic(), report)
            return report

    async def _fresh(self) -> dict:
        try:
            states = await asyncio.wait_for(asyncio.to_thread(self.probe), self.timeout_s)
        except Exception as error:  # scrubbed: the type only, never addresses or stack text
            reason = "timeout" if isinstance(error, asyncio.TimeoutError) else type(error).__name__
            return {"ready": False, "reason": f"the Serve controller did not answer ({reason})", "deployments": {}}
        deployments = {
            name: {"ready": state["status"] in READY_STATES and state["running"] > 0, **state}
            for name, state in sorted(states.items())
        }
        return {"ready": bool(deployments) and all(d["ready"] for d in deployments.values()),
                "deployments": deployments}


# What /healthz shows only to an admin: where a replica runs and what it loaded from where.
HOST_DETAILS = frozenset({"device", "llm", "loras_loaded", "owner"})
LOCAL_SOURCE = "(a local path)"


def public_view(report: dict) -> dict:
    """`report` without host details: no devices, LLM backend, loaded LoRAs or runner host and pid,
    and every local path (a source, a ControlNet, a LAION head) replaced by LOCAL_SOURCE. Hub repo
    ids stay: they are what GET /v1/models shows anyway."""
    def scrub(value):
        if isinstance(value, dict):
            return {key: scrub(item) for key, item in value.items() if key not in HOST_DETAILS}
        if isinstance(value, (list, tuple)):
            return [scrub(item) for item in value]
        if isinstance(value, str) and is_local_path(value):
            return LOCAL_SOURCE
        return value

    return scrub(report)


class Diagnostics:
    """GET /healthz's fan-out: each downstream deployment's `info`, asked at most once per `cache_s`
    however many callers ask, so repeated calls never queue work on every model."""

    def __init__(self, timeout_s: float = 5.0, cache_s: float = 5.0):
        self.timeout_s = timeout_s
        self.cache_s = cache_s
        self._cached: tuple[float, dict] | None = None
        self._lock = asyncio.Lock()

    async def report(self, downstream: dict[str, Any]) -> dict:
        """{name: {"ok": True, **info} or {"ok": False, "error": kind}} of `downstream` (name: handle)."""
        async with self._lock:  # callers arriving together share one fan-out
            if self._cached is not None and time.monotonic() - self._cached[0] < self.cache_s:
                return self._cached[1]
            report = await self._fresh(downstream)
            self._cached = (time.monotonic(), report)
            return report

    async def _fresh(self, downstream: dict[str, Any]) -> dict:
        results = await asyncio.gather(
            *(asyncio.wait_for(handle.info.remote(), self.timeout_s) for handle in downstream.values()),
            return_exceptions=True,
        )
        report = {}
        for name, result in zip(downstream, results):
            if isinstance(result, BaseException):
                # The type only: exception text can carry node addresses, paths and actor ids.
                kind = "timeout" if isinstance(result, asyncio.TimeoutError) else type(result).__name__
                report[name] = {"ok": False, "error": kind}
            else:
                report[name] = {"ok": True, **result}
        return report

"""Health: GET /livez (liveness), GET /readyz (readiness), GET /healthz (a diagnostic).

- `/livez`: 200 while this ingress replica's event loop answers; no downstream call. For a
  Kubernetes livenessProbe: failing it means the process is wedged, and a restart helps.
- `/readyz`: 200 when every deployment of the application has a running replica the Serve
  controller reports healthy, else 503 naming the ones that are not (serve_app.services.health:
  cached a few seconds, never through a generation queue). For a readinessProbe.
- `/healthz`: asks each deployment for its `info` (model source, device, LLM backend) through
  its handle, so it shows what each replica loaded; a busy model answers slowly. For people and
  dashboards, not for probes. Errors name their type only.
"""

import asyncio

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from serve_app.api.deps import services
from serve_app.services.facade import Services

router = APIRouter(tags=["health"])
HEALTH_TIMEOUT_S = 5.0


@router.get("/livez")
async def livez() -> dict:
    """Liveness: the ingress answers. Calls nothing downstream."""
    return {"status": "ok"}


@router.get("/readyz", responses={200: {"description": "Every deployment is ready."},
                                  503: {"description": "A deployment has no healthy running replica (named)."}})
async def readyz(service: Services = Depends(services)) -> JSONResponse:
    """Readiness: every deployment has a healthy running replica (from the Serve controller, cached)."""
    report = await service.readiness.report()
    return JSONResponse(status_code=200 if report["ready"] else 503,
                        content={"status": "ready" if report["ready"] else "not_ready", **report})


@router.get("/healthz", responses={503: {"description": "A deployment did not answer in time (named)."}})
async def healthz(service: Services = Depends(services)) -> JSONResponse:
    """Each downstream deployment's `info`; 503 naming the ones that did not answer in time."""
    images = service.images
    downstream = {"enhancer": images.enhancer, "scorer": images.scorer}
    downstream.update({f"generator:{name}": handle for name, handle in images.generators.items()})
    if service.videos is not None:
        downstream.update({f"video:{name}": handle for name, handle in service.videos.generators.items()})
    if service.jobs is not None:
        downstream["jobs"] = service.jobs.runner
    results = await asyncio.gather(
        *(asyncio.wait_for(handle.info.remote(), HEALTH_TIMEOUT_S) for handle in downstream.values()),
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
    healthy = all(entry["ok"] for entry in report.values())
    return JSONResponse(
        status_code=200 if healthy else 503,
        content={"status": "ok" if healthy else "unavailable", "deployments": report},
    )

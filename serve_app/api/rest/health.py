"""Health: GET /livez (liveness), GET /readyz (readiness), GET /healthz (a diagnostic).

- `/livez`: 200 while this ingress replica's event loop answers; no downstream call. For a
  Kubernetes livenessProbe: failing it means the process is wedged, and a restart helps.
- `/readyz`: 200 when every deployment of the application has a running replica the Serve
  controller reports healthy, else 503 naming the ones that are not (serve_app.services.health:
  cached a few seconds, never through a generation queue). For a readinessProbe.
- `/healthz`: asks each deployment for its `info` (model source, device, LLM backend) through
  its handle, so it shows what each replica loaded; a busy model answers slowly. For people and
  dashboards, not for probes: it needs the `read` scope, the answer is cached a few seconds
  (serve_app.services.health.Diagnostics, so callers cannot queue work on every model), and host
  details are for admin keys only. Errors name their type only.
"""

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from serve_app.api.deps import services
from serve_app.security.guard import principal
from serve_app.services.facade import Services
from serve_app.services.health import public_view

router = APIRouter(tags=["health"])


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
async def healthz(request: Request, service: Services = Depends(services)) -> JSONResponse:
    """Each downstream deployment's `info` (cached a few seconds); 503 naming the ones that did not
    answer in time. Needs the `read` scope; devices, local paths, the LLM backend, loaded LoRAs and
    the job runner's host are shown to an admin key only."""
    images = service.images
    downstream = {"enhancer": images.enhancer, "scorer": images.scorer}
    downstream.update({f"generator:{name}": handle for name, handle in images.generators.items()})
    if service.videos is not None:
        downstream.update({f"video:{name}": handle for name, handle in service.videos.generators.items()})
    if service.jobs is not None:
        downstream["jobs"] = service.jobs.runner
    report = await service.diagnostics.report(downstream)
    if not principal(request).admin:
        report = public_view(report)
    healthy = all(entry["ok"] for entry in report.values())
    return JSONResponse(
        status_code=200 if healthy else 503,
        content={"status": "ok" if healthy else "unavailable", "deployments": report},
    )

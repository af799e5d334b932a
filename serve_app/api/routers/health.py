"""GET /healthz: 200 when every downstream deployment answers, 503 naming the one that did not."""

import asyncio

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from serve_app.api.app import Services, services

router = APIRouter(tags=["health"])
HEALTH_TIMEOUT_S = 5.0


@router.get("/healthz")
async def healthz(service: Services = Depends(services)) -> JSONResponse:
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
            report[name] = {"ok": False, "error": f"{type(result).__name__}: {result}"[:300]}
        else:
            report[name] = {"ok": True, **result}
    healthy = all(entry["ok"] for entry in report.values())
    return JSONResponse(
        status_code=200 if healthy else 503,
        content={"status": "ok" if healthy else "unavailable", "deployments": report},
    )

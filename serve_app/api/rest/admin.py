"""/v1/admin: every key's usage and the quality gate's figures (the `admin` scope; the Guard enforces
it for the whole prefix)."""

import asyncio

from fastapi import APIRouter, Depends, Request

from serve_app.api.deps import services
from serve_app.security.guard import request_auth
from serve_app.services.facade import Services
from serve_app.services.quality import MIN_SAMPLES, MemoryQualityBook

router = APIRouter(tags=["admin"])


@router.get("/v1/admin/usage")
async def get_usage(request: Request, service: Services = Depends(services)) -> dict:
    """Each configured key (id, name, scopes, limits, expiry; never its hash) and what it uses now:
    requests in the last minute, synchronous requests in flight, images today, jobs queued or running,
    and its group's share of recent GPU time (`gpu_share`); `groups`: each fair-queueing group's
    recent GPU-seconds (decayed), share, weight and jobs running (docs/jobs.md#fair-between-keys)."""
    auth = request_auth(request)
    runner = service.jobs.runner if service.jobs is not None else None
    groups = await runner.fair_usage.remote() if runner is not None else {}
    if auth is None or auth.keys is None:
        return {"keys": [], "groups": groups, "detail": "no keys file is configured"}
    entries = auth.keys.entries()
    active = await asyncio.gather(*(runner.active_count.remote(entry.id) for entry in entries)) if runner else []
    keys = []
    for index, entry in enumerate(entries):
        usage = await auth._limiter_call(auth.limiter.usage, entry.id, entry.limits)
        if runner is not None:
            usage["active_jobs"] = active[index]
            usage["gpu_group"] = entry.fair_group
            usage["gpu_share"] = groups.get(entry.fair_group, {}).get("share", 0.0)
        keys.append({
            "id": entry.id, "name": entry.name, "scopes": list(entry.scopes),
            "limits": entry.limits.model_dump(exclude_none=True),
            "expires_at": entry.expires_at, "revoked": entry.revoked, "usage": usage,
        })
    return {"keys": keys, "groups": groups}


@router.get("/v1/admin/quality")
async def get_quality(service: Services = Depends(services)) -> dict:
    """The quality gate per model and gate metric, from every request the service has scored (the
    job store's tallies; one replica's without jobs): first-round pass rate, images generated per
    accepted image, device seconds per accepted image, and the scores at a few percentiles (the
    profile's starting calibration included), which is what a `quality_percentile` is read from."""
    images = service.images
    return {
        "models": await images.quality.summary(list(images.specs)),
        "policy": {"metric": images.policy.metric, "threshold": images.policy.threshold,
                   "max_attempts": images.policy.max_attempts},
        "min_calibration_images": MIN_SAMPLES,
        "shared": not isinstance(images.quality, MemoryQualityBook),
    }

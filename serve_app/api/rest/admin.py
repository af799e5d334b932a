"""/v1/admin: every key's usage (the `admin` scope; the Guard enforces it for the whole prefix)."""

import asyncio

from fastapi import APIRouter, Depends, Request

from serve_app.api.deps import services
from serve_app.security.guard import request_auth
from serve_app.services.facade import Services

router = APIRouter(tags=["admin"])


@router.get("/v1/admin/usage")
async def get_usage(request: Request, service: Services = Depends(services)) -> dict:
    """Each configured key (id, name, scopes, limits, expiry; never its hash) and what it uses now:
    requests in the last minute, synchronous requests in flight, images today, jobs queued or running."""
    auth = request_auth(request)
    if auth is None or auth.keys is None:
        return {"keys": [], "detail": "no keys file is configured"}
    entries = auth.keys.entries()
    runner = service.jobs.runner if service.jobs is not None else None
    active = await asyncio.gather(*(runner.active_count.remote(entry.id) for entry in entries)) if runner else []
    keys = []
    for index, entry in enumerate(entries):
        usage = await auth._limiter_call(auth.limiter.usage, entry.id, entry.limits)
        if runner is not None:
            usage["active_jobs"] = active[index]
        keys.append({
            "id": entry.id, "name": entry.name, "scopes": list(entry.scopes),
            "limits": entry.limits.model_dump(exclude_none=True),
            "expires_at": entry.expires_at, "revoked": entry.revoked, "usage": usage,
        })
    return {"keys": keys}

"""The OpenAPI document's security: one bearer scheme, and on each operation the scope it needs.

The Guard (serve_app.security.guard) decides who may call what, from the method and path alone;
this writes the same decision into the document, from the same functions, so the two cannot
disagree: Swagger UI's Authorize button sends the key, and a generated client knows each
operation needs `Authorization: Bearer <key>` with the scope listed (OpenAPI 3.1 lets a non-OAuth
requirement list role names). Public operations (liveness, readiness) say `security: []`.
"""

from __future__ import annotations

from collections.abc import Callable

from serve_app.security.guard import is_public, required_scope

SCHEME = "bearer"
BEARER = {
    "type": "http",
    "scheme": "bearer",
    "description": "An API key (`genserve keys create`), sent as `Authorization: Bearer <key>`. Each operation "
                   "lists the scope it needs (read, generate or admin; admin implies the others). Without a "
                   "keys file the service answers loopback clients only, and needs no key (docs/security.md).",
}
METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")


def with_security(schema: dict) -> dict:
    """`schema` (an OpenAPI document of this app) with the bearer scheme and per-operation security."""
    schema.setdefault("components", {}).setdefault("securitySchemes", {})[SCHEME] = BEARER
    for path, item in schema.get("paths", {}).items():
        for method, operation in item.items():
            if method not in METHODS:
                continue
            public = is_public(method.upper(), path)
            operation["security"] = [] if public else [{SCHEME: [required_scope(method.upper(), path)]}]
    return schema


def secured_openapi(build: Callable[[], dict]) -> Callable[[], dict]:
    """FastAPI's `app.openapi` (which caches the document it builds), adding the security once."""
    done: list[dict] = []

    def openapi() -> dict:
        if not done:
            done.append(with_security(build()))
        return done[0]

    return openapi

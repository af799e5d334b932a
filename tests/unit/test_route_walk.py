"""Every route of the app, walked with no key, a key without the scope the route needs, and another
owner's key: 401, 403 (naming the scope) and 404 (another key's job is not confirmed to exist).

The routes come from the app itself (its OpenAPI document, plus what the document leaves out: MCP,
A2A, the console, the docs pages), so a new route is walked without editing this file. What each
route should need is written here, apart from the Guard (serve_app/security/guard.py), as the
policy docs/security.md states: GET needs `read`, other methods `generate`, /v1/admin `admin`;
public routes are listed below. A route outside the document that is not listed here, or a path
parameter with no value below, fails the walk until someone writes down what it should need.
"""

from __future__ import annotations

import re

import pytest
from fastapi.routing import APIRoute
from starlette.routing import Mount, Route

from tests.helpers import app_settings
from tests.keyed_app import FILE, keyed_app
from tests.keys import bearer

# Answered without a key (probes, the Agent Card, the console's static files, the docs pages while
# they are served).
PUBLIC = {("GET", "/livez"), ("GET", "/readyz"), ("GET", "/.well-known/agent-card.json"), ("GET", "/ui/{file}"),
          ("GET", "/docs"), ("GET", "/docs/oauth2-redirect"), ("GET", "/redoc"), ("GET", "/openapi.json")}
# Routes the OpenAPI document does not list, by (method, path as the app declares it): the methods
# each answers. A route the app gains outside the document must be added here.
NOT_IN_DOCUMENT = {
    "/mcp": ("GET", "POST", "DELETE"),  # MCP over streamable HTTP
    "/a2a": ("POST",),  # A2A JSON-RPC
    "/.well-known/agent-card.json": ("GET",),
    "/ui": ("GET", "POST"),  # the console's static files (a POST is no read)
    "/": ("GET",),  # a redirect to /ui/
    "/openapi.json": ("GET",), "/docs": ("GET",), "/docs/oauth2-redirect": ("GET",), "/redoc": ("GET",),
}
JOB_PARAM = "job_id"  # a route with it shows one owner's job: another owner gets 404


def needs(method: str, path: str) -> str | None:
    """The scope a route should need (None: public), by the rule docs/security.md states."""
    if (method, path) in PUBLIC:
        return None
    if path.startswith("/v1/admin/"):
        return "admin"
    return "read" if method == "GET" else "generate"


# A key with every scope but the one a route needs, to show the route asks for that one.
WRONG_SCOPE = {"read": "writer", "generate": "reader", "admin": "gen"}


def _declared_routes(app) -> set[tuple[str, str]]:
    """(method, path) of every route the app serves, included routers' and mounts' too."""
    found = set()

    def walk(routes, prefix=""):
        for route in routes:
            if hasattr(route, "include_context"):  # FastAPI keeps an included router as one entry
                walk(route.original_router.routes, prefix + route.include_context.prefix)
            elif isinstance(route, Mount):
                found.update((method, route.path) for method in NOT_IN_DOCUMENT.get(route.path, ("GET",)))
            elif isinstance(route, (APIRoute, Route)):
                methods = (route.methods or set(NOT_IN_DOCUMENT.get(route.path, ()))) - {"HEAD"}
                found.update((method, prefix + route.path) for method in methods)

    walk(app.router.routes)
    return found


def _walked_routes(app) -> list[tuple[str, str]]:
    """The document's operations, and the routes it leaves out (which must be listed above)."""
    document = {(method.upper(), path) for path, item in app.openapi()["paths"].items() for method in item}
    declared = _declared_routes(app)
    unlisted = {(method, path) for method, path in declared - document
                if method not in NOT_IN_DOCUMENT.get(path, ())}
    assert not unlisted, f"routes outside the OpenAPI document with no expectation here: {sorted(unlisted)}"
    outside = {(method, "/ui/{file}" if path == "/ui" else path) for method, path in declared - document}
    return sorted(document | outside)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    app = keyed_app(tmp_path_factory.mktemp("walk"))
    with app.client:  # runs the lifespan: the MCP session manager
        yield app
    app.store.close()


def _concrete(path: str, served) -> str:
    values = {JOB_PARAM: served.job_id, "name": FILE, "model": app_settings().default_model,
              "file": "index.html"}
    for name in re.findall(r"\{([^}]+)\}", path):
        assert name in values, f"{path}: no value for path parameter {name!r}; add one (and its expectation)"
        path = path.replace("{" + name + "}", values[name])
    return path


def _send(served, method, path, key=None):
    # JSON only: past the gate, GET /mcp would otherwise open an event stream that never ends (406 instead).
    headers = {"Accept": "application/json"}
    if key is not None:
        headers.update(bearer(served.keys[key]))
    body = {} if method in ("POST", "PUT", "PATCH") else None
    return served.client.request(method, _concrete(path, served), json=body, headers=headers)


def _walk(served):
    routes = _walked_routes(served.app)
    assert {("POST", "/mcp"), ("GET", "/mcp"), ("POST", "/a2a"), ("POST", "/v1/images/generations"),
            ("GET", "/v1/admin/usage"), ("DELETE", "/v1/jobs/{job_id}")} <= set(routes)
    return routes


def test_without_a_key_every_route_but_the_public_ones_answers_401(served):
    for method, path in _walk(served):
        status = _send(served, method, path).status_code
        if needs(method, path) is None:
            assert status not in (401, 403), (method, path, status)
        else:
            assert status == 401, (method, path, status)


def test_a_key_without_the_scope_a_route_needs_gets_403_naming_it(served):
    for method, path in _walk(served):
        scope = needs(method, path)
        if scope is None:
            continue
        response = _send(served, method, path, WRONG_SCOPE[scope])
        assert response.status_code == 403, (method, path, response.status_code)
        assert response.json()["scope"] == scope, (method, path)


def test_another_owners_key_gets_404_for_a_job_and_passes_the_gate_elsewhere(served):
    for method, path in _walk(served):
        scope = needs(method, path)
        if scope is None or scope == "admin":
            continue
        status = _send(served, method, path, "other").status_code
        if "{" + JOB_PARAM + "}" in path:
            assert status == 404, (method, path, status)
        else:
            assert status not in (401, 403), (method, path, status)
    # The owner's own key reads the same job: the 404 was the owner check, not a bad id.
    for method, path in _walk(served):
        if method == "GET" and "{" + JOB_PARAM + "}" in path:
            assert _send(served, method, path, "gen").status_code == 200, path
    listed = served.client.get("/v1/jobs", headers=bearer(served.keys["other"])).json()["jobs"]
    assert served.job_id not in {job["id"] for job in listed}


def _mcp(served, key, tool, **arguments) -> str:
    call = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": tool, "arguments": arguments}}
    response = served.client.post("/mcp", json=call, headers={**bearer(served.keys[key]),
                                                                "Accept": "application/json, text/event-stream"})
    assert response.status_code == 200
    return response.text


def test_over_mcp_another_owners_job_is_not_found(served):
    for tool in ("get_job", "cancel_job"):
        answer = _mcp(served, "other", tool, job_id=served.job_id)
        assert '"isError":true' in answer and "no job" in answer, (tool, answer)
    assert '"isError":true' not in _mcp(served, "gen", "get_job", job_id=served.job_id)


def test_over_a2a_another_owners_task_is_not_found(served):
    for method in ("GetTask", "CancelTask"):
        call = {"jsonrpc": "2.0", "id": 1, "method": method, "params": {"id": served.job_id}}
        answer = served.client.post("/a2a", json=call, headers={**bearer(served.keys["other"]), "A2A-Version": "1.0"})
        assert answer.json()["error"]["data"][0]["reason"] == "TASK_NOT_FOUND", (method, answer.text)


def test_a_route_added_outside_the_document_with_no_expectation_fails_the_walk():
    from starlette.responses import PlainTextResponse

    from serve_app.api.app import build_api

    app = build_api()
    app.router.routes.append(Route("/v1/added-later", lambda request: PlainTextResponse("hi"), methods=["GET"]))
    with pytest.raises(AssertionError, match="/v1/added-later"):
        _walked_routes(app)

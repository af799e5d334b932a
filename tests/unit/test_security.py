"""API keys, scopes, per-key limits, signed URLs and safe defaults, on the real app (`build_api`)
through Starlette's TestClient: no Ray. The Guard is an ASGI middleware, so what holds here holds
for every way the app is served."""

from __future__ import annotations

import os
import threading
import time

import pytest
import yaml
from fastapi import Request
from fastapi.routing import APIRoute, APIWebSocketRoute
from starlette.routing import Mount
from starlette.testclient import TestClient

from serve_app.api.app import build_api
from serve_app.cli import unprotected_bind
from serve_app.config import AppArgs
from serve_app.security import keys as keys_module
from serve_app.security.guard import NO_KEYS, UNAUTHORIZED, Auth, is_public, principal
from serve_app.security.keys import KeyRing, add_to_keys_file, hash_key, key_entry_yaml, new_key

LOOPBACK = ("127.0.0.1", 40000)
REMOTE = ("203.0.113.7", 40000)


def _write_keys(path, entries: list[dict], secret: str = "s" * 64) -> None:
    path.write_text(yaml.safe_dump({"url_signing_secret": secret, "keys": entries}))


@pytest.fixture
def keys(tmp_path):
    """A keys file with: gen (generate+read), reader (read), admin, expired, revoked, limited ones."""
    made = {}
    entries = []
    for name, scopes, extra in (
        ("gen", ["generate", "read"], {}),
        ("reader", ["read"], {}),
        ("admin", ["admin"], {}),
        ("expired", ["generate", "read"], {"expires_at": "2020-01-01T00:00:00Z"}),
        ("revoked", ["generate", "read"], {"revoked": True}),
        ("rpm", ["generate", "read"], {"limits": {"requests_per_minute": 3}}),
        ("conc", ["generate", "read"], {"limits": {"concurrent_requests": 1}}),
    ):
        key_id, key = new_key()
        entry = key_entry_yaml(key_id, name, key, scopes)
        entry.update(extra)
        entries.append(entry)
        made[name] = key
    path = tmp_path / "keys.yaml"
    _write_keys(path, entries)
    made["path"] = path
    return made


def _app(auth: Auth | None, extra_routes: bool = True):
    api = build_api()
    if auth is not None:
        api.state.auth = auth
    if extra_routes:
        gate = threading.Event()

        @api.get("/v1/test/whoami")
        async def whoami(request: Request) -> dict:
            return {"key_id": principal(request).key_id}

        @api.post("/v1/test/slow")
        def slow() -> dict:  # a sync route: runs in a thread, holding its concurrency slot until released
            gate.wait(10)
            return {"ok": True}

        api.state.gate = gate
    return api


def _client(app, client=LOOPBACK) -> TestClient:
    return TestClient(app, client=client, raise_server_exceptions=False)


def _concrete(path: str) -> str:
    import re

    return re.sub(r"\{[^}]+\}", "x", path)


def _every_route(app, routes=None, prefix: str = ""):
    """(method, path) of every route of the app, included routers' and mounted sub-apps' too,
    whatever their kind (FastAPI 0.165 keeps an included router as one `_IncludedRouter` entry)."""
    found = []
    for route in app.router.routes if routes is None else routes:
        if hasattr(route, "include_context"):
            found += _every_route(app, route.original_router.routes, prefix + route.include_context.prefix)
            continue
        route = _Prefixed(route, prefix) if prefix else route
        if isinstance(route, APIRoute):
            found += [(method, _concrete(route.path)) for method in sorted(route.methods)]
        elif isinstance(route, APIWebSocketRoute):
            found.append(("GET", _concrete(route.path)))
        elif isinstance(route, Mount):
            found += [("GET", route.path + "/x"), ("POST", route.path + "/x")]
        else:
            found += [(method, _concrete(route.path)) for method in sorted(getattr(route, "methods", None) or {"GET"})]
    return found


class _Prefixed:
    def __init__(self, route, prefix):
        self.__class__ = type("P", (type(route),), {})
        self.__dict__.update(route.__dict__)
        self.path = prefix + route.path


# Keys and the keys file


def test_a_key_is_stored_only_as_its_hash(tmp_path):
    key_id, key = new_key()
    path = tmp_path / "keys.yaml"
    add_to_keys_file(path, key_entry_yaml(key_id, "alice", key, ["read"]))
    text = path.read_text()
    assert key not in text and hash_key(key) in text
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    assert len(key) > 40 and key.startswith("gsk_")
    ring = KeyRing(path)
    assert ring.authenticate(key).id == key_id and ring.authenticate(key + "x") is None
    assert yaml.safe_load(text)["url_signing_secret"], "a signing secret is made with the file"


def test_keys_file_is_reread_when_it_changes(keys, monkeypatch):
    monkeypatch.setattr(keys_module, "RELOAD_CHECK_S", 0.0)
    ring = KeyRing(keys["path"])
    assert ring.authenticate(keys["gen"]) is not None
    data = yaml.safe_load(keys["path"].read_text())
    data["keys"] = [entry for entry in data["keys"] if entry["name"] != "gen"]  # revoke by deleting
    new_id, new = new_key()
    data["keys"].append(key_entry_yaml(new_id, "rotated", new, ["read"]))
    keys["path"].write_text(yaml.safe_dump(data))
    os.utime(keys["path"], ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    assert ring.authenticate(keys["gen"]) is None
    assert ring.authenticate(new).id == new_id
    keys["path"].write_text("keys: [{broken")  # a bad edit keeps the keys read before
    os.utime(keys["path"], ns=(time.time_ns() + 2 * 10**9, time.time_ns() + 2 * 10**9))
    assert ring.authenticate(new).id == new_id


# Every route, walked: 401 without a usable key


def test_every_protected_route_answers_401_without_a_usable_key(keys):
    app = _app(Auth(str(keys["path"]), metrics=False))
    client = _client(app, REMOTE)
    routes = _every_route(app)
    assert ("POST", "/v1/images") in routes and ("DELETE", "/v1/jobs/x") in routes and ("GET", "/v1/admin/usage") in routes
    protected = [(method, path) for method, path in routes if not is_public(method, path)]
    assert len(protected) > 10
    for method, path in protected:
        for header in (None, "Bearer wrong-key", f"Bearer {keys['expired']}", f"Bearer {keys['revoked']}",
                       f"Basic {keys['gen']}", "Bearer "):
            response = client.request(method, path, headers={"Authorization": header} if header else {})
            assert response.status_code == 401, (method, path, header, response.text)
            assert response.headers["WWW-Authenticate"].startswith("Bearer")
            assert response.json() == {"detail": UNAUTHORIZED}, "one message, no hint whether the key exists"


def test_a_route_added_later_is_protected_without_being_listed(keys):
    app = _app(Auth(str(keys["path"]), metrics=False))
    client = _client(app, REMOTE)
    assert client.get("/v1/test/whoami").status_code == 401
    whoami = client.get("/v1/test/whoami", headers={"Authorization": f"Bearer {keys['gen']}"})
    assert whoami.status_code == 200 and whoami.json()["key_id"].startswith("k_")


def test_public_routes_need_no_key(keys):
    client = _client(_app(Auth(str(keys["path"]), metrics=False)), REMOTE)
    assert client.get("/openapi.json").status_code == 200
    assert client.get("/docs").status_code == 200
    assert not is_public("POST", "/ui/x") and is_public("GET", "/ui/app.js") and is_public("GET", "/livez")


def test_scopes(keys):
    client = _client(_app(Auth(str(keys["path"]), metrics=False)), REMOTE)
    reader = {"Authorization": f"Bearer {keys['reader']}"}
    response = client.post("/v1/images", json={"prompt": "a fox"}, headers=reader)
    assert response.status_code == 403 and "'generate'" in response.json()["detail"]
    assert client.get("/v1/test/whoami", headers=reader).status_code == 200
    response = client.get("/v1/admin/usage", headers={"Authorization": f"Bearer {keys['gen']}"})
    assert response.status_code == 403 and response.json()["scope"] == "admin"
    admin = {"Authorization": f"Bearer {keys['admin']}"}
    client.app.state.gate.set()  # the slow route answers at once
    assert client.post("/v1/test/slow", headers=admin).json() == {"ok": True}, "admin implies generate"
    assert client.get("/v1/test/whoami", headers=admin).status_code == 200


# Safe defaults


def test_without_keys_only_loopback_clients_are_answered():
    remote = _client(_app(Auth(None, metrics=False)), REMOTE)
    response = remote.get("/v1/test/whoami")
    assert response.status_code == 403 and response.json() == {"detail": NO_KEYS}
    assert "genserve keys create" in NO_KEYS and "allow_unauthenticated" in NO_KEYS
    # Public routes are not behind the gate: /livez answers a remote client without keys.
    assert remote.get("/livez").json() == {"status": "ok"}
    local = _client(_app(Auth(None, metrics=False)), LOOPBACK)
    assert local.get("/v1/test/whoami").json() == {"key_id": "local"}
    ipv6 = _client(_app(Auth(None, metrics=False)), ("::1", 1))
    assert ipv6.get("/v1/test/whoami").status_code == 200
    open_ = _client(_app(Auth(None, allow_unauthenticated=True, metrics=False)), REMOTE)
    assert open_.get("/v1/test/whoami").status_code == 200
    bare = _client(_app(None), REMOTE)  # an app nobody configured: loopback only too
    assert bare.get("/v1/test/whoami").status_code == 403


def test_serve_refuses_a_public_bind_without_keys(keys):
    app = {"name": "genserve", "import_path": "serve_app.builder:build_app", "args": {}}
    assert unprotected_bind({"http_options": {"host": "127.0.0.1"}, "applications": [app]}) is None
    why = unprotected_bind({"http_options": {"host": "0.0.0.0"}, "applications": [app]})
    assert why and "genserve keys create" in why
    keyed = {**app, "args": {"auth": {"keys_file": str(keys["path"])}}}
    assert unprotected_bind({"http_options": {"host": "0.0.0.0"}, "applications": [keyed]}) is None


def test_shipped_public_profiles_configure_keys():
    from pathlib import Path

    root = Path(__file__).parents[2]
    for name in ("configs/single-gpu.yaml", "configs/multi-gpu.yaml"):
        raw = yaml.safe_load((root / name).read_text())
        assert raw["http_options"]["host"] == "0.0.0.0"
        assert raw["applications"][0]["args"]["auth"]["keys_file"], name
        assert "does not exist" in unprotected_bind(raw), "genserve serve checks the file before deploying"


def test_more_ingress_replicas_need_shared_limit_storage():
    with pytest.raises(ValueError, match="limits_storage"):
        AppArgs.model_validate({"auth": {"keys_file": "k.yaml"}, "deployments": {"Ingress": {"num_replicas": 2}}})
    AppArgs.model_validate({"auth": {"keys_file": "k.yaml", "limits_storage": "redis://127.0.0.1:1/0"},
                            "deployments": {"Ingress": {"num_replicas": 2}}})


def test_cors_is_off_unless_origins_are_listed(keys):
    client = _client(_app(Auth(str(keys["path"]), metrics=False)), REMOTE)
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    assert "access-control-allow-origin" not in client.options("/v1/images", headers=preflight).headers
    api = build_api(cors_origins=["https://app.example"])
    api.state.auth = Auth(str(keys["path"]), metrics=False)
    listed = _client(api, REMOTE)
    response = listed.options("/v1/images", headers=preflight)
    assert response.status_code == 200 and response.headers["access-control-allow-origin"] == "https://app.example"
    refused = listed.get("/v1/jobs", headers={"Origin": "https://app.example"})
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == "https://app.example"


# Limits


def test_requests_per_minute_gives_429_naming_the_limit(keys):
    client = _client(_app(Auth(str(keys["path"]), metrics=False)), REMOTE)
    headers = {"Authorization": f"Bearer {keys['rpm']}"}
    assert [client.get("/v1/test/whoami", headers=headers).status_code for _ in range(3)] == [200] * 3
    response = client.get("/v1/test/whoami", headers=headers)
    assert response.status_code == 429
    assert 1 <= int(response.headers["Retry-After"]) <= 60
    body = response.json()
    assert body["limit"] == "requests_per_minute" and body["value"] == 3 and body["reset_at"] > time.time()
    other = client.get("/v1/test/whoami", headers={"Authorization": f"Bearer {keys['gen']}"})
    assert other.status_code == 200, "limits are per key"


def test_concurrent_requests_limit_and_its_release(keys):
    app = _app(Auth(str(keys["path"]), metrics=False))
    client = _client(app, REMOTE)
    headers = {"Authorization": f"Bearer {keys['conc']}"}
    results = []
    first = threading.Thread(target=lambda: results.append(client.post("/v1/test/slow", headers=headers)))
    first.start()
    try:
        from tests.helpers import wait_until

        limiter = app.state.auth.limiter
        key_id = app.state.auth.keys.authenticate(keys["conc"]).id
        wait_until(lambda: limiter.in_flight(key_id) == 1, 10, 0.02, "slot taken")
        response = client.post("/v1/test/slow", headers=headers)
        assert response.status_code == 429 and response.json()["limit"] == "concurrent_requests"
        assert response.headers["Retry-After"] == "1"
    finally:
        app.state.gate.set()
        first.join(10)
    assert results[0].status_code == 200
    assert client.post("/v1/test/slow", headers=headers).status_code == 200, "the slot is given back"


def test_daily_image_budget(tmp_path):
    from serve_app.security.keys import KeyLimits
    from serve_app.security.limiter import KeyLimiter, LimitExceeded

    limiter = KeyLimiter("memory://")
    limits = KeyLimits(daily_images=5)
    limiter.charge_images("k", limits, 4)
    with pytest.raises(LimitExceeded) as error:
        limiter.charge_images("k", limits, 2)
    assert error.value.limit == "daily_images" and "1 left today" in error.value.detail
    limiter.charge_images("k", limits, 1)  # the refusal cost nothing
    assert 86000 < error.value.reset_at - time.time() <= 86400
    limiter.refund_images("k", limits, 5)
    limiter.charge_images("k", limits, 5)
    assert limiter.usage("k", limits)["images_today"] == 5


# Signed URLs


def test_signed_file_urls(keys):
    auth = Auth(str(keys["path"]), metrics=False, signed_url_ttl_s=60)
    gen = auth.keys.authenticate(keys["gen"]).id
    path = "/v1/jobs/abc/files/image-0.png"
    signed = auth.sign_path(path, gen, now=1000.0)
    base, query = signed.split("?")
    assert base == path and "sig=" in query and "expires=1060" in query and f"kid={gen}" in query
    assert auth.signed(path, query.encode(), now=1059.0).id == gen
    assert not auth.signed(path, query.encode(), now=1061.0), "expired"
    assert not auth.signed("/v1/jobs/abd/files/image-0.png", query.encode(), now=1000.0), "another file"
    assert not auth.signed(path, query.replace("expires=1060", "expires=9999").encode(), now=1000.0)
    assert Auth(None, metrics=False).sign_path(path, "local") == path, "nothing to sign with: plain URL"
    client = _client(_app(Auth(str(keys["path"]), metrics=False)), REMOTE)
    fresh = Auth(str(keys["path"]), metrics=False).sign_path(path, gen)
    # Past the Guard (it reaches the route, which has no services here), with no key:
    assert client.get(fresh).status_code != 401
    assert client.get(path).status_code == 401
    assert client.get(fresh.replace("/files/", "/files/x")).status_code == 401


def test_genserve_serve_exits_2_on_a_public_bind_without_keys(tmp_path, capsys):
    from serve_app.cli import main

    config = yaml.safe_load((__import__("pathlib").Path(__file__).parents[2] / "configs" / "dev.yaml").read_text())
    config["http_options"]["host"] = "0.0.0.0"
    path = tmp_path / "public.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["serve", str(path)]) == 2  # before any Ray process starts
    assert "has no API keys" in capsys.readouterr().err


def test_auth_bench_table_reports_the_difference():
    from serve_app.bench.auth import format_auth_table
    from serve_app.bench.images import Sample

    table = format_auth_table([Sample("no keys (loopback)", [0.002, 0.003, 0.004], []),
                               Sample("keys, limits in memory", [0.0025, 0.0035, 0.0045], [])])
    lines = table.splitlines()
    assert "p50 +ms" in lines[0] and lines[2].split()[-2:] == ["0.500", "1.167"]
    assert lines[1].split()[-2:] == ["0.000", "1.000"]


def test_guard_cost_in_process_is_measured_without_and_with_a_key():
    from serve_app.bench.auth import _guard_in_process

    plain, keyed = _guard_in_process(50, 5)
    assert len(plain.seconds) == len(keyed.seconds) == 50 and "keys" in keyed.name


def test_the_docs_keys_example_runs(tmp_path, monkeypatch, capsys):
    """docs/security.md's `genserve keys create` example, run as written, in a scratch directory."""
    import re
    import shlex
    from pathlib import Path

    from serve_app.cli import main

    doc = (Path(__file__).parents[2] / "docs" / "security.md").read_text()
    block = re.search(r"```bash\n(genserve keys create [^\n]+)\n((?:#[^\n]*\n)+)```", doc)
    command, shown = block.group(1), block.group(2)
    monkeypatch.chdir(tmp_path)
    assert main(shlex.split(command)[1:]) == 0
    out = capsys.readouterr().out
    key = re.search(r"^    (gsk_\S+)$", out, re.M).group(1)
    assert shown.splitlines()[0].split("(id")[0].lstrip("# ") in out  # "API key for alice "
    ring = KeyRing(tmp_path / "data" / "keys.yaml")
    entry = ring.authenticate(key)
    assert entry.name == "alice" and entry.scopes == ("generate", "read")
    assert entry.limits.requests_per_minute == 120 and entry.limits.active_jobs == 20
    secret = re.search(r"^    (whsec_\S+)$", out, re.M).group(1)  # printed once, kept in the file to sign
    assert entry.webhook_secret == secret and "whsec_" in shown


def test_two_limiters_on_one_redis_share_every_limit(tmp_path):
    """What two Ingress replicas do: each its own KeyLimiter, one Redis."""
    from serve_app.security.keys import KeyLimits
    from serve_app.security.limiter import KeyLimiter, LimitExceeded
    from tests.redis_server import RedisServer

    server = RedisServer(tmp_path).start()
    try:
        one, two = KeyLimiter(server.url), KeyLimiter(server.url)
        limits = KeyLimits(requests_per_minute=3, concurrent_requests=1, daily_images=4)
        one.hit_request("k", limits)
        two.hit_request("k", limits)
        one.hit_request("k", limits)
        with pytest.raises(LimitExceeded):
            two.hit_request("k", limits)
        hold = one.acquire("k", limits)
        assert hold is not None and two.in_flight("k") == 1
        with pytest.raises(LimitExceeded):
            two.acquire("k", limits)
        one.release("k", hold)
        assert two.acquire("k", limits)
        two.charge_images("k", limits, 3)
        with pytest.raises(LimitExceeded):
            one.charge_images("k", limits, 2)
        assert one.usage("k", limits)["images_today"] == 3
    finally:
        server.stop()

"""API keys, ownership and per-key limits over real HTTP: the dev profile (one tiny FLUX) behind a
keys file, with two Ingress replicas whose rate-limit counters live in one Redis."""

import concurrent.futures
import re
import time

import pytest

from serve_app.api.app import build_api
from serve_app.security.guard import UNAUTHORIZED, is_public
from tests.helpers import wait_until
from tests.integration.jobs import FINISHED

pytestmark = pytest.mark.integration
FOX = {"prompt": "a fox", "seed": 1, "num_inference_steps": 1}


@pytest.fixture
def app(keys_app):
    return keys_app


@pytest.fixture
def client(app):
    return app["client"]


def _keys(app, name):
    return app["keys"][name]["headers"]


def _submit(client, headers, request=FOX, extra: dict | None = None):
    response = client.post("/v1/jobs", json={"kind": "image", "request": request}, headers={**headers, **(extra or {})})
    assert response.status_code == 202, response.text
    return response.json()


def _finished(client, headers, job_id):
    return wait_until(lambda: (lambda s: s if s["state"] in FINISHED else None)(
        client.get(f"/v1/jobs/{job_id}", headers=headers).json()), 120, 0.1, f"job {job_id}")


def _routes():
    """Every route of the app the Ingress serves, walked (included routers and mounts too)."""
    from tests.unit.test_security import _every_route

    return _every_route(build_api())


def test_rate_limit_gives_429_with_retry_after(client, app):
    headers = _keys(app, "rpm")
    codes = [client.get("/v1/models", headers=headers).status_code for _ in range(4)]
    assert codes == [200] * 4
    refused = client.get("/v1/models", headers=headers)
    assert refused.status_code == 429 and 1 <= int(refused.headers["Retry-After"]) <= 60
    body = refused.json()
    assert body["limit"] == "requests_per_minute" and body["value"] == 4 and "per minute" in body["detail"]


def test_every_protected_route_answers_401_without_a_usable_key(client, app):
    routes = [(method, path) for method, path in _routes() if not is_public(method, path)]
    assert ("GET", "/v1/jobs/x/files/x") in routes and ("POST", "/v1/images") in routes
    bad = [None, "Bearer not-a-key", f"Bearer {app['keys']['expired']['key']}",
           f"Bearer {app['keys']['revoked']['key']}"]
    for method, path in routes:
        for header in bad:
            response = client.request(method, path, headers={"Authorization": header} if header else {})
            assert response.status_code == 401, (method, path, header, response.status_code)
            assert response.headers["www-authenticate"].startswith("Bearer")
            assert response.json() == {"detail": UNAUTHORIZED}
    assert client.get("/livez").status_code == 200, "liveness stays public"
    assert client.get("/healthz").status_code == 401, "the diagnostic that asks every model needs a key"
    assert client.get("/docs", headers=_keys(app, "admin")).status_code == 404, "with keys the docs pages are off"
    assert client.get("/openapi.json", headers=_keys(app, "admin")).status_code == 200


def test_scopes_are_enforced(client, app):
    refused = client.post("/v1/images", json=FOX, headers=_keys(app, "reader"))
    assert refused.status_code == 403 and "'generate'" in refused.json()["detail"]
    assert client.get("/v1/models", headers=_keys(app, "reader")).status_code == 200
    assert client.get("/v1/admin/usage", headers=_keys(app, "alice")).status_code == 403


def test_another_keys_jobs_are_not_found(client, app):
    alice, bob = _keys(app, "alice"), _keys(app, "bob")
    mine = _submit(client, alice, extra={"Idempotency-Key": "shared-key"})
    status = _finished(client, alice, mine["id"])
    assert status["state"] == "succeeded"
    job_id = mine["id"]
    unknown = client.get("/v1/jobs/0123456789abcdef0123456789abcdef", headers=bob)
    for method, path in (("GET", f"/v1/jobs/{job_id}"), ("GET", f"/v1/jobs/{job_id}/result"),
                         ("GET", f"/v1/jobs/{job_id}/events"), ("GET", f"/v1/jobs/{job_id}/files/image-0.png"),
                         ("POST", f"/v1/jobs/{job_id}/cancel"), ("DELETE", f"/v1/jobs/{job_id}")):
        response = client.request(method, path, headers=bob)
        assert response.status_code == 404, (method, path, response.text)
        assert response.json()["detail"] == unknown.json()["detail"].replace("0123456789abcdef" * 2, job_id)
    assert job_id not in [job["id"] for job in client.get("/v1/jobs?limit=200", headers=bob).json()["jobs"]]
    assert job_id in [job["id"] for job in client.get("/v1/jobs?limit=200", headers=alice).json()["jobs"]]
    admin = _keys(app, "admin")
    assert client.get(f"/v1/jobs/{job_id}", headers=admin).status_code == 200, "admin sees every job"
    # The same Idempotency-Key from bob is his own: a new job, never alice's (nor a 409 naming it).
    other = client.post("/v1/jobs", json={"kind": "image", "request": {**FOX, "prompt": "a cat"}},
                        headers={**bob, "Idempotency-Key": "shared-key"})
    assert other.status_code == 202 and other.json()["id"] != job_id
    assert "idempotent-replayed" not in other.headers
    replay = client.post("/v1/jobs", json={"kind": "image", "request": FOX}, headers={**alice, "Idempotency-Key": "shared-key"})
    assert replay.status_code == 202 and replay.json()["id"] == job_id and replay.headers["idempotent-replayed"] == "true"


def test_signed_file_urls_load_without_a_key_and_a_key_deletes_its_finished_job(client, app):
    alice = _keys(app, "alice")
    job_id = _submit(client, alice, {**FOX, "prompt": "a heron"})["id"]
    status = _finished(client, alice, job_id)
    url = status["files"][0]["url"]
    assert re.match(rf"^/v1/jobs/{job_id}/files/image-0\.png\?expires=\d+&kid=k_[0-9a-f]+&sig=[0-9a-f]{{64}}$", url)
    result_url = client.get(f"/v1/jobs/{job_id}/result", headers=alice).json()["images"][0]["url"]
    assert result_url.startswith(f"/v1/jobs/{job_id}/files/image-0.png?expires=")
    loaded = client.get(url)  # no key: what an <img src> does
    assert loaded.status_code == 200 and loaded.headers["content-type"] == "image/png"
    assert client.get(url.replace("sig=", "sig=0")).status_code == 401
    assert client.get(url.split("?")[0]).status_code == 401
    running = _submit(client, alice, {**FOX, "prompt": "a crane", "num_inference_steps": 4})
    deleted = client.delete(f"/v1/jobs/{job_id}", headers=alice)
    assert deleted.status_code == 204
    assert client.get(f"/v1/jobs/{job_id}", headers=alice).status_code == 404
    assert client.get(url).status_code == 404, "its files are gone too"
    early = client.delete(f"/v1/jobs/{running['id']}", headers=alice)
    assert early.status_code in (204, 409)  # 409 while it is queued or running; 204 if it finished already
    if early.status_code == 409:
        _finished(client, alice, running["id"])
    else:
        assert client.get(f"/v1/jobs/{running['id']}", headers=alice).status_code == 404


def test_active_jobs_quota_gives_429_until_a_job_ends(client, app):
    quota = _keys(app, "quota")
    # Four images of four steps: seconds on the CPU, while the second submit takes milliseconds.
    first = _submit(client, quota, {**FOX, "prompt": "a lynx", "num_inference_steps": 4, "num_images": 4})
    refused = client.post("/v1/jobs", json={"kind": "image", "request": FOX}, headers=quota)
    assert refused.status_code == 429 and refused.headers["Retry-After"]
    assert refused.json()["limit"] == "active_jobs" and refused.json()["value"] == 1
    _finished(client, quota, first["id"])
    assert client.post("/v1/jobs", json={"kind": "image", "request": FOX}, headers=quota).status_code == 202


def test_daily_image_budget(client, app):
    budget = _keys(app, "budget")
    assert client.post("/v1/images", json={**FOX, "num_images": 2}, headers=budget).status_code == 200
    refused = client.post("/v1/images", json=FOX, headers=budget)
    assert refused.status_code == 429 and refused.json()["limit"] == "daily_images"
    assert 0 < int(refused.headers["Retry-After"]) <= 86400
    usage = client.get("/v1/admin/usage", headers=_keys(app, "admin")).json()["keys"]
    row = next(entry for entry in usage if entry["name"] == "budget")
    assert row["usage"]["images_today"] == 2 and "sha256" not in row


def test_two_ingress_replicas_enforce_one_shared_limit(client, app):
    """rpm allows 4 a minute; 16 requests at once, spread by Serve's proxy over both replicas,
    get exactly 4 through: per-replica counters would let up to 8 through."""
    headers = _keys(app, "burst")
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda _: client.get("/v1/loras", headers=headers).status_code, range(16)))
    assert codes.count(200) == 4 and codes.count(429) == 12, codes


@pytest.mark.long  # waits out the rest of a one-minute window: make test-long
def test_after_the_rate_limit_resets_requests_succeed(client, app):
    headers = _keys(app, "rpm")
    responses = (client.get("/v1/models", headers=headers) for _ in range(5))  # 4 a minute: the 5th at most
    refused = next(response for response in responses if response.status_code == 429)
    reset_at = refused.json()["reset_at"]
    wait_until(lambda: time.time() >= reset_at + 0.5, 70, 0.5, "the rate limit window to pass")
    assert client.get("/v1/models", headers=headers).status_code == 200

"""Per-client limits on synchronous requests (auth.client_limits): per API key when one is sent, per
remote address otherwise (after trusted proxies' X-Forwarded-For); 429 with Retry-After. On the
real app (`build_api`) through Starlette's TestClient, with the limiter of serve_app.security."""

from __future__ import annotations

import threading
import time

import pytest
import yaml
from fastapi import Request
from pydantic import ValidationError
from starlette.testclient import TestClient

from serve_app.api.app import build_api
from serve_app.config import AppArgs, AuthConfig, ClientLimits
from serve_app.security.guard import Auth, principal
from serve_app.security.keys import key_entry_yaml, new_key
from tests.helpers import wait_until

LOOPBACK = ("127.0.0.1", 40000)
PROXY = ("10.1.2.3", 40000)


def _app(auth: Auth, trusted_proxies=()):
    api = build_api(trusted_proxies=trusted_proxies)
    api.state.auth = auth
    gate = threading.Event()

    @api.post("/v1/test/slow")
    def slow(request: Request) -> dict:  # a sync route: holds its concurrency slot until the gate opens
        gate.wait(10)
        return {"key_id": principal(request).key_id, "client": request.client.host}

    @api.post("/v1/test/fast")
    async def fast(request: Request) -> dict:
        return {"client": request.client.host}

    @api.get("/v1/test/read")
    async def read() -> dict:
        return {}

    api.state.gate = gate
    return api


def _auth(keys_file=None, allow_unauthenticated=False, **limits) -> Auth:
    return Auth(keys_file, allow_unauthenticated=allow_unauthenticated, metrics=False,
                client_limits=ClientLimits(**limits))


def _client(app, client=LOOPBACK) -> TestClient:
    return TestClient(app, client=client, raise_server_exceptions=False)


def _slots(app) -> dict[str, int]:
    limiter = app.state.auth.limiter
    prefix = limiter._concurrency_key("")
    counts = {key: limiter.holds.count(key) for key in list(limiter.holds._holds) if key.startswith(prefix)}
    return {key[len(prefix):]: count for key, count in counts.items() if count}


class Held:
    """One slow request in flight on its own thread until `release()`."""

    def __init__(self, client: TestClient, **kwargs):
        self.app = client.app
        self.results = []
        self.thread = threading.Thread(target=lambda: self.results.append(client.post("/v1/test/slow", **kwargs)))
        self.thread.start()

    def release(self):
        self.app.state.gate.set()
        self.thread.join(10)
        return self.results[0]


def test_without_keys_one_address_gets_its_concurrency_then_429_with_retry_after():
    app = _app(_auth(concurrent_requests=1))
    client = _client(app)
    held = Held(client)
    try:
        wait_until(lambda: _slots(app) == {"addr:127.0.0.1": 1}, 10, 0.02, "the first request's slot")
        refused = client.post("/v1/test/fast")
        assert refused.status_code == 429
        assert refused.headers["Retry-After"] == "1"
        body = refused.json()
        assert body["limit"] == "concurrent_requests" and body["value"] == 1
        assert "1 synchronous requests at once for this client address" in body["detail"]
        assert client.get("/v1/test/read").status_code == 200, "reads are not synchronous generation"
    finally:
        assert held.release().status_code == 200
    assert client.post("/v1/test/fast").status_code == 200, "the slot is given back when the request ends"
    assert _slots(app) == {}


def test_each_remote_address_is_its_own_client():
    app = _app(_auth(allow_unauthenticated=True, concurrent_requests=1))
    held = Held(_client(app, ("203.0.113.7", 1)))
    try:
        wait_until(lambda: _slots(app) == {"addr:203.0.113.7": 1}, 10, 0.02, "the first client's slot")
        assert _client(app, ("203.0.113.7", 2)).post("/v1/test/fast").status_code == 429, "same address, other port"
        assert _client(app, ("198.51.100.9", 1)).post("/v1/test/fast").status_code == 200
    finally:
        held.release()


def test_synchronous_requests_per_minute_per_address_not_counting_reads_or_jobs():
    app = _app(_auth(requests_per_minute=2))
    client = _client(app)
    for _ in range(5):
        assert client.get("/v1/test/read").status_code == 200
    assert [client.post("/v1/test/fast").status_code for _ in range(2)] == [200, 200]
    refused = client.post("/v1/test/fast")
    assert refused.status_code == 429
    body = refused.json()
    assert body["limit"] == "sync_requests_per_minute" and body["value"] == 2
    assert 1 <= int(refused.headers["Retry-After"]) <= 60 and body["reset_at"] > time.time()
    assert "auth.client_limits" in body["detail"]
    jobs = client.post("/v1/jobs", json={})  # async: a job queue of its own, with its own limits
    assert jobs.status_code != 429


@pytest.fixture
def keys_file(tmp_path):
    made, entries = {}, []
    for name, limits in (("plain", {}), ("roomy", {"concurrent_requests": 2})):
        key_id, key = new_key()
        entry = key_entry_yaml(key_id, name, key, ["generate", "read"])
        if limits:
            entry["limits"] = limits
        entries.append(entry)
        made[name] = (key_id, {"Authorization": f"Bearer {key}"})
    path = tmp_path / "keys.yaml"
    path.write_text(yaml.safe_dump({"url_signing_secret": "s" * 64, "keys": entries}))
    made["path"] = str(path)
    return made


def test_with_keys_the_client_is_the_key_and_its_own_limit_replaces_the_default(keys_file):
    app = _app(_auth(keys_file["path"], concurrent_requests=1))
    plain_id, plain = keys_file["plain"]
    roomy_id, roomy = keys_file["roomy"]
    # Two addresses, one key: one client.
    first = Held(_client(app, ("203.0.113.7", 1)), headers=plain)
    try:
        wait_until(lambda: _slots(app) == {plain_id: 1}, 10, 0.02, "the key's slot")
        refused = _client(app, ("198.51.100.9", 1)).post("/v1/test/fast", headers=plain)
        assert refused.status_code == 429 and "for this key" in refused.json()["detail"]
        # A key with concurrent_requests: 2 in the keys file gets two, whatever the default.
        second = Held(_client(app, ("203.0.113.7", 1)), headers=roomy)
        wait_until(lambda: _slots(app).get(roomy_id) == 1, 10, 0.02, "the roomy key's first slot")
        assert _client(app, ("203.0.113.7", 1)).post("/v1/test/fast", headers=roomy).status_code == 200
    finally:
        first.release()
        second.release()


def test_behind_a_trusted_proxy_the_forwarded_address_is_the_client():
    app = _app(_auth(allow_unauthenticated=True, requests_per_minute=1), trusted_proxies=["10.0.0.0/8"])
    proxy = _client(app, PROXY)
    one = proxy.post("/v1/test/fast", headers={"X-Forwarded-For": "203.0.113.7"})
    assert one.status_code == 200 and one.json()["client"] == "203.0.113.7"
    assert proxy.post("/v1/test/fast", headers={"X-Forwarded-For": "198.51.100.9"}).status_code == 200, \
        "another client behind the same proxy has its own count"
    assert proxy.post("/v1/test/fast", headers={"X-Forwarded-For": "203.0.113.7"}).status_code == 429
    # From an untrusted peer the header is ignored: it cannot buy itself a fresh count.
    stranger = _client(app, ("192.0.2.1", 1))
    assert stranger.post("/v1/test/fast", headers={"X-Forwarded-For": "203.0.113.99"}).json()["client"] == "192.0.2.1"
    assert stranger.post("/v1/test/fast", headers={"X-Forwarded-For": "203.0.113.98"}).status_code == 429


def test_a_forwarded_remote_client_is_not_loopback():
    """Loopback-only mode (no keys) behind a local reverse proxy: the real client is remote."""
    app = _app(_auth(), trusted_proxies=["127.0.0.1"])
    local = _client(app)
    assert local.post("/v1/test/fast").status_code == 200
    assert local.post("/v1/test/fast", headers={"X-Forwarded-For": "203.0.113.7"}).status_code == 403


def test_config_names_bad_proxies_and_needs_shared_counters_for_replicas():
    with pytest.raises(ValidationError, match="trusted_proxies: 'my-lb' is not an IP address or network"):
        AuthConfig(trusted_proxies=["my-lb"])
    with pytest.raises(ValidationError, match="more than one Ingress replica needs shared rate-limit counters"):
        AppArgs.model_validate({"auth": {"client_limits": {"concurrent_requests": 4}},
                                "deployments": {"Ingress": {"num_replicas": 2}}})
    AppArgs.model_validate({"auth": {"client_limits": {"concurrent_requests": 4}, "limits_storage": "memory://"},
                            "deployments": {"Ingress": {"num_replicas": 2}}})
    assert AppArgs().auth.client_limits == ClientLimits(), "off unless configured"


@pytest.fixture(params=["memory", "redis"])
def limiter_uri(request, tmp_path):
    if request.param == "memory":
        yield "memory://"
        return
    from tests.redis_server import RedisServer

    server = RedisServer(tmp_path).start()
    yield server.url
    server.stop()


def test_a_client_always_in_flight_keeps_its_concurrency_limit(limiter_uri):
    """hold_s of 1 s, and a client that always has two requests in flight (each shorter than
    hold_s, overlapping): its count never expires under it, so a third is refused throughout,
    never admitted by a counter that expired and went negative."""
    from serve_app.security.keys import KeyLimits
    from serve_app.security.limiter import KeyLimiter, LimitExceeded

    limiter = KeyLimiter(limiter_uri, hold_s=1.0)
    limits = KeyLimits(concurrent_requests=2)
    in_flight = [(limiter.acquire("k", limits), time.monotonic())]
    time.sleep(0.3)
    in_flight.append((limiter.acquire("k", limits), time.monotonic()))
    admitted_over = 0
    ends = time.monotonic() + 3.5
    while time.monotonic() < ends:
        # Each request runs 0.6 s, then a new one takes its place at once.
        for index, (hold, started) in enumerate(in_flight):
            if time.monotonic() - started >= 0.6:
                limiter.release("k", hold)
                in_flight[index] = (limiter.acquire("k", limits), time.monotonic())
        try:
            extra = limiter.acquire("k", limits)
        except LimitExceeded:
            pass
        else:
            admitted_over += 1
            limiter.release("k", extra)
        assert limiter.usage("k", limits)["concurrent_requests"] == 2
        time.sleep(0.05)
    assert admitted_over == 0, f"{admitted_over} requests admitted past the limit of 2"
    for hold, _ in in_flight:
        limiter.release("k", hold)
    assert limiter.in_flight("k") == 0
    leaked = limiter.acquire("k", limits)  # a replica died holding it: never given back
    time.sleep(1.1)
    assert limiter.in_flight("k") == 0, "a hold nobody gives back expires after hold_s"
    assert leaked is not None


def test_a_request_cancelled_while_its_slot_is_taken_gives_it_back(tmp_path):
    """The client leaves while admit()'s thread is taking its concurrency hold (a network
    limiter store): the request is cancelled, the thread goes on and takes it, and it is given back."""
    import asyncio

    from serve_app.security.keys import KeyLimits
    from tests.redis_server import RedisServer

    server = RedisServer(tmp_path).start()
    try:
        auth = Auth(None, limits_storage=server.url, metrics=False,
                    client_limits=ClientLimits(concurrent_requests=1))
        limiter = auth.limiter
        taking, taken = threading.Event(), threading.Event()
        acquire = limiter.acquire

        def slow_acquire(*args):
            taking.set()
            time.sleep(0.3)  # a slow round trip to Redis
            try:
                return acquire(*args)
            finally:
                taken.set()

        limiter.acquire = slow_acquire

        async def cancelled_admit():
            admit = asyncio.ensure_future(auth.admit("addr:10.0.0.9", KeyLimits(), sync=True))
            await asyncio.to_thread(taking.wait, 5)
            admit.cancel()
            await asyncio.gather(admit, return_exceptions=True)
            assert admit.cancelled()
            await asyncio.to_thread(taken.wait, 5)
            for _ in range(100):  # the late give-back runs on an executor thread
                if limiter.in_flight("addr:10.0.0.9") == 0:
                    break
                await asyncio.sleep(0.02)

        asyncio.run(cancelled_admit())
        assert limiter.in_flight("addr:10.0.0.9") == 0, "the cancelled request's slot is still held"
    finally:
        server.stop()

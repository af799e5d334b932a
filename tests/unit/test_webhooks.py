"""Webhooks on jobs (serve_app.jobs.webhooks): deliveries recorded with a job's end on both stores,
the URL policy after DNS resolution (a stub resolver), and delivery to a real receiver on loopback,
verified with the `standardwebhooks` package, retried with the same id, surviving a killed runner."""

from __future__ import annotations

import asyncio
import json

import pytest
from standardwebhooks import Webhook

from serve_app.config import WebhooksConfig
from serve_app.jobs.model import DELIVERED, GAVE_UP, PENDING, ResultFile
from serve_app.jobs.webhooks import Deliverer, UrlPolicy, WebhookGate, WebhookRefused
from serve_app.security.keys import new_webhook_secret
from tests.helpers import wait_until

SECRET = new_webhook_secret()
HOOK = {"id": "webhook", "kind": "webhook", "url": "https://hooks.example.com/h", "events": ["job.succeeded"]}
PUSH = {"id": "cfg-1", "kind": "a2a", "url": "https://agent.example.com/push",
        "events": ["job.succeeded", "job.failed", "job.cancelled"]}
NAMES = {"hooks.example.com": ["93.184.215.14"], "inside.example.com": ["10.1.2.3"],
         "rebinding.example.com": ["93.184.215.14"], "localhost": ["127.0.0.1"]}


async def stub_resolve(host: str, port: int) -> list[str]:
    if host not in NAMES:
        raise OSError("no such host")
    return NAMES[host]


def _succeed(store, job):
    claimed = store.claim(["image"], now=110.0)
    assert claimed.id == job.id
    return store.save_result(job.id, 1, {"images": []}, [(ResultFile("image-0.png", "image/png", 3), b"png")],
                             now=120.0)


def test_a_jobs_end_records_a_delivery_per_target_that_wants_it(store):
    job, _ = store.create("image", {"prompt": "a fox"}, owner="k_1", targets=[HOOK], now=100.0)
    assert store.get(job.id).targets == [HOOK]
    assert store.put_target(job.id, PUSH) is True and store.put_target(job.id, {**PUSH, "url": "https://b/"}) is True
    assert [t["url"] for t in store.get(job.id).targets] == [HOOK["url"], "https://b/"], "replaced by id"
    assert store.deliveries(job.id) == [] and store.due_deliveries(now=1e12) == []
    _succeed(store, job)
    made = store.deliveries(job.id)
    assert [(d["id"], d["event"], d["state"], d["attempts"], d["owner"]) for d in made] == [
        (f"msg_{job.id}_0", "job.succeeded", PENDING, 0, "k_1"), (f"msg_{job.id}_1", "job.succeeded", PENDING, 0, "k_1")]
    assert made[1]["target"]["url"] == "https://b/" and made[0]["next_at"] == 120.0
    assert store.put_target(job.id, {**PUSH, "id": "late"}) is True and len(store.get(job.id).targets) == 3
    assert len(store.deliveries(job.id)) == 2, "an ended job's deliveries are made already: a late target gets none"
    assert store.put_target("no-such-job", PUSH) is None
    assert [d["id"] for d in store.due_deliveries(now=121.0)] == [d["id"] for d in made]

    retry = store.record_delivery(made[0]["id"], 1, {"state": PENDING, "next_at": 200.0, "last_status": 500,
                                                     "last_error": "the receiver answered 500"})
    assert retry["attempts"] == 1 and retry["last_status"] == 500 and retry["next_at"] == 200.0
    assert store.record_delivery(made[0]["id"], 1, {"state": DELIVERED}) is None, "attempt 1 is recorded already"
    assert [d["id"] for d in store.due_deliveries(now=150.0)] == [made[1]["id"]]
    done = store.record_delivery(made[0]["id"], 2, {"state": DELIVERED, "last_status": 204, "delivered_at": 201.0})
    assert done["state"] == DELIVERED and done["delivered_at"] == 201.0 and done["next_at"] is None
    store.record_delivery(made[1]["id"], 1, {"state": GAVE_UP, "last_error": "refused"})
    assert store.due_deliveries(now=1e12) == []
    assert store.delete(job.id) is True and store.deliveries(job.id) == []


def test_an_end_the_webhook_did_not_ask_for_makes_no_delivery(store):
    job, _ = store.create("image", {"prompt": "a fox"}, targets=[HOOK])
    store.request_cancel(job.id)
    assert store.deliveries(job.id) == [], "the webhook asked for job.succeeded only"
    other, _ = store.create("image", {"prompt": "a fox"}, targets=[PUSH])
    assert store.delete_target(other.id, "cfg-1") is True and store.delete_target(other.id, "cfg-1") is False
    store.request_cancel(other.id)
    assert store.deliveries(other.id) == [] and store.delete_target("no-such-job", "x") is None


@pytest.mark.parametrize(("url", "why"), [
    ("http://169.254.169.254/latest/meta-data/", "the scheme must be https"),
    ("https://169.254.169.254/latest/meta-data/", "link-local"),
    ("https://[fd00:ec2::254]/", "metadata"),
    ("https://127.0.0.1:8000/h", "loopback"),
    ("https://localhost/h", "localhost resolves to 127.0.0.1, is a loopback address"),
    ("https://inside.example.com/h", "inside.example.com resolves to 10.1.2.3, is a private address"),
    ("https://nowhere.example.com/h", "does not resolve"),
    ("https://user:pw@hooks.example.com/h", "credentials"),
])
def test_the_policy_refuses_what_resolves_to_an_inside_address(url, why):
    with pytest.raises(WebhookRefused, match=why):
        asyncio.run(UrlPolicy(resolve=stub_resolve).check(url))


def test_the_policy_allows_public_hosts_and_listed_ones():
    policy = UrlPolicy(allow_http=True, allowed_hosts=frozenset({"localhost"}), resolve=stub_resolve)
    target = asyncio.run(policy.check("http://localhost:9000/h"))
    assert (target.host, target.port, target.address) == ("localhost", 9000, "127.0.0.1")
    assert asyncio.run(UrlPolicy(resolve=stub_resolve).check("https://hooks.example.com/h")).address == "93.184.215.14"


def _config(**fields) -> WebhooksConfig:
    return WebhooksConfig(**{"allow_http": True, "allowed_hosts": ("127.0.0.1",), "first_retry_s": 0.2,
                             "poll_interval_s": 0.05, **fields})


def _deliverer(store, **fields) -> Deliverer:
    return Deliverer(store, _config(**fields), lambda owner: SECRET,
                     lambda job, name: f"/v1/jobs/{job.id}/files/{name}?sig=x")


def test_a_delivery_whose_host_resolves_inside_later_is_not_sent(store):
    """Checked at submit, then the name's address changed: the attempt refuses it and gives up."""
    job, _ = store.create("image", {"prompt": "a fox"}, targets=[{**HOOK, "url": "https://rebinding.example.com/"}])
    _succeed(store, job)
    NAMES["rebinding.example.com"] = ["10.0.0.7"]
    try:
        deliverer = Deliverer(store, WebhooksConfig(), lambda owner: SECRET, lambda job, name: name,
                              resolve=stub_resolve)
        assert asyncio.run(_attempt_all(deliverer)) == 1
    finally:
        NAMES["rebinding.example.com"] = ["93.184.215.14"]
    [delivery] = store.deliveries(job.id)
    assert delivery["state"] == GAVE_UP and "resolves to 10.0.0.7" in delivery["last_error"]


async def _attempt_all(deliverer: Deliverer) -> int:
    started = await deliverer.start_due()
    await asyncio.gather(*deliverer._in_flight.values())
    return started


def test_a_webhook_survives_a_killed_runner_and_a_500_with_the_same_id(backend):
    """The job ends on runner A, whose attempt hangs (the receiver holds it); A is killed. Runner B
    takes the lease, attempts again (500), then again (200): three POSTs, one webhook-id, each
    verified by the standardwebhooks package with a fresh timestamp."""
    from tests.chaos import ChaosModel, Runner, Timing
    from tests.webhook_receiver import Receiver

    timing = Timing(lease_ttl_s=1.0)
    with Receiver(["hang", 500]) as receiver:
        quiet = Timing(model_failure_rate=0, poison_rate=0)
        first = Runner("a", backend.open(), ChaosModel(quiet, seed=1), timing, deliverer=_deliverer)
        wait_until(first.holds_lease, timeout_s=20, interval_s=0.02, what="runner A holding the lease")
        job, _ = first.store.create("image", {"prompt": "a fox chaos-1", "seed": 1}, owner="k_1",
                                    targets=[{**HOOK, "url": receiver.url}])
        receiver.wait_for(1)  # A's attempt is in flight, held by the receiver
        assert first.store.get(job.id).state == "succeeded"
        first.kill()
        second = Runner("b", backend.open(), ChaosModel(quiet, seed=2), timing, deliverer=_deliverer)
        try:
            received = receiver.wait_for(3)
            wait_until(lambda: second.store.deliveries(job.id)[0]["state"] == DELIVERED, timeout_s=20,
                       interval_s=0.02, what="runner B recording the delivery")
        finally:
            second.stop()
    ids = {headers["webhook-id"] for headers, _ in received}
    assert ids == {f"msg_{job.id}_0"}, "every attempt carries the same webhook-id"
    for headers, body in received:
        payload = Webhook(SECRET).verify(body, headers)
        assert payload["type"] == "job.succeeded" and payload["data"]["job_id"] == job.id
        assert payload["data"]["result"]["images"][0]["url"].startswith(f"/v1/jobs/{job.id}/files/image-0.png")
        assert "b64_json" not in json.dumps(payload), "results are links, never images inline"
    [delivery] = second.store.deliveries(job.id)
    assert delivery["attempts"] == 2 and delivery["last_status"] == 200, "A's attempt was never recorded"


def _app(store):
    """The API over `store` with a job dispatcher that is never started (jobs stay queued) and the
    webhook gate on the stub resolver, signing with SECRET: (app, its services, the dispatcher)."""
    from serve_app.api.app import build_api
    from serve_app.jobs import http as jobs_http
    from serve_app.jobs.dispatch import JobDispatcher
    from serve_app.services.health import Readiness
    from serve_app.services.local import LocalHandle
    from tests.fakes import fake_services

    services = fake_services()
    dispatcher = JobDispatcher(store, services.images, None, {"image": 1}, 1)
    services.jobs = jobs_http.JobsApi(LocalHandle(dispatcher), services.images, None, 2,
                                      webhooks=WebhookGate(UrlPolicy(resolve=stub_resolve), SECRET))
    services.readiness = Readiness(lambda: {})
    app = build_api()
    app.state.services = services
    return app, services, dispatcher


def test_submit_answers_422_naming_the_field_and_get_shows_the_delivery(tmp_path):
    from fastapi.testclient import TestClient

    from serve_app.jobs import http as jobs_http
    from serve_app.jobs.sqlite_store import SqliteJobStore
    from serve_app.services.local import LocalHandle

    store = SqliteJobStore(tmp_path)
    app, services, dispatcher = _app(store)
    client = TestClient(app, client=("127.0.0.1", 40000))
    body = {"kind": "image", "request": {"prompt": "a boat"}}
    for url, why in (("http://169.254.169.254/", "scheme"), ("https://127.0.0.1/", "loopback"),
                     ("https://inside.example.com/", "private")):
        refused = client.post("/v1/jobs", json={**body, "webhook": {"url": url}})
        assert refused.status_code == 422 and refused.json()["detail"][0]["loc"] == ["body", "webhook", "url"]
        assert why in refused.json()["detail"][0]["msg"]
    bad_event = client.post("/v1/jobs", json={**body, "webhook": {"url": "https://hooks.example.com/", "events": ["x"]}})
    assert bad_event.status_code == 422 and bad_event.json()["detail"][0]["loc"][:3] == ["body", "webhook", "events"]
    accepted = client.post("/v1/jobs", json={**body, "webhook": {"url": "https://hooks.example.com/h",
                                                                 "events": ["job.cancelled"]}})
    assert accepted.status_code == 202 and accepted.json()["webhooks"] == []
    job_id = accepted.json()["id"]
    assert client.post(f"/v1/jobs/{job_id}/cancel").status_code == 200
    [delivery] = client.get(f"/v1/jobs/{job_id}").json()["webhooks"]
    assert delivery == {"id": f"msg_{job_id}_0", "kind": "webhook", "event": "job.cancelled",
                        "url": "https://hooks.example.com/h", "state": "pending", "attempts": 0,
                        "next_attempt_at": delivery["next_attempt_at"], "last_status": None, "last_error": None,
                        "delivered_at": None}
    services.jobs = jobs_http.JobsApi(LocalHandle(dispatcher), services.images, None, 2,
                                      webhooks=WebhookGate(UrlPolicy(resolve=stub_resolve), None))
    unsigned = client.post("/v1/jobs", json={**body, "webhook": {"url": "https://hooks.example.com/h"}})
    assert unsigned.status_code == 422 and "no signing secret" in unsigned.json()["detail"][0]["msg"]


def _docs_receiver(monkeypatch):
    """The receiver of docs/agents.md, exactly as written there."""
    import re
    from pathlib import Path

    text = (Path(__file__).parents[2] / "docs" / "agents.md").read_text()
    [code] = [block for block in re.findall(r"```python\n(.*?)```", text, re.S) if "# receiver.py" in block]
    monkeypatch.setenv("GENSERVE_WEBHOOK_SECRET", SECRET)
    namespace: dict = {}
    exec(compile(code, "docs/agents.md receiver", "exec"), namespace)
    return namespace["app"]


def test_the_docs_receiver_verifies_a_delivery_and_refuses_a_forged_one(store, monkeypatch, capsys):
    """The Deliverer's own POSTs (through an ASGI transport) reach the receiver of docs/agents.md,
    which verifies them with standardwebhooks and prints the event once, whatever the retries."""
    import httpx

    app = _docs_receiver(monkeypatch)
    job, _ = store.create("image", {"prompt": "a fox"}, targets=[{**HOOK, "url": "https://hooks.example.com/hook"}])
    _succeed(store, job)
    deliverer = Deliverer(store, WebhooksConfig(), lambda owner: SECRET, lambda job, name: f"/files/{name}",
                          resolve=stub_resolve, transport=httpx.ASGITransport(app=app))
    assert asyncio.run(_attempt_all(deliverer)) == 1
    [delivery] = store.deliveries(job.id)
    assert delivery["state"] == DELIVERED and delivery["last_status"] == 200
    assert capsys.readouterr().out.startswith(f"job.succeeded {job.id} ")
    forged = Deliverer(store, WebhooksConfig(), lambda owner: new_webhook_secret(), lambda job, name: name,
                       resolve=stub_resolve, transport=httpx.ASGITransport(app=app))
    other, _ = store.create("image", {"prompt": "a fox"}, targets=[{**HOOK, "url": "https://hooks.example.com/hook"}])
    claimed = store.claim(["image"])
    store.save_result(other.id, claimed.attempts, {"images": []}, [])
    asyncio.run(_attempt_all(forged))
    assert store.deliveries(other.id)[0]["last_status"] == 400, "another secret's signature is refused"


def test_the_openai_url_path_and_the_mcp_tools_take_a_webhook_too(tmp_path):
    """Where an adapter makes a job, it takes `webhook` as POST /v1/jobs does: checked at submit
    (OpenAI's 400 naming webhook.url, MCP's tool error) and kept on the job."""
    import httpx2
    from fastapi.testclient import TestClient
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client

    from serve_app.jobs.sqlite_store import SqliteJobStore

    store = SqliteJobStore(tmp_path)
    app, _, _ = _app(store)
    client = TestClient(app, client=("127.0.0.1", 40000))
    inside = client.post("/v1/images/generations", json={"prompt": "a kite", "response_format": "url",
                                                          "webhook": {"url": "https://inside.example.com/h"}})
    assert inside.status_code == 400 and inside.json()["error"]["param"] == "webhook.url", inside.json()
    inline = client.post("/v1/images/generations", json={"prompt": "a kite", "webhook": {"url": "https://x/"}})
    assert inline.status_code == 400 and inline.json()["error"]["param"] == "webhook"

    async def mcp_calls():
        async with app.router.lifespan_context(app):
            http = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://genserve.example")
            async with Client(streamable_http_client("http://genserve.example/mcp", http_client=http)) as mcp:
                refused = await mcp.call_tool("generate_image", {"request": {"prompt": "a kite"}, "wait_s": 0,
                                                                 "webhook": {"url": "https://127.0.0.1/h"}})
                taken = await mcp.call_tool("generate_image", {"request": {"prompt": "a kite"}, "wait_s": 0,
                                                               "webhook": {"url": "https://hooks.example.com/h"}})
                return refused, taken

    refused, taken = asyncio.run(mcp_calls())
    assert refused.is_error and "webhook.url" in refused.content[0].text and "loopback" in refused.content[0].text
    assert not taken.is_error
    job = store.get(taken.structured_content["job_id"])
    assert job.targets == [{"id": "webhook", "kind": "webhook", "url": "https://hooks.example.com/h",
                            "events": ["job.succeeded", "job.failed", "job.cancelled"]}]

"""Job event streams cannot exhaust the ingress: caps in all and per client, a maximum lifetime,
and Last-Event-ID resume that never misses the final state. The real app over a real dispatcher
and store (both stores), without Ray."""

import asyncio

from fastapi.testclient import TestClient

from serve_app.api.app import build_api
from serve_app.jobs import http as jobs_http
from serve_app.services.health import Readiness
from serve_app.services.local import LocalHandle
from tests.fakes import fake_services
from tests.helpers import LOOPBACK, wait_until
from tests.unit.test_job_dispatch import ControlledGenerator, _dispatcher

BODY = {"kind": "image", "request": {"prompt": "a boat", "seed": 1}}


def _client(store, limits: jobs_http.StreamLimits, start: bool = False):
    dispatcher = _dispatcher(store, ControlledGenerator())
    # The ingress's own services, as the Ingress builds them beside the JobRunner's.
    services = fake_services()
    services.jobs = jobs_http.JobsApi(LocalHandle(dispatcher), services.images, None, 2, limits)
    services.readiness = Readiness(lambda: {})
    app = build_api()
    app.state.services = services
    return TestClient(app, client=LOOPBACK), dispatcher, app.state.services.jobs


def _restarted(client: TestClient) -> TestClient:
    """A new app over the same services: an app's lifespan (which runs the MCP session manager)
    runs once, as a server's does."""
    app = build_api()
    app.state.services = client.app.state.services
    return TestClient(app, client=LOOPBACK)


def _events(text: str) -> list[tuple[str, str]]:
    events = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line and not line.startswith(":"))
        if "event" in fields:
            events.append((fields["event"], fields["id"]))
    return events


def test_streams_past_the_caps_are_refused_with_retry_after(store):
    client, _, api = _client(store, jobs_http.StreamLimits(total=2, per_client=1, max_lifetime_s=2))
    with client:
        job_id = client.post("/v1/jobs", json=BODY).json()["id"]
        with client.stream("GET", f"/v1/jobs/{job_id}/events") as first:
            assert first.status_code == 200
            second = client.get(f"/v1/jobs/{job_id}/events")
            assert second.status_code == 429 and second.headers["Retry-After"] == "5"
            assert "event streams open" in second.json()["detail"]
            assert "maximum lifetime" in first.read().decode()  # runs until its lifetime ends
        # Once the first stream has ended on the server, its slot is free again.
        wait_until(lambda: api.streams.total == 0, timeout_s=10, what="the closed stream's slot freed")
        assert api.streams.by_client == {}
        with client.stream("GET", f"/v1/jobs/{job_id}/events") as again:
            assert again.status_code == 200


def test_a_stream_ends_at_its_lifetime_telling_the_client_to_reconnect(store):
    client, _, _ = _client(store, jobs_http.StreamLimits(max_lifetime_s=0.3))
    with client:
        job_id = client.post("/v1/jobs", json=BODY).json()["id"]
        text = client.get(f"/v1/jobs/{job_id}/events").text  # returns: the stream ended by itself
    assert "retry: 5000" in text and "maximum lifetime" in text
    assert _events(text)[0][0] == "state"


def test_a_resumed_stream_skips_the_replay_and_always_ends_with_the_final_state(store):
    client, dispatcher, _ = _client(store, jobs_http.StreamLimits(max_lifetime_s=5))

    async def run_one():
        dispatcher.start()
        from tests.helpers import wait_until_async

        await wait_until_async(lambda: store.counts()["succeeded"] == 1, 10)
        await dispatcher.stop()

    with client:
        job_id = client.post("/v1/jobs", json=BODY).json()["id"]
    asyncio.run(run_one())
    client = _restarted(client)
    with client:
        full = _events(client.get(f"/v1/jobs/{job_id}/events").text)
        assert [event for event, _ in full] == ["state", "state", "state"]  # queued, running, succeeded
        final_id = full[-1][1]
        resumed = client.get(f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": str(int(final_id) - 1)}).text
        assert _events(resumed) == [("state", final_id)] and '"state":"succeeded"' in resumed
        # Even a client that saw the final event gets it again (it may not have processed it).
        again = client.get(f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": final_id}).text
        assert _events(again) == [("state", final_id)]
        garbage = client.get(f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": "12x"})
        assert garbage.status_code == 200 and len(_events(garbage.text)) == 3  # not a version: a full replay


class _Runner:
    """Just enough of the JobRunner handle for `JobsApi.events`: the job, queued."""

    def __init__(self, job):
        async def status(job_id):
            return job, 1

        self.status = type("Method", (), {"remote": staticmethod(status)})


def _stream_request():
    from starlette.requests import Request

    return Request({"type": "http", "method": "GET", "path": "/v1/jobs/j1/events", "headers": [],
                    "client": ("10.0.0.7", 4321), "query_string": b""})


def _queued_job():
    from serve_app.jobs.model import Job, history_entry

    return Job(id="j1", kind="image", state="queued", request=None, seq=1, version=1, attempts=0, created_at=1.0,
               history=[history_entry("queued", 1.0, 0)])


def test_a_client_gone_before_the_first_chunk_frees_its_stream_slot():
    """Starlette (ASGI spec < 2.4) cancels the response as soon as it reads the disconnect, before
    the body generator has started, so the generator's `finally` never runs: the response frees it."""
    api = jobs_http.JobsApi(_Runner(_queued_job()), None, None, 2, jobs_http.StreamLimits(total=4, per_client=2))

    async def drop_early():
        response = await api.events("j1", _stream_request())
        assert api.streams.total == 1

        async def receive():
            return {"type": "http.disconnect"}

        async def send(message):
            await asyncio.sleep(3600)  # a proxy that is slow to take the first message

        await asyncio.wait_for(response({"type": "http", "method": "GET", "asgi": {"spec_version": "2.3"}}, receive, send), 5)

    for _ in range(3):  # more than per_client: a leaked slot would refuse the third with 429
        asyncio.run(drop_early())
    assert api.streams.total == 0 and api.streams.by_client == {}


def test_a_stream_cancelled_before_its_first_chunk_frees_its_slot():
    """Serve cancels the replica's request when its client leaves; if that lands as the response
    sends its headers (ASGI spec 2.4: no disconnect listener), the slot is freed all the same."""
    api = jobs_http.JobsApi(_Runner(_queued_job()), None, None, 2, jobs_http.StreamLimits(total=4, per_client=2))

    async def cancel_early():
        response = await api.events("j1", _stream_request())
        started = asyncio.Event()

        async def send(message):
            started.set()
            await asyncio.sleep(3600)

        async def receive():
            await asyncio.sleep(3600)

        task = asyncio.ensure_future(response({"type": "http", "method": "GET", "asgi": {"spec_version": "2.4"}}, receive, send))
        await started.wait()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    for _ in range(3):
        asyncio.run(cancel_early())
    assert api.streams.total == 0 and api.streams.by_client == {}


def test_a_stream_sends_each_coalesced_requeue_and_what_follows():
    """Requeues that spend no attempt rewrite the history's last entries (one `queued` entry with a
    count): an open stream still sends each new count and every state after it."""
    from dataclasses import replace

    from serve_app.jobs.model import history_entry

    queued = history_entry("queued", 1.0, 0)

    def claim(at):
        return history_entry("running", at, 1)

    def requeued(at, count):
        return {**history_entry("queued", at, 1, "not run: busy"), "requeues": count}

    histories = [
        [queued, claim(2.0)],
        [queued, claim(2.0), requeued(2.5, 1)],
        [queued, claim(2.0), requeued(2.5, 1), claim(3.0)],
        [queued, claim(2.0), requeued(3.5, 2)],
        [queued, claim(2.0), requeued(3.5, 2), claim(4.0)],
        [queued, claim(2.0), requeued(3.5, 2), claim(4.0), history_entry("cancelled", 5.0, 1, "cancelled")],
    ]
    first = _queued_job()
    versions = iter(replace(first, version=2 + index, history=history, state=history[-1]["state"])
                    for index, history in enumerate(histories))

    async def watch(job_id, version, wait):
        return next(versions)

    runner = _Runner(first)
    runner.watch = type("Method", (), {"remote": staticmethod(watch)})
    api = jobs_http.JobsApi(runner, None, None, 2)

    async def stream():
        return [chunk async for chunk in api._event_stream(first, _stream_request())]

    import json

    sent = [json.loads(event["data"]) for event in asyncio.run(stream()) if event.get("event") == "state"]
    assert [(event["state"], event.get("requeues")) for event in sent] == [
        ("queued", None), ("running", None), ("queued", 1), ("running", None), ("queued", 2), ("running", None),
        ("cancelled", None)]

"""Jobs never fail for lack of capacity: a run a model turned away (back-pressure, no replica)
goes back to the queue without spending an attempt, after a back-off with jitter. Both stores."""

import asyncio

import pytest
from ray.exceptions import RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from serve_app.jobs.dispatch import Backoff, is_capacity
from tests.helpers import LOOPBACK, wait_until_async
from tests.unit.test_job_dispatch import ControlledGenerator, _dispatcher, _state, _submit


class BusyGenerator(ControlledGenerator):
    """Turns away the first `rejections` runs as a full Serve queue would."""

    def __init__(self, rejections: int, failures: int = 0, error=None):
        super().__init__(failures=failures)
        self.rejections = rejections
        self.error = error or BackPressureError(num_queued_requests=4, max_queued_requests=4)

    async def generate(self, params, prompt):
        if self.rejections:
            self.rejections -= 1
            raise self.error
        return await super().generate(params, prompt)


def test_back_pressure_requeues_the_job_without_spending_an_attempt(store):
    async def scenario():
        # More rejections than the retry limit allows failures: only real failures count.
        generator = BusyGenerator(rejections=4)
        dispatcher = _dispatcher(store, generator, retry_limit=1)
        dispatcher.backoff = Backoff(initial_s=0.01, max_s=0.05)
        dispatcher.start()
        job_id = await _submit(dispatcher, "busy")
        await wait_until_async(lambda: _state(store, job_id) == "succeeded", 10)
        await dispatcher.stop()
        return store.get(job_id), generator

    job, generator = asyncio.run(scenario())
    assert job.state == "succeeded" and job.attempts == 1 and job.error is None
    # The four requeues are one history entry with their count and the last reason (the history
    # stays bounded however long a job waits at capacity), not four pairs of entries.
    turned_away = [entry for entry in job.history if entry["state"] == "queued" and entry.get("reason")]
    assert len(turned_away) == 1 and turned_away[0]["requeues"] == 4
    assert turned_away[0]["reason"] == ("not run: the generate stage's deployment is at capacity; "
                                        "back in the queue (the attempt is not counted)")
    assert [entry["state"] for entry in job.history] == ["queued", "running", "queued", "running", "succeeded"]


def test_a_real_failure_after_capacity_rejections_still_counts_once(store):
    async def scenario():
        generator = BusyGenerator(rejections=2, failures=1)
        dispatcher = _dispatcher(store, generator, retry_limit=1)
        dispatcher.backoff = Backoff(initial_s=0.01, max_s=0.05)
        dispatcher.start()
        job_id = await _submit(dispatcher, "busy then flaky")
        await wait_until_async(lambda: _state(store, job_id) == "succeeded", 10)
        await dispatcher.stop()
        return store.get(job_id)

    job = asyncio.run(scenario())
    assert job.attempts == 2  # the CUDA failure, then the run that worked
    assert [entry["reason"] for entry in job.history if "retrying" in entry.get("reason", "")] == [
        "RuntimeError: CUDA error: an illegal memory access was encountered; retrying (attempt 2 of 2)"]


def test_an_unavailable_deployment_also_requeues_and_a_cancel_still_wins(store):
    async def scenario():
        generator = BusyGenerator(rejections=10_000, error=DeploymentUnavailableError("FluxSchnellGenerator"))
        dispatcher = _dispatcher(store, generator, retry_limit=0)
        dispatcher.backoff = Backoff(initial_s=0.01, max_s=0.02)
        dispatcher.start()
        job_id = await _submit(dispatcher, "nowhere to run")
        await wait_until_async(lambda: generator.rejections < 9_995, 10)
        assert store.get(job_id).state in {"queued", "running"} and store.get(job_id).attempts <= 1
        await dispatcher.cancel(job_id)
        await wait_until_async(lambda: _state(store, job_id) == "cancelled", 10)
        await dispatcher.stop()
        return store.get(job_id)

    job = asyncio.run(scenario())
    assert job.state == "cancelled" and job.error is None


def test_backoff_doubles_with_jitter_up_to_its_cap_and_resets_on_success():
    now = [100.0]
    backoff = Backoff(initial_s=1.0, max_s=4.0, clock=lambda: now[0])
    waits = [backoff.reject("image") for _ in range(5)]
    for wait, delay in zip(waits, [1.0, 2.0, 4.0, 4.0, 4.0]):
        assert delay / 2 <= wait <= delay
    assert backoff.waiting("image") == pytest.approx(waits[-1]) and backoff.waiting("video") == 0
    now[0] += 5
    assert backoff.waiting("image") == 0
    backoff.succeeded("image")
    assert backoff.reject("image") <= 1.0


def test_capacity_errors_are_recognised_through_a_chained_call():
    assert is_capacity(BackPressureError(1, 1)) and is_capacity(DeploymentUnavailableError("x"))
    wrapped = RayTaskError("score", "traceback", BackPressureError(1, 1)).as_instanceof_cause()
    assert is_capacity(wrapped) and not is_capacity(RuntimeError("CUDA error"))


def test_a_full_job_queue_refuses_with_429_and_retry_after_and_big_requests_with_413(store):
    from serve_app.jobs.dispatch import JobRejected

    async def scenario():
        dispatcher = _dispatcher(store, ControlledGenerator())  # not started: jobs stay queued
        dispatcher.max_queued_jobs, dispatcher.max_request_bytes = 2, 2048
        await _submit(dispatcher, "one")
        await _submit(dispatcher, "two")
        with pytest.raises(JobRejected) as full:
            await dispatcher.submit("image", {"prompt": "three", "seed": 7})
        with pytest.raises(JobRejected) as big:
            await dispatcher.submit("image", {"prompt": "x" * 4096, "seed": 7})
        return full.value, big.value

    full, big = asyncio.run(scenario())
    assert (full.status, full.retry_after_s) == (429, 30.0) and "jobs.max_queued_jobs is 2" in full.detail
    assert big.status == 413 and "jobs.max_request_bytes" in big.detail
    assert store.counts()["queued"] == 2


def test_jobs_queued_past_their_ttl_fail_as_expired_and_younger_ones_stay(store):
    dispatcher = _dispatcher(store, ControlledGenerator())
    dispatcher.queued_ttl_s = 60
    old, _ = store.create("image", {"prompt": "old", "seed": 1}, now=1000.0)
    young, _ = store.create("image", {"prompt": "young", "seed": 2}, now=1050.0)
    assert dispatcher.expire_queued(now=1070.0) == 1
    assert store.get(old.id).state == "failed" and "expired: still queued 60s" in store.get(old.id).error
    assert store.get(young.id).state == "queued"
    assert dispatcher.expire_queued(now=1070.0) == 0  # compare-and-set: nothing twice


def test_the_http_submit_answers_429_with_retry_after_when_the_queue_is_full(store):
    from fastapi.testclient import TestClient

    from serve_app.api.app import build_api
    from serve_app.jobs import http as jobs_http
    from serve_app.services.health import Readiness
    from serve_app.services.local import LocalHandle
    from tests.fakes import fake_services

    dispatcher = _dispatcher(store, ControlledGenerator())
    dispatcher.max_queued_jobs = 1
    # The ingress's own services, as the Ingress builds them beside the JobRunner's.
    services = fake_services()
    services.jobs = jobs_http.JobsApi(LocalHandle(dispatcher), services.images, None, 2)
    services.readiness = Readiness(lambda: {})
    app = build_api()
    app.state.services = services
    client = TestClient(app, client=LOOPBACK)
    body = {"kind": "image", "request": {"prompt": "a boat"}}
    assert client.post("/v1/jobs", json=body).status_code == 202
    refused = client.post("/v1/jobs", json=body)
    assert refused.status_code == 429 and refused.headers["Retry-After"] == "30"
    assert "queue is full" in refused.json()["detail"]


def test_a_replay_at_the_end_of_a_budget_and_of_the_queue_returns_its_job_free(store, tmp_path):
    """A client retrying a submit (same Idempotency-Key) gets its job back, not a 429, when its
    daily budget is spent or the queue is full since; the replay costs nothing, and neither does
    a submit that failed before the job was recorded."""
    import yaml
    from fastapi.testclient import TestClient

    from serve_app.api.app import build_api
    from serve_app.jobs import http as jobs_http
    from serve_app.security.guard import Auth
    from serve_app.security.keys import key_entry_yaml, new_key
    from serve_app.services.health import Readiness
    from serve_app.services.local import LocalHandle
    from tests.fakes import fake_services

    key_id, key = new_key()
    entry = key_entry_yaml(key_id, "client", key, ["generate", "read"])
    entry["limits"] = {"daily_images": 3}
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text(yaml.safe_dump({"url_signing_secret": "s" * 64, "keys": [entry]}))
    dispatcher = _dispatcher(store, ControlledGenerator())  # not started: jobs stay queued
    dispatcher.max_queued_jobs = 1
    services = fake_services()
    services.jobs = jobs_http.JobsApi(LocalHandle(dispatcher), services.images, None, 2)
    services.readiness = Readiness(lambda: {})
    app = build_api()
    app.state.services = services
    app.state.auth = auth = Auth(str(keys_file), metrics=False)
    client = TestClient(app, client=("203.0.113.5", 40000), headers={"Authorization": f"Bearer {key}"},
                        raise_server_exceptions=False)
    body = {"kind": "image", "request": {"prompt": "a boat", "num_images": 2}}

    def spent() -> int:
        return auth.limiter.usage(key_id, auth.keys.authenticate(key).limits)["images_today"]

    submit = dispatcher.submit

    async def unreachable(*args, **kwargs):
        raise ConnectionError("the job store timed out")

    dispatcher.submit = unreachable
    assert client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "boat-1"}).status_code == 500
    assert spent() == 0, "a submit that failed is not charged"
    dispatcher.submit = submit
    first = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "boat-1"})
    assert first.status_code == 202 and spent() == 2
    # One image left today, and the queue (max 1) is full: a replay still gets its job.
    again = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "boat-1"})
    assert again.status_code == 202, again.text
    assert again.json()["id"] == first.json()["id"] and again.headers["Idempotent-Replayed"] == "true"
    assert spent() == 2, "a replay is not charged again"
    other = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "boat-2"})
    assert other.status_code == 429 and other.json()["limit"] == "daily_images"
    changed = client.post("/v1/jobs", json={**body, "request": {"prompt": "a ship"}}, headers={"Idempotency-Key": "boat-1"})
    assert changed.status_code == 409, "a key used for another request is still refused"
    assert store.counts()["queued"] == 1

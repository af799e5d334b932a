"""The job runner lease with fencing: two dispatchers on one store, no Ray. On Redis, two clusters
sharing one Redis during a KubeRay upgrade; on SQLite (two stores on one folder), the JobRunner
replica Serve starts while the old one drains in a rolling update. Only the lease holder claims
and records; a standby takes over when the holder stops or its lease expires; a runner that lost
its lease writes nothing."""

import asyncio
import time

import pytest

from serve_app.config import JobsConfig
from serve_app.jobs.dispatch import JobDispatcher
from serve_app.jobs.model import CANCELLED, FAILED, RUNNING, SUCCEEDED, ResultFile
from serve_app.jobs.store import LeaseLost
from tests.fakes import FakeGenerator, fake_services
from tests.helpers import wait_until, wait_until_async

LEASE_S = 3.0  # short, so that a standby's polls and a lapse take seconds


class GatedGenerator(FakeGenerator):
    def __init__(self, gated: bool = False):
        super().__init__()
        self.gate = asyncio.Event() if gated else None
        self.started = self.finished = self.cancelled = 0

    async def generate(self, params, prompt):
        self.started += 1
        try:
            if self.gate is not None:
                await self.gate.wait()
            output = await super().generate(params, prompt)
            self.finished += 1
            return output
        except asyncio.CancelledError:
            self.cancelled += 1
            raise


def _epoch(store) -> int:
    return store._epoch if hasattr(store, "_epoch") else int(store._fence.split("|")[1])


def _dispatcher(store, generator) -> JobDispatcher:
    images = fake_services(generator=generator).images
    return JobDispatcher(store, images, None, {"image": 1}, retry_limit=2, sweep_interval_s=3600,
                         poll_interval_s=0.05, lease_ttl_s=LEASE_S)


async def _submit(dispatcher, prompt: str) -> str:
    job, created, _ = await dispatcher.submit("image", {"prompt": prompt, "seed": 5})
    assert created
    return job.id


def test_one_lease_at_a_time_renewed_by_its_holder_and_never_reissued(backend):
    one, two = backend.open(), backend.open()
    assert one.acquire_lease("one", LEASE_S) and not two.acquire_lease("two", LEASE_S)
    assert one.renew_lease(LEASE_S) and not two.renew_lease(LEASE_S)
    one.release_lease()
    assert two.acquire_lease("two", LEASE_S)
    assert not one.renew_lease(LEASE_S), "released: renewing does not bring it back"
    assert _epoch(one) < _epoch(two), "a new epoch for every holder"
    with pytest.raises(LeaseLost):
        one.claim(["image"])


def test_an_expired_lease_goes_to_the_standby_and_fences_its_old_holder(backend):
    one, two = backend.open(), backend.open()
    assert one.acquire_lease("one", 0.3) and not two.acquire_lease("two", 0.3)
    job, _ = one.create("image", {"prompt": "p"})
    wait_until(lambda: two.acquire_lease("two", LEASE_S), 3, interval_s=0.05, what="the lapsed lease taken")
    assert not one.renew_lease(LEASE_S), "lapsed: renewing does not bring it back"
    with pytest.raises(LeaseLost):
        one.claim(["image"])
    assert two.claim(["image"]).id == job.id


def test_only_the_lease_holder_dispatches_and_a_standby_takes_over_when_it_stops(backend):
    store_a, store_b = backend.open(), backend.open()

    async def scenario():
        generator_a, generator_b = GatedGenerator(gated=True), GatedGenerator()
        first, standby = _dispatcher(store_a, generator_a), _dispatcher(store_b, generator_b)
        first.start()
        await wait_until_async(lambda: first.info()["lease"] == "held", 5)
        standby.start()
        # Submits through the standby (a user's request reaches any cluster): recorded, run by the holder.
        ids = [await _submit(standby, "one"), await _submit(standby, "two")]
        await wait_until_async(lambda: generator_a.started == 1, 5)
        await asyncio.sleep(2 * LEASE_S / 3)  # the standby polls the lease and gets nothing
        assert standby.info()["lease"] == "standby" and generator_b.started == 0
        assert standby.healthy() and first.healthy()
        await first.stop()  # puts its running job back (attempt not spent), then releases the lease
        await wait_until_async(lambda: all(store_b.get(job_id).state == SUCCEEDED for job_id in ids), 10)
        await standby.stop()
        return ids, generator_a, generator_b

    ids, generator_a, generator_b = asyncio.run(scenario())
    assert (generator_a.started, generator_a.cancelled, generator_b.finished) == (1, 1, 2)
    assert [store_b.get(job_id).attempts for job_id in ids] == [1, 1], "the interrupted run was not counted"


def test_a_runner_that_lost_its_lease_writes_nothing(backend, monkeypatch):
    store_a, store_b = backend.open(), backend.open()
    # Runner A stalls (a long pause, a partition): it believes it still holds the lease but renews nothing.
    monkeypatch.setattr(store_a, "renew_lease", lambda ttl_s: True)

    async def scenario():
        generator_a, generator_b = GatedGenerator(gated=True), GatedGenerator()
        stalled, successor = _dispatcher(store_a, generator_a), _dispatcher(store_b, generator_b)
        stalled.start()
        await wait_until_async(lambda: stalled.info()["lease"] == "held", 5)
        successor.start()
        job_id = await _submit(successor, "contended")
        await wait_until_async(lambda: generator_a.started == 1, 5)
        # The lease lapses; the successor takes it, requeues the job it finds running (the attempt
        # counts: it cannot tell a stalled runner from a dead one) and runs it to the end.
        await wait_until_async(lambda: store_b.get(job_id).state == SUCCEEDED, 5 * LEASE_S)
        settled = store_b.get(job_id, with_request=True)
        # Every write the stalled runner tries is refused, atomically, as fenced.
        for write in (lambda: store_a.claim(["image"]),
                      lambda: store_a.record_progress(job_id, 1, {"stage": "generate", "step": 1}),
                      lambda: store_a.transition(job_id, {SUCCEEDED}, FAILED, reason="late"),
                      lambda: store_a.save_result(job_id, settled.attempts, {"images": []},
                                                  [(ResultFile("image-0.png", "image/png", 3), b"png")]),
                      lambda: store_a.expire(now=1e12)):
            with pytest.raises(LeaseLost):
                write()
        # Its run then finishes: the result it tries to save is refused too, and it stands by.
        generator_a.gate.set()
        await wait_until_async(lambda: generator_a.finished == 1 and stalled.info()["lease"] == "standby", 5)
        assert stalled.healthy(), "a standby is healthy"
        await stalled.stop()
        await successor.stop()
        return job_id, settled

    job_id, settled = asyncio.run(scenario())
    final = store_b.get(job_id, with_request=True)
    assert final.state == SUCCEEDED and final.version == settled.version, "no second result, no state change"
    assert final.result == settled.result and final.history == settled.history
    assert final.attempts == 2 and [h["state"] for h in final.history] == [
        "queued", "running", "queued", "running", "succeeded"]
    assert "interrupted: the job runner stopped while it ran" in final.history[2]["reason"]
    # What a user asks for is not fenced: the stalled runner's store still takes submits and cancels.
    job, created = store_a.create("image", {"prompt": "after"})
    assert created and store_a.request_cancel(job.id)[0].state == "cancelled"


def test_a_standby_never_recovers_the_jobs_the_holder_is_running(backend):
    store_a, store_b = backend.open(), backend.open()

    async def scenario():
        generator_a = GatedGenerator(gated=True)
        holder, standby = _dispatcher(store_a, generator_a), _dispatcher(store_b, GatedGenerator())
        holder.start()
        await wait_until_async(lambda: holder.info()["lease"] == "held", 5)
        job_id = await _submit(holder, "running on the holder")
        await wait_until_async(lambda: generator_a.started == 1, 5)
        standby.start()  # a runner starting beside a live holder (the upgrade's new cluster)
        await asyncio.sleep(LEASE_S)  # three lease polls, three renews
        running = store_b.get(job_id)
        generator_a.gate.set()
        await wait_until_async(lambda: store_a.get(job_id).state == SUCCEEDED, 5)
        await holder.stop()
        await standby.stop()
        return running, store_a.get(job_id)

    running, done = asyncio.run(scenario())
    assert (running.state, running.attempts) == (RUNNING, 1), "left alone: it is the holder's"
    assert done.attempts == 1


@pytest.mark.parametrize("heard_from", ["a progress report", "reconciliation"])
def test_a_cancel_a_standby_serves_stops_the_holders_run(backend, heard_from):
    store_a, store_b = backend.open(), backend.open()

    async def scenario():
        generator = GatedGenerator(gated=True)
        holder = JobDispatcher(store_a, fake_services(generator=generator).images, None, {"image": 1}, retry_limit=2,
                               sweep_interval_s=3600, poll_interval_s=0.05, lease_ttl_s=LEASE_S,
                               reconcile_interval_s=0.2 if heard_from == "reconciliation" else 3600)
        standby = _dispatcher(store_b, GatedGenerator())
        holder.start()
        await wait_until_async(lambda: holder.info()["lease"] == "held", 5)
        standby.start()
        job_id = await _submit(holder, "cancelled elsewhere")
        await wait_until_async(lambda: generator.started == 1, 5)
        job, changed, _ = await standby.cancel(job_id)  # the 202: it stops at its next step
        assert changed and job.state == RUNNING and job.cancel_requested
        if heard_from == "a progress report":  # the generator's report after its next step reaches the holder
            await holder.record_progress(job_id, 1, {"stage": "generate", "round": 1, "step": 1, "steps": 4,
                                                     "elapsed_s": 0.1})
        await wait_until_async(lambda: store_a.get(job_id).state == CANCELLED, 5)
        await holder.stop()
        await standby.stop()
        return generator, store_a.get(job_id)

    generator, job = asyncio.run(scenario())
    assert (generator.cancelled, generator.finished) == (1, 0), "the holder's run stopped, not ran to the end"
    assert job.attempts == 1 and job.history[-1]["reason"].startswith("cancelled while running")


def test_one_renew_that_times_out_does_not_lose_the_lease(backend, monkeypatch):
    # Near the shortest lease the validator allows for this timeout (the 3 s / 1.2 s).
    config = JobsConfig(runner_lease_s=3.0, redis_timeout_s=1.2)
    store_a, store_b = backend.open(), backend.open()
    renew, calls = store_a.renew_lease, []

    def times_out_once(ttl_s):
        calls.append(time.monotonic())
        if len(calls) == 1:
            time.sleep(config.redis_timeout_s)  # the socket timeout, then nothing renewed
            raise TimeoutError("Timeout reading from socket")
        return renew(ttl_s)

    monkeypatch.setattr(store_a, "renew_lease", times_out_once)

    async def scenario():
        generator = GatedGenerator(gated=True)
        holder = JobDispatcher(store_a, fake_services(generator=generator).images, None, {"image": 1}, retry_limit=2,
                               sweep_interval_s=3600, poll_interval_s=0.05, lease_ttl_s=config.runner_lease_s)
        holder.start()
        await wait_until_async(lambda: holder.info()["lease"] == "held", 5)
        job_id = await _submit(holder, "runs through a slow renew")
        await wait_until_async(lambda: generator.started == 1, 5)
        # Past the expiry the timed-out renew would have left (the old code retried a third later: lost).
        await asyncio.sleep(1.5 * config.runner_lease_s)
        held, taken = holder.info()["lease"], store_b.acquire_lease("standby", config.runner_lease_s)
        generator.gate.set()
        await wait_until_async(lambda: store_a.get(job_id).state == SUCCEEDED, 5)
        await holder.stop()
        return held, taken, generator, store_a.get(job_id)

    held, taken, generator, job = asyncio.run(scenario())
    assert (generator.cancelled, job.attempts) == (0, 1), "the lease was lost: the run was halted and requeued"
    assert (held, taken) == ("held", False)
    assert calls[1] - calls[0] < config.redis_timeout_s + 0.5, "the failed renew was retried at once"


def test_the_lease_outlasts_a_slow_renew():
    with pytest.raises(ValueError, match=r"runner_lease_s \(15\) must be more than twice redis_timeout_s \(10\)"):
        JobsConfig(runner_lease_s=15)
    assert JobsConfig().runner_lease_s == 30

"""The job dispatcher over fake deployments (no Ray), against both stores.

The image service is the real one, over `LocalHandle`s of fakes whose generate calls the tests
can hold at a gate, make fail, and see cancelled.
"""

import asyncio
import io
import time

import pytest
from PIL import Image

from serve_app.jobs.dispatch import JobDispatcher
from serve_app.jobs.model import CANCELLED
from serve_app.services.media import read_png_meta
from tests.fakes import FakeGenerator, fake_services
from tests.helpers import wait_until_async
from tests.job_stores import FaultyStore

CUDA_ERROR = "CUDA error: an illegal memory access was encountered\nTraceback (most recent call last): ..."


class ControlledGenerator(FakeGenerator):
    def __init__(self, failures: int = 0, gated: bool = False):
        super().__init__()
        self.failures = failures
        self.gate = asyncio.Event() if gated else None
        self.started = self.cancelled = self.active = self.max_active = 0

    async def generate(self, params, prompt):
        self.started += 1
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            if self.gate is not None:
                await self.gate.wait()
            if self.failures:
                self.failures -= 1
                raise RuntimeError(CUDA_ERROR)
            return await super().generate(params, prompt)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.active -= 1


def _dispatcher(store, generator, slots=None, retry_limit=2) -> JobDispatcher:
    images = fake_services(generator=generator).images
    return JobDispatcher(store, images, None, slots or {"image": 1}, retry_limit, sweep_interval_s=3600,
                         poll_interval_s=0.05)


async def _submit(dispatcher, prompt, **fields):
    job, created, _ = await dispatcher.submit("image", {"prompt": prompt, "seed": 7, **fields})
    assert created
    return job.id


def _state(store, job_id):
    return store.get(job_id).state


def test_jobs_run_first_in_first_out_within_the_slots_and_save_their_files(store):
    async def scenario():
        generator = ControlledGenerator(gated=True)
        dispatcher = _dispatcher(store, generator, slots={"image": 1})
        dispatcher.start()
        ids = [await _submit(dispatcher, f"job {i}", seed=i) for i in range(3)]
        await wait_until_async(lambda: generator.started == 1, 30)
        assert [_state(store, i) for i in ids] == ["running", "queued", "queued"]
        assert [store.queue_position(store.get(i)) for i in ids] == [None, 1, 2]
        generator.gate.set()
        await wait_until_async(lambda: all(_state(store, i) == "succeeded" for i in ids), 10)
        await dispatcher.stop()
        return ids, generator

    ids, generator = asyncio.run(scenario())
    assert generator.max_active == 1, "one slot: never two jobs at the generator at once"
    assert [params.seeds for params, _ in generator.calls] == [[0], [1], [2]]
    done = store.get(ids[2])
    assert [f.name for f in done.files] == ["image-0.png"] and done.result["images"][0]["file"] == "image-0.png"
    png = store.read_file(ids[2], "image-0.png")
    assert Image.open(io.BytesIO(png)).format == "PNG" and read_png_meta(png)["seed"] == 2


def test_a_failed_run_is_retried_with_its_reason_and_no_traceback(store):
    async def scenario():
        dispatcher = _dispatcher(store, ControlledGenerator(failures=1))
        dispatcher.start()
        job_id = await _submit(dispatcher, "flaky")
        await wait_until_async(lambda: _state(store, job_id) == "succeeded", 10)
        await dispatcher.stop()
        return store.get(job_id)

    job = asyncio.run(scenario())
    assert job.attempts == 2 and job.error is None
    [retry] = [entry for entry in job.history if entry.get("reason")]
    assert retry["reason"] == ("RuntimeError: CUDA error: an illegal memory access was encountered; "
                               "retrying (attempt 2 of 3)")


def test_a_job_failing_every_run_fails_after_the_retry_limit_and_the_next_one_runs(store):
    async def scenario():
        generator = ControlledGenerator(failures=2)
        dispatcher = _dispatcher(store, generator, retry_limit=1)
        dispatcher.start()
        bad = await _submit(dispatcher, "always crashes")
        good = await _submit(dispatcher, "fine")
        await wait_until_async(lambda: _state(store, good) == "succeeded", 10)
        await dispatcher.stop()
        return store.get(bad)

    job = asyncio.run(scenario())
    assert job.state == "failed" and job.attempts == 2
    assert job.error == "RuntimeError: CUDA error: an illegal memory access was encountered; gave up after 2 attempts"


def test_cancelling_a_running_job_stops_it_and_no_other(store):
    async def scenario():
        generator = ControlledGenerator(gated=True)
        dispatcher = _dispatcher(store, generator, slots={"image": 2})
        dispatcher.start()
        first, second = await _submit(dispatcher, "first"), await _submit(dispatcher, "second")
        await wait_until_async(lambda: generator.started == 2, 30)
        job, changed, _ = await dispatcher.cancel(first)
        assert changed and job.state == "running" and job.cancel_requested
        await wait_until_async(lambda: _state(store, first) == "cancelled", 30)
        assert generator.cancelled == 1 and _state(store, second) == "running"
        generator.gate.set()
        await wait_until_async(lambda: _state(store, second) == "succeeded", 30)
        again = await dispatcher.cancel(first)
        await dispatcher.stop()
        return store.get(first), again

    cancelled, again = asyncio.run(scenario())
    assert cancelled.history[-1]["reason"].startswith("cancelled while running") and not cancelled.files
    assert again[1] is False, "cancelling a finished job changes nothing"


def test_a_cancelled_queued_job_never_starts(store):
    async def scenario():
        generator = ControlledGenerator(gated=True)
        dispatcher = _dispatcher(store, generator, slots={"image": 1})
        dispatcher.start()
        running, queued = await _submit(dispatcher, "running"), await _submit(dispatcher, "queued")
        await wait_until_async(lambda: generator.started == 1, 30)
        job, changed, _ = await dispatcher.cancel(queued)
        assert changed and job.state == "cancelled"
        generator.gate.set()
        await wait_until_async(lambda: _state(store, running) == "succeeded", 30)
        await dispatcher.stop()
        return generator, store.get(queued)

    generator, queued = asyncio.run(scenario())
    assert generator.started == 1 and queued.attempts == 0


def test_a_bad_stored_request_fails_at_once_naming_the_field(store):
    async def scenario():
        generator = ControlledGenerator()
        dispatcher = _dispatcher(store, generator)
        dispatcher.start()
        job_id = await _submit(dispatcher, "too many steps", num_inference_steps=9)
        await wait_until_async(lambda: _state(store, job_id) == "failed", 30)
        await dispatcher.stop()
        return store.get(job_id), generator

    job, generator = asyncio.run(scenario())
    assert job.attempts == 1 and generator.started == 0, "not retried: running it again cannot help"
    assert job.error.startswith("RequestError: num_inference_steps: flux-schnell takes 1-4 steps")


def test_a_stopping_runner_puts_its_running_job_back_in_the_queue_without_spending_the_attempt(backend, store):
    async def first_runner():
        generator = ControlledGenerator(gated=True)
        dispatcher = _dispatcher(store, generator)
        dispatcher.start()
        job_id = await _submit(dispatcher, "interrupted")
        queued = await _submit(dispatcher, "waiting")
        await wait_until_async(lambda: generator.started == 1, 30)
        await dispatcher.stop()
        return job_id, queued, generator

    job_id, queued, generator = asyncio.run(first_runner())
    assert generator.cancelled == 1, "the model call was cancelled, not left to run on"
    job = store.get(job_id)
    assert (job.state, job.attempts) == ("queued", 0), "back in the queue, the attempt not counted"
    assert job.history[-1]["reason"] == ("interrupted: the job runner stopped (shutdown or redeploy); back in the "
                                         "queue (the attempt is not counted)")
    assert store.queue_position(job) == 1 and store.queue_position(store.get(queued)) == 2, "it keeps its place"
    reopened = backend.crash_and_reopen()

    async def second_runner():
        dispatcher = _dispatcher(reopened, ControlledGenerator())
        assert dispatcher.recover() == [], "nothing was left running"
        dispatcher.start()
        await wait_until_async(lambda: _state(reopened, job_id) == "succeeded" == _state(reopened, queued), 10)
        await dispatcher.stop()

    asyncio.run(second_runner())
    assert reopened.get(job_id).attempts == 1


def test_a_job_cancelled_as_its_runner_stops_ends_cancelled(store):
    async def scenario():
        generator = ControlledGenerator(gated=True)
        dispatcher = _dispatcher(store, generator)
        dispatcher.start()
        job_id = await _submit(dispatcher, "cancelled meanwhile")
        await wait_until_async(lambda: generator.started == 1, 30)
        store.request_cancel(job_id)  # through another runner's API: this one never hears of it
        await dispatcher.stop()
        return store.get(job_id)

    job = asyncio.run(scenario())
    assert job.state == "cancelled" and job.history[-1]["reason"].startswith("cancelled; interrupted")


def test_a_runner_that_cannot_record_at_stop_leaves_its_job_running_for_the_next_to_requeue(backend, store,
                                                                                           monkeypatch):
    """The store was unreachable as the runner stopped (or the runner died): the next runner's
    start requeues what was left running, and that run counts as an attempt."""
    async def first_runner():
        generator = ControlledGenerator(gated=True)
        dispatcher = _dispatcher(store, generator)
        dispatcher.start()
        job_id = await _submit(dispatcher, "interrupted")
        await wait_until_async(lambda: generator.started == 1, 30)

        def unreachable(*args, **kwargs):
            raise ConnectionError("the store went away")

        monkeypatch.setattr(store, "requeue_unspent", unreachable)
        await dispatcher.stop()
        return job_id

    job_id = asyncio.run(first_runner())
    assert _state(store, job_id) == "running"
    reopened = backend.crash_and_reopen()

    async def second_runner():
        dispatcher = _dispatcher(reopened, ControlledGenerator())
        [recovered] = dispatcher.recover()
        assert recovered.state == "queued"
        dispatcher.start()
        await wait_until_async(lambda: _state(reopened, job_id) == "succeeded", 10)
        await dispatcher.stop()

    asyncio.run(second_runner())
    job = reopened.get(job_id)
    assert job.attempts == 2 and "interrupted: the job runner stopped while it ran" in job.history[2]["reason"]


def test_watch_wakes_on_a_change_and_progress_has_an_eta(store):
    async def scenario():
        generator = ControlledGenerator(gated=True)
        dispatcher = _dispatcher(store, generator)
        job, _, _ = await dispatcher.submit("image", {"prompt": "watched", "seed": 1})
        quiet = await dispatcher.watch(job.id, job.version, timeout_s=0.05)
        assert quiet.version == job.version, "nothing changed: the same version after the timeout"
        watching = asyncio.ensure_future(dispatcher.watch(job.id, job.version, timeout_s=30))
        dispatcher.start()
        started = await asyncio.wait_for(watching, 10)
        assert started.state == "running" and started.version > job.version
        step = {"stage": "generate", "round": 1, "steps": 4}
        await dispatcher.record_progress(job.id, 1, {**step, "step": 2, "elapsed_s": 1.0})
        await dispatcher.record_progress(job.id, 1, {**step, "step": 1, "elapsed_s": 0.5})
        await dispatcher.record_progress(job.id, 7, {**step, "step": 3, "elapsed_s": 1.5})
        progress = store.get(job.id).progress
        generator.gate.set()
        await wait_until_async(lambda: _state(store, job.id) == "succeeded", 30)
        await dispatcher.stop()
        return progress

    progress = asyncio.run(scenario())
    assert (progress["stage"], progress["step"], progress["steps"]) == ("generate", 2, 4), "late or stale reports dropped"
    assert progress["eta_s"] == 1.0, "2 steps in 1 s: 2 more take 1 s"


# One store error must not strand a job in `running` (a Redis timeout or failover, SQLite's
# "database is locked"): the outcome is retried, and reconciliation ends what no run holds.


class FailingOnceGenerator(ControlledGenerator):
    """Fails its first run; just before it raises, `arm()` (a store fault) is called."""

    def __init__(self, arm):
        super().__init__()
        self.arm, self.failures = arm, 1

    async def generate(self, params, prompt):
        if self.failures:
            self.arm()
        return await super().generate(params, prompt)


def _faulty_dispatcher(store, generator, **options) -> JobDispatcher:
    images = fake_services(generator=generator).images
    return JobDispatcher(store, images, None, {"image": 1}, 2, sweep_interval_s=3600, poll_interval_s=0.05,
                         **options)


@pytest.mark.parametrize("call", ["get", "retry_or_fail"])
def test_a_failure_is_recorded_when_the_store_fails_once_as_it_records_it(store, call):
    faulty = FaultyStore(store)

    async def scenario():
        generator = FailingOnceGenerator(lambda: faulty.fail_once(call))
        dispatcher = _faulty_dispatcher(faulty, generator, reconcile_interval_s=3600)
        dispatcher.start()
        job_id = await _submit(dispatcher, "fails once")
        await wait_until_async(lambda: _state(store, job_id) == "succeeded", 10)
        await dispatcher.stop()
        return job_id

    job = store.get(asyncio.run(scenario()))
    assert faulty.failed == [call]
    assert job.attempts == 2 and [h["state"] for h in job.history] == [
        "queued", "running", "queued", "running", "succeeded"]


@pytest.mark.parametrize("after", [False, True], ids=["refused", "answer-lost"])
def test_a_cancel_is_recorded_when_the_store_fails_once_as_it_records_it(store, after):
    faulty = FaultyStore(store)

    async def scenario():
        generator = ControlledGenerator(gated=True)
        dispatcher = _faulty_dispatcher(faulty, generator, reconcile_interval_s=3600)
        dispatcher.start()
        job_id = await _submit(dispatcher, "cancelled")
        await wait_until_async(lambda: generator.started == 1, 30)
        faulty.fail_once("transition", after=after, when=lambda job_id, expect, to, **kw: to == CANCELLED)
        await dispatcher.cancel(job_id)
        await wait_until_async(lambda: _state(store, job_id) == "cancelled", 10)
        await wait_until_async(lambda: dispatcher.info()["running"] == {"image": 0}, 30)  # its slot is free
        await dispatcher.stop()
        return job_id

    job_id = asyncio.run(scenario())
    assert faulty.failed == ["transition"]
    assert [h["state"] for h in store.get(job_id).history] == ["queued", "running", "cancelled"]


def test_a_result_the_store_failed_once_to_save_is_saved_without_spending_an_attempt(store):
    faulty = FaultyStore(store)
    faulty.fail_once("save_result")

    async def scenario():
        dispatcher = _faulty_dispatcher(faulty, ControlledGenerator(), reconcile_interval_s=3600)
        dispatcher.start()
        job_id = await _submit(dispatcher, "saved on the second try")
        await wait_until_async(lambda: _state(store, job_id) == "succeeded", 10)
        await dispatcher.stop()
        return job_id

    job = store.get(asyncio.run(scenario()))
    assert faulty.failed == ["save_result"] and job.attempts == 1, "a store error is not the job's failure"


def test_a_claim_whose_answer_was_lost_is_put_back_without_spending_its_attempt(store):
    faulty = FaultyStore(store)
    faulty.fail_once("claim", after=True)  # claimed in the store; the runner never heard

    async def scenario():
        generator = ControlledGenerator()
        dispatcher = _faulty_dispatcher(faulty, generator, reconcile_interval_s=0.2)
        # Submitted before the loop starts, so the failing claim is the one that takes this job
        # (a loop started first may spend the fault on a claim of an empty queue).
        job_id = await _submit(dispatcher, "claimed twice")
        dispatcher.start()
        await wait_until_async(lambda: _state(store, job_id) == "succeeded", 10)
        await dispatcher.stop()
        return job_id, generator

    job_id, generator = asyncio.run(scenario())
    job = store.get(job_id)
    assert faulty.failed == ["claim"] and generator.started == 1
    assert job.attempts == 1 and [h["state"] for h in job.history] == [
        "queued", "running", "queued", "running", "succeeded"]
    assert job.history[2]["reason"].startswith("interrupted: no run of the job runner held it")


def test_a_stopping_runner_puts_back_a_job_whose_claim_answer_was_lost(store):
    faulty = FaultyStore(store)

    async def scenario():
        dispatcher = _faulty_dispatcher(faulty, ControlledGenerator(), reconcile_interval_s=3600)
        dispatcher.start()
        await wait_until_async(lambda: dispatcher.info()["lease"] == "held", 30)
        # The claim that takes the job: the loop polls meanwhile, and an empty claim must not spend the fault.
        faulty.fail_once("claim", after=True, when=lambda *args, **kwargs: store.counts()["queued"] > 0)
        job_id = await _submit(dispatcher, "stranded")
        await wait_until_async(lambda: faulty.failed == ["claim"], 30)
        await dispatcher.stop()
        return job_id

    job = store.get(asyncio.run(scenario()))
    assert (job.state, job.attempts) == ("queued", 0), "not left running for the next runner to spend an attempt"


def test_a_queued_job_expired_by_the_sweep_wakes_its_watcher_from_the_sweep_thread(store):
    # asyncio in debug mode refuses an event set from another thread, as it must be: the sweep
    # runs in a worker thread, so it hands the wake-up to the loop.
    async def scenario():
        images = fake_services(generator=ControlledGenerator()).images
        dispatcher = JobDispatcher(store, images, None, {"image": 0}, 2, sweep_interval_s=3600, poll_interval_s=0.05,
                                   queued_ttl_s=60)
        dispatcher.start()
        job, _, _ = await dispatcher.submit("image", {"prompt": "never claimed", "seed": 1})
        watching = asyncio.ensure_future(dispatcher.watch(job.id, job.version, timeout_s=30))
        await asyncio.sleep(0.05)  # the watcher waits on its event
        expired = await asyncio.to_thread(dispatcher.expire_queued, job.created_at + 61)
        woken = await asyncio.wait_for(watching, 5)
        await dispatcher.stop()
        return expired, woken

    expired, woken = asyncio.run(scenario(), debug=True)
    assert expired == 1 and woken.state == "failed"


def test_a_halt_right_after_a_claim_frees_the_slot_of_a_run_that_never_started(store):
    async def scenario():
        dispatcher = _dispatcher(store, ControlledGenerator())
        dispatcher._wakeup, dispatcher._lost = asyncio.Event(), asyncio.Event()
        job, _ = store.create("image", {"prompt": "claimed as the lease goes", "seed": 1})
        dispatcher._begin(store.claim(["image"]))
        await dispatcher._halt()  # cancels the run's task before its first step
        return dispatcher.info()["running"], dict(dispatcher._active)

    running, active = asyncio.run(scenario())
    assert running == {"image": 0} and active == {}, "the slot stays free for the next holder's turn"


def test_a_failure_the_store_would_not_take_for_a_while_is_recorded_by_reconciliation(store, monkeypatch):
    """The store refuses the failure's record for longer than the retries last (a lease TTL):
    the run ends, its slot is freed, and reconciliation records the failure once the store
    answers again: the attempt counts (the model did fail), and nothing is left running."""
    retry_or_fail, refused = store.retry_or_fail, []

    def refusing_for_a_while(*args, **kwargs):
        if len(refused) < 1 or time.monotonic() - refused[0] < 1.5:
            refused.append(time.monotonic())
            raise ConnectionError("the store is failing over")
        return retry_or_fail(*args, **kwargs)

    monkeypatch.setattr(store, "retry_or_fail", refusing_for_a_while)

    async def scenario():
        generator = ControlledGenerator(failures=1)
        dispatcher = JobDispatcher(store, fake_services(generator=generator).images, None, {"image": 1}, 2,
                                   sweep_interval_s=3600, poll_interval_s=0.05, lease_ttl_s=0.6,
                                   reconcile_interval_s=0.3)
        dispatcher.start()
        job_id = await _submit(dispatcher, "fails while the store does")
        await wait_until_async(lambda: _state(store, job_id) == "succeeded", 10)
        await dispatcher.stop()
        return job_id

    job = store.get(asyncio.run(scenario()))
    assert len(refused) > 1 and job.attempts == 2
    assert job.history[2]["state"] == "queued" and job.history[2]["reason"].startswith("RuntimeError: CUDA error")


def test_a_runner_that_lost_its_lease_and_took_it_back_does_not_spend_the_attempt_of_the_run_it_halted(store):
    """The store stalled past the lease (a Redis pause, a failover): the runner halts its run,
    unrecorded, and takes the lease back once the store answers. That run was its own, stopped
    by the halt, not by a failure of the job: it goes back to the queue without spending the
    attempt (found by tests/chaos.py: a runner's recover() counted its own halted runs)."""
    async def scenario():
        generator = ControlledGenerator(gated=True)
        dispatcher = _faulty_dispatcher(store, generator, lease_ttl_s=0.6)
        dispatcher.start()
        job_id = await _submit(dispatcher, "halted with the lease")
        await wait_until_async(lambda: generator.started == 1, 30)
        store.renew_lease = lambda ttl_s: False  # the lease lapsed while the store stalled
        await wait_until_async(lambda: generator.cancelled == 1, 30)  # halted
        del store.renew_lease
        generator.gate.set()
        await wait_until_async(lambda: _state(store, job_id) == "succeeded", 10)
        await dispatcher.stop()
        return job_id, generator

    job_id, generator = asyncio.run(scenario())
    job = store.get(job_id)
    assert generator.started == 2 and job.attempts == 1, [h.get("reason") for h in job.history]
    assert job.history[2]["reason"].startswith("interrupted: this job runner lost its lease while it ran")


def test_a_job_claimed_as_its_runner_lost_the_lease_is_not_counted_when_it_takes_the_lease_back(store, monkeypatch):
    """The claim was on its way when the lease was lost (the dispatch loop halted while the store
    call went on in its thread): the job it took is that runner's own halted run, not a job some
    runner died with (found by tests/chaos.py's reasoning; recover() counted it)."""
    import threading

    claim, release, held = store.claim, threading.Event(), []

    def slow_claim(kinds, now=None, policy=None):
        if not held and store.counts()["queued"]:
            held.append(True)
            release.wait(10)  # the lease is lost meanwhile
        return claim(kinds, now, policy)

    monkeypatch.setattr(store, "claim", slow_claim)

    async def scenario():
        generator = ControlledGenerator()
        dispatcher = _faulty_dispatcher(store, generator, lease_ttl_s=0.6)
        job_id = await _submit(dispatcher, "claimed as the lease goes")
        dispatcher.start()
        await wait_until_async(lambda: held, 30)
        monkeypatch.setattr(store, "renew_lease", lambda ttl_s: False)
        await wait_until_async(lambda: dispatcher.info()["lease"] == "standby", 30)
        monkeypatch.undo()  # renew and claim as the store does them
        release.set()  # the claim lands: the job is running, at attempt 1, with no run here
        await wait_until_async(lambda: _state(store, job_id) == "succeeded", 10)
        await dispatcher.stop()
        return job_id

    job = store.get(asyncio.run(scenario()))
    assert job.attempts == 1, [h.get("reason") for h in job.history]
    assert "interrupted: this job runner lost its lease while it ran" in job.history[2]["reason"]


def test_a_stopping_runner_puts_back_a_job_whose_claim_answer_was_lost_even_when_the_store_fails_once_more(store):
    """The store fails as the stopping runner looks for the jobs no run of its own holds: it looks
    again (within STOP_RECORD_RETRY_S) rather than leaving the job running for the next runner,
    which would count the attempt (found by tests/chaos.py: store errors during redeploys)."""
    faulty = FaultyStore(store)

    async def scenario():
        dispatcher = _faulty_dispatcher(faulty, ControlledGenerator(), reconcile_interval_s=3600)
        dispatcher.start()
        await wait_until_async(lambda: dispatcher.info()["lease"] == "held", 30)
        # The claim that takes the job: the loop polls meanwhile, and an empty claim must not spend the fault.
        faulty.fail_once("claim", after=True, when=lambda *args, **kwargs: store.counts()["queued"] > 0)
        job_id = await _submit(dispatcher, "stranded")
        await wait_until_async(lambda: faulty.failed == ["claim"], 30)
        faulty.fail_once("list", when=lambda state=None, *args, **kwargs: state == "running")
        await dispatcher.stop()
        return job_id

    job = store.get(asyncio.run(scenario()))
    assert faulty.failed == ["claim", "list"]
    assert (job.state, job.attempts) == ("queued", 0), "not left running for the next runner to spend an attempt"


class SlowToCancelGenerator(ControlledGenerator):
    """A model call whose cancel lands a moment later (a replica stops at the end of its step)."""

    async def generate(self, params, prompt):
        try:
            return await super().generate(params, prompt)
        except asyncio.CancelledError:
            self.active += 1
            try:
                await asyncio.shield(asyncio.sleep(0.3))  # the step in progress ends
            finally:
                self.active -= 1
            raise


def test_a_stopping_runner_ends_only_once_its_model_calls_have_ended(store):
    """Otherwise the replica is gone with the model still running the job, which the next runner
    runs again: two runs of one job at once (found by tests/chaos.py: a redeploy's old runner)."""
    async def scenario():
        generator = SlowToCancelGenerator(gated=True)
        dispatcher = _dispatcher(store, generator)
        dispatcher.start()
        job_id = await _submit(dispatcher, "stopped mid-step")
        await wait_until_async(lambda: generator.started == 1, 30)
        await dispatcher.stop()
        return job_id, generator.active

    job_id, active = asyncio.run(scenario())
    assert active == 0, "a model call outlived the runner that made it"
    assert (_state(store, job_id), store.get(job_id).attempts) == ("queued", 0)

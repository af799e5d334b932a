"""Stopping a pipeline run at a step end when its request is cancelled, and only that run."""

import asyncio
import threading

import pytest

from deployments.runtime.progress import Interrupted, StepMonitor, run_interruptibly


class FakePipeline:
    """Calls the step callback like diffusers does. Pauses after `pause_after` steps until
    `resume` is set, so a test can cancel while a step is in flight; never sleeps."""

    def __init__(self, steps: int, pause_after: int | None = None):
        self.steps = steps
        self.pause_after = pause_after
        self.paused = threading.Event()
        self.resume = threading.Event()
        self.finished = threading.Event()

    def __call__(self, monitor: StepMonitor) -> str:
        try:
            for step in range(self.steps):
                if step == self.pause_after:
                    self.paused.set()
                    assert self.resume.wait(10), "the test never resumed the pipeline"
                monitor(self, step, 1000 - step, {})
            return "done"
        finally:
            self.finished.set()


async def _wait_for(event: threading.Event) -> None:
    assert await asyncio.to_thread(event.wait, 10)


def test_a_cancelled_run_stops_at_the_next_step_end_and_holds_the_lock_until_then():
    async def scenario():
        lock = asyncio.Lock()
        pipeline = FakePipeline(steps=50, pause_after=3)
        order = []

        async def call(pipe, monitor):
            async with lock:
                try:
                    return await run_interruptibly(lambda: pipe(monitor), monitor)
                finally:
                    order.append(("released", pipe.finished.is_set(), monitor.steps_done))

        monitor = StepMonitor(None, pipeline.steps)
        first = asyncio.ensure_future(call(pipeline, monitor))
        await _wait_for(pipeline.paused)
        second_pipeline = FakePipeline(steps=4)
        second = asyncio.ensure_future(call(second_pipeline, StepMonitor(None, 4)))
        first.cancel()
        await _wait_for(monitor.stop)  # the cancellation reached the run while its step is in flight
        assert not first.done(), "the coroutine waits for its thread before it gives up the lock"
        pipeline.resume.set()
        with pytest.raises(asyncio.CancelledError):
            await first
        assert await second == "done"
        return order

    order = asyncio.run(scenario())
    assert order[0] == ("released", True, 4), "stopped at the end of the step in flight, then released"
    assert order[1] == ("released", True, 4), "the next request ran every one of its steps"


def test_cancelling_one_run_never_stops_another():
    async def scenario():
        runs = [FakePipeline(steps=20, pause_after=2) for _ in range(2)]
        monitors = [StepMonitor(None, 20) for _ in runs]
        tasks = [asyncio.ensure_future(run_interruptibly(lambda p=p, m=m: p(m), m)) for p, m in zip(runs, monitors)]
        for run in runs:
            await _wait_for(run.paused)
        tasks[0].cancel()
        await _wait_for(monitors[0].stop)
        for run in runs:
            run.resume.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        return results, [m.steps_done for m in monitors]

    results, steps = asyncio.run(scenario())
    assert isinstance(results[0], asyncio.CancelledError) and results[1] == "done"
    assert steps == [3, 20]


def test_the_callback_raises_only_once_stopped():
    async def scenario():
        monitor = StepMonitor(None, 4)
        assert monitor(None, 0, 999, {"latents": 1}) == {"latents": 1}
        monitor.stop.set()
        with pytest.raises(Interrupted, match="stopped after step 2 of 4"):
            monitor(None, 1, 998, {"latents": 1})

    asyncio.run(scenario())


class _RecordingHandle:
    def __init__(self):
        self.reports = []
        self.record_progress = self

    def remote(self, job_id, attempt, progress):
        self.reports.append((job_id, attempt, progress))


@pytest.mark.parametrize("interval, expected_steps", [(0.0, [1, 2, 3, 4]), (3600.0, [])])
def test_steps_are_reported_to_the_target_at_most_once_per_interval(monkeypatch, interval, expected_steps):
    from deployments.runtime import progress
    from deployments.runtime.types import ProgressTarget

    handle = _RecordingHandle()
    monkeypatch.setitem(progress._handles, ("app", "JobRunner"), handle)
    target = ProgressTarget("app", "JobRunner", "job-1", attempt=2, stage="video", min_interval_s=interval)

    async def scenario():
        monitor = StepMonitor(target, total_steps=4)
        # The reports reach this loop before the thread's completion does (both are queued FIFO).
        await run_interruptibly(lambda: FakePipeline(steps=4)(monitor), monitor)

    asyncio.run(scenario())
    assert [report["step"] for _, _, report in handle.reports] == expected_steps
    assert all(job == "job-1" and attempt == 2 and report["stage"] == "video" and report["steps"] == 4
               and report["elapsed_s"] >= 0 for job, attempt, report in handle.reports)

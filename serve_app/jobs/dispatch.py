"""The job dispatcher: claims queued jobs and runs them through the image and video services.

Plain async code over a `JobStore` and the same `ImageService`/`VideoService` the sync endpoints
use (with Serve handles inside a replica, `LocalHandle`s in unit tests). The `JobRunner`
deployment wraps it.

- Dispatch: one loop claims the oldest queued job of each kind that has a free slot
  (`slots[kind]` jobs of a kind run at once) and runs it as a task. A submit or a finished job
  wakes the loop; otherwise it looks again every `poll_interval_s`.
- Outcome of a run: the result is saved with the transition to succeeded (compare-and-set on the
  attempt). A failure (a replica died, a stage timed out, a model raised) goes back to the queue
  with its reason while retries are left, then fails; a bad request fails at once.
- Cancel: a queued job is cancelled in the store and never starts. A running job's task is
  cancelled; the cancellation travels down the Serve handles to the model replica, which stops
  at the end of its current denoising step. Only that job's task is touched.
- Start-up: jobs a previous runner left running are requeued (or failed past the retry limit).
  Stopping (the replica shuts down) cancels the tasks without touching the store, so those jobs
  stay running there and the next runner requeues them.
- Watchers (the SSE stream) wait on an in-memory event per job, set on every change this
  dispatcher makes, so events go out as they happen without polling the store.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import suppress
from typing import Callable

from pydantic import ValidationError

from deployments.runtime.types import ProgressTarget
from serve_app.jobs.model import CANCELLED, FAILED, RUNNING, Job
from serve_app.jobs.results import image_result, video_result
from serve_app.jobs.store import JobStore
from serve_app.services.validation import RequestError
from serve_app.api.schemas import ImageRequest, VideoRequest
from serve_app.services.images import ImageService
from serve_app.services.videos import VideoService

logger = logging.getLogger("ray.serve")

RESTART_REASON = "interrupted: the job runner stopped while it ran"


def describe_failure(error: BaseException) -> str:
    """One line for the job's error: what went wrong, never a traceback."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError

    if isinstance(error, (ActorDiedError, ActorUnavailableError, RayActorError)):
        return f"a model replica died while running the job ({type(error).__name__})"
    if isinstance(error, RayTaskError) and isinstance(error.cause, BaseException):
        error = error.cause
    lines = str(error).strip().splitlines()
    message = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
    return message[:500]


class _Watchers:
    """One asyncio.Event per watched job, set (and replaced) whenever the job changes."""

    def __init__(self):
        self._events: dict[str, asyncio.Event] = {}
        self._waiting: dict[str, int] = {}

    def changed(self, job_id: str) -> None:
        event = self._events.pop(job_id, None)
        if event is not None:
            event.set()

    def event(self, job_id: str) -> asyncio.Event:
        self._waiting[job_id] = self._waiting.get(job_id, 0) + 1
        return self._events.setdefault(job_id, asyncio.Event())

    def done(self, job_id: str) -> None:
        self._waiting[job_id] -= 1
        if not self._waiting[job_id]:
            del self._waiting[job_id]
            self._events.pop(job_id, None)


class JobDispatcher:
    def __init__(self, store: JobStore, images: ImageService, videos: VideoService | None, slots: dict[str, int],
                 retry_limit: int, sweep_interval_s: float = 60.0,
                 progress_target: Callable[[Job], ProgressTarget | None] = lambda job: None,
                 poll_interval_s: float = 1.0):
        self.store = store
        self.images = images
        self.videos = videos
        self.slots = dict(slots)
        self.retry_limit = retry_limit
        self.sweep_interval_s = sweep_interval_s
        self.poll_interval_s = poll_interval_s
        self._progress_target = progress_target
        self._running = {kind: 0 for kind in self.slots}
        self._active: dict[str, Job] = {}  # running here, by id: the attempt this dispatcher runs
        self._tasks: dict[str, asyncio.Task] = {}
        self._cancels: dict[str, asyncio.Event] = {}  # set when the job's user cancels it
        self._progress: dict[str, dict] = {}
        self._cancel_on_start: set[str] = set()  # cancelled while its claim was in flight
        self._watchers = _Watchers()
        self._wakeup: asyncio.Event | None = None
        self._loops: list[asyncio.Task] = []
        self._stopping = False

    # Lifecycle

    def recover(self) -> list[Job]:
        """Requeue (or fail) the jobs a previous runner left running. Call before `start`."""
        recovered = self.store.requeue_running(self.retry_limit, RESTART_REASON)
        if recovered:
            logger.info("requeued %d job(s) left running: %s", len(recovered),
                        ", ".join(f"{job.id} -> {job.state}" for job in recovered))
        return recovered

    def start(self) -> None:
        """Start dispatching and sweeping on the running event loop."""
        self._wakeup = asyncio.Event()
        self._loops = [asyncio.create_task(self._dispatch_forever()), asyncio.create_task(self._sweep_forever())]

    def info(self) -> dict:
        return {"store": type(self.store).__name__, "slots": self.slots, "running": dict(self._running),
                "retry_limit": self.retry_limit, "ttl_s": self.store.ttl_s}

    def healthy(self) -> bool:
        return bool(self._loops) and not any(loop.done() for loop in self._loops)

    async def stop(self) -> None:
        """Stop without recording anything: running jobs stay `running` for the next runner."""
        self._stopping = True
        tasks = [*self._loops, *self._tasks.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # What the JobRunner serves

    async def submit(self, kind: str, request: dict, idempotency_key: str | None = None,
                     request_hash: str | None = None) -> tuple[Job, bool, int | None]:
        """Record a job durably. Returns it, whether it is new (False: the idempotency key's job),
        and its queue position."""
        job, created = await asyncio.to_thread(
            self.store.create, kind, request, idempotency_key=idempotency_key, request_hash=request_hash
        )
        if created and self._wakeup is not None:
            self._wakeup.set()
        return job, created, await asyncio.to_thread(self.store.queue_position, job)

    async def status(self, job_id: str) -> tuple[Job, int | None] | None:
        job = await asyncio.to_thread(self.store.get, job_id)
        if job is None:
            return None
        return job, await asyncio.to_thread(self.store.queue_position, job)

    async def list(self, state: str | None, limit: int, before: int | None) -> list[tuple[Job, int | None]]:
        jobs = await asyncio.to_thread(self.store.list, state, limit, before)
        positions = await asyncio.to_thread(lambda: [self.store.queue_position(job) for job in jobs])
        return list(zip(jobs, positions))

    async def cancel(self, job_id: str) -> tuple[Job, bool, int | None] | None:
        """Cancel a job. Returns it, whether this changed it (False: already finished) and its
        queue position; None if unknown."""
        found = await asyncio.to_thread(self.store.request_cancel, job_id)
        if found is None:
            return None
        job, changed = found
        if changed and job.state == RUNNING:
            if job_id in self._cancels:
                self._cancels[job_id].set()
            else:
                self._cancel_on_start.add(job_id)
        self._watchers.changed(job_id)
        return job, changed, None

    async def watch(self, job_id: str, after_version: int, timeout_s: float) -> Job | None:
        """The job once its version passes `after_version` (or it finished), else after `timeout_s`."""
        event = self._watchers.event(job_id)  # before reading, so no change slips in between
        try:
            job = await asyncio.to_thread(self.store.get, job_id)
            if job is None or job.version > after_version or job.finished:
                return job
            with suppress(asyncio.TimeoutError):
                await asyncio.wait_for(event.wait(), timeout_s)
            return await asyncio.to_thread(self.store.get, job_id)
        finally:
            self._watchers.done(job_id)

    async def read_file(self, job_id: str, name: str) -> tuple[bytes, str] | None:
        job = await asyncio.to_thread(self.store.get, job_id)
        meta = None if job is None else job.file(name)
        if meta is None:
            return None
        data = await asyncio.to_thread(self.store.read_file, job_id, name)
        return None if data is None else (data, meta.content_type)

    async def record_progress(self, job_id: str, attempt: int, progress: dict) -> None:
        """A generator's step report (see deployments.runtime.progress); stale or unknown ones are dropped."""
        job = self._active.get(job_id)
        if job is None or job.attempts != attempt:
            return
        previous = self._progress.get(job_id)
        if (previous is not None and (previous["stage"], previous["round"]) == (progress["stage"], progress["round"])
                and progress["step"] <= previous["step"]):
            return  # reports are not awaited, so one can overtake another
        step, steps = progress["step"], progress["steps"]
        eta = progress["elapsed_s"] / step * (steps - step) if step > 0 else None
        record = {"stage": progress["stage"], "round": progress["round"], "step": step, "steps": steps,
                  "eta_s": None if eta is None else round(eta, 2), "updated_at": time.time()}
        self._progress[job_id] = record
        if await asyncio.to_thread(self.store.record_progress, job_id, attempt, record):
            self._watchers.changed(job_id)

    # Dispatch

    async def _dispatch_forever(self) -> None:
        while True:
            self._wakeup.clear()  # before claiming: a submit from now on wakes the wait below
            free = [kind for kind, limit in self.slots.items() if self._running[kind] < limit]
            try:
                job = await asyncio.to_thread(self.store.claim, free) if free else None
            except Exception:
                logger.exception("could not claim a job; trying again")
                job = None
            if job is None:
                with suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), self.poll_interval_s)
                continue
            self._running[job.kind] += 1
            self._active[job.id] = job
            self._cancels[job.id] = cancel = asyncio.Event()
            if job.id in self._cancel_on_start:
                self._cancel_on_start.discard(job.id)
                cancel.set()
            self._tasks[job.id] = asyncio.create_task(self._run(job, cancel))
            self._watchers.changed(job.id)

    async def _run(self, job: Job, cancel: asyncio.Event) -> None:
        """Run one attempt until it ends or its user cancels it. The cancel is an event rather than
        a cancellation of this task, so it is safe at any moment, even before the task starts."""
        execute = asyncio.ensure_future(self._execute(job))
        cancelled = asyncio.ensure_future(cancel.wait())
        try:
            await asyncio.wait({execute, cancelled}, return_when=asyncio.FIRST_COMPLETED)
            if not execute.done():
                execute.cancel()  # travels down the handles: the model stops at its next step end
                await asyncio.wait({execute})
                if execute.cancelled():
                    await asyncio.to_thread(self.store.transition, job.id, {RUNNING}, CANCELLED,
                                            attempt=job.attempts, reason=f"cancelled while running{self._where(job.id)}")
                    return
            execute.result()  # re-raises the run's failure, if any
        except asyncio.CancelledError:
            if self._stopping:  # the job stays running in the store, for the next runner to requeue
                execute.cancel()
                raise
            await self._attempt_failed(job, RuntimeError("the run was cancelled, but not by its user"))
        except Exception as error:
            await self._attempt_failed(job, error)
        finally:
            cancelled.cancel()
            self._running[job.kind] -= 1
            for registry in (self._active, self._tasks, self._cancels, self._progress):
                registry.pop(job.id, None)
            if not self._stopping:
                self._wakeup.set()
            self._watchers.changed(job.id)

    async def _execute(self, job: Job) -> None:
        target = self._progress_target(job)
        if job.kind == "image":
            response = await self.images.generate_images(ImageRequest.model_validate(job.request), target)
            result, files = image_result(job.id, response)
        elif self.videos is not None:
            response, output = await self.videos.run(VideoRequest.model_validate(job.request), target)
            result, files = video_result(job.id, response, output)
        else:
            raise RequestError("kind", "video generation is not deployed: add a video_models entry to the config", "image")
        saved = await asyncio.to_thread(self.store.save_result, job.id, job.attempts, result, files)
        if saved is None:  # a cancel was asked for as it finished: the cancel wins, the result is dropped
            await asyncio.to_thread(self.store.transition, job.id, {RUNNING}, CANCELLED, attempt=job.attempts,
                                    reason="cancelled as it finished")

    async def _attempt_failed(self, job: Job, error: Exception) -> None:
        reason = describe_failure(error)
        logger.warning("job %s attempt %d failed: %s", job.id, job.attempts, reason)
        if isinstance(error, (RequestError, ValidationError)):  # running it again cannot help
            await asyncio.to_thread(self.store.transition, job.id, {RUNNING}, FAILED, attempt=job.attempts,
                                    reason=reason, error=reason)
            return
        current = await asyncio.to_thread(self.store.get, job.id)
        if current is not None and current.state == RUNNING and current.attempts == job.attempts:
            await asyncio.to_thread(self.store.retry_or_fail, current, reason, self.retry_limit)

    def _where(self, job_id: str) -> str:
        progress = self._progress.get(job_id)
        if progress is None:
            return ""
        return f" (at {progress['stage']} step {progress['step']} of {progress['steps']})"

    async def _sweep_forever(self) -> None:
        while True:
            try:
                expired = await asyncio.to_thread(self.store.expire)
                if expired:
                    logger.info("deleted %d expired job(s)", expired)
            except Exception:
                logger.exception("could not delete expired jobs")
            await asyncio.sleep(self.sweep_interval_s)

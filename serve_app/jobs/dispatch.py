"""The job dispatcher: claims queued jobs and runs them through the image and video services.

Plain async code over a `JobStore` and the same `ImageService`/`VideoService` the sync endpoints
use (with Serve handles inside a replica, `LocalHandle`s in unit tests). The `JobRunner`
deployment wraps it.

- Dispatch: one loop claims the next queued job in the fair order across key groups
  (`fairness.py`, chosen atomically by the store) of the kinds that have a free slot
  (`slots[kind]` jobs of a kind run at once) and runs it as a task; its GPU-seconds are then
  added to its group's usage. A submit or a finished job wakes the loop; otherwise it looks
  again every `poll_interval_s`.
- Sync turns: a synchronous request takes a slot too (`sync_turn`/`end_turn`): at once when
  nothing is queued, else as a ticket in the same fair order, holding the slot until it ends.
- Outcome of a run: the result is saved with the transition to succeeded (compare-and-set on the
  attempt). A failure (a replica died, a stage timed out, a model raised) goes back to the queue
  with its reason while retries are left, then fails; a bad request fails at once.
- Capacity: a run a model deployment turned away (back-pressure past its max_queued_requests,
  or no replica available) goes back to the queue in its place without spending an attempt, and
  no job of that kind is claimed until a back-off passes (exponential with jitter, reset when a
  run gets through): jobs never fail for lack of capacity.
- Cancel: a queued job is cancelled in the store and never starts. A running job's task is
  cancelled; the cancellation travels down the Serve handles to the model replica, which stops
  at the end of its current denoising step. Only that job's task is touched.
- Stopping (SIGTERM, a redeploy): dispatch ends, each running job's model call is cancelled and
  the job goes back to the queue in its place without spending its attempt (the shutdown cut it
  short, not the job). A claim in flight finishes first and is put back the same way.
- Start-up: jobs a previous runner left running (it died, or could not reach the store as it
  stopped) are requeued, counting the attempt, or failed past the retry limit. A runner taking
  back the lease it lost puts the runs it halted back without counting them (the halt stopped
  them, not the job).
- Store errors: a run's outcome (result, failure, cancel, requeue) is a compare-and-set on its
  attempt, so it is retried when the store fails (a timeout, a failover, "database is locked"):
  a write that did commit before its answer was lost changes nothing the second time.
- Reconciliation: every `reconcile_interval_s` (a third of the lease TTL) the lease holder
  looks at the jobs `running` in the store. One that no run here holds (a claim whose answer
  was lost, an outcome the store would not take even after retries) is ended: the kept outcome
  is recorded, or else it goes back to the queue without spending its attempt (no model ran
  for it, or the failure was the store's). A cancel another runner served (a standby) is passed
  to the run here, which also learns of it from its next progress report.
- The lease (both stores: Serve starts a new JobRunner while the old one drains, and two
  clusters can share one Redis): a runner first takes the store's runner lease, and until it has
  it, it only stands by (serving submits, status and cancels, claiming nothing).
  Holding it, it recovers, dispatches and renews it every third of its TTL. When the lease is
  lost (a renew says no, a write is refused as fenced, or no renew got through for a whole TTL),
  it ends dispatch and every run without recording anything, and stands by again: whoever holds
  the lease now owns the jobs. Stopping releases the lease after putting the running jobs back,
  so a standby runner takes over at its next poll, with nothing left to requeue.
- Watchers (the SSE stream) wait on an in-memory event per job, set on every change this
  dispatcher makes, so events go out as they happen without polling the store.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import time
import uuid
from typing import Callable

from pydantic import ValidationError

from deployments.runtime.types import ModelOutOfMemory, ProgressTarget
from serve_app.jobs.fairness import FairPolicy, fair_order, group_of, shares
from serve_app.jobs.model import CANCELLED, FAILED, QUEUED, RUNNING, SUCCEEDED, Job, dumps
from serve_app.jobs.results import image_result, video_result
from serve_app.jobs.store import JobStore, LeaseLost
from serve_app.protocol.errors import RequestError
from serve_app.protocol.schemas import ImageRequest, VideoRequest
from serve_app.services.graph import Overloaded, cause_of
from serve_app.services.images import ImageService
from serve_app.services.videos import VideoService

logger = logging.getLogger("ray.serve")

RESTART_REASON = "interrupted: the job runner stopped while it ran"
HALTED_REASON = "interrupted: this job runner lost its lease while it ran"
SHUTDOWN_REASON = "interrupted: the job runner stopped (shutdown or redeploy)"
# How long `stop()` lets a claim in flight finish (a store call: bounded by the store's own timeouts).
STOP_CLAIM_WAIT_S = 15.0
# How long `stop()` retries putting one running job back when the store fails (then it is left to
# the next runner's recover()): short, so that the whole stop fits Serve's graceful shutdown.
STOP_RECORD_RETRY_S = 3.0
DEFAULT_LEASE_TTL_S = 30.0
# How long a run that a stop or a halt cancels waits for its model call to end (the cancel travels
# down the handles to the replica, which stops at its next denoising step).
MODEL_CANCEL_WAIT_S = 15.0
# After a failed renew is retried at once and fails again, the next tries come this often (a
# fraction of the lease TTL): soon enough to land before the expiry, not a busy loop when the
# store refuses connections at once.
RENEW_RETRY_FRACTION = 1 / 30
CAPACITY_REASON = "not run: the model deployment had no capacity"
BACKOFF_INITIAL_S = 0.5
BACKOFF_MAX_S = 30.0
# A run's outcome that the store refuses with an error is retried, backing off from the first
# to the second, for up to a lease TTL; then it waits for reconciliation.
RECORD_RETRY_S = (0.05, 2.0)
ORPHAN_REASON = "interrupted: no run of the job runner held it (a store error)"


class _Unrecorded(Exception):
    """A run's outcome the store would not take, even after retries: kept for reconciliation."""


def is_capacity(error: BaseException) -> bool:
    """A run turned away for capacity (a full queue, no replica available), not a failure of the job."""
    from ray.exceptions import ActorUnavailableError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    return isinstance(cause_of(error), (Overloaded, BackPressureError, DeploymentUnavailableError, ActorUnavailableError))


def _capacity_reason(error: BaseException) -> str:
    if isinstance(error, Overloaded):
        return f"not run: {error}"  # names the stage: "the generate stage's deployment is at capacity"
    return f"{CAPACITY_REASON} ({type(error).__name__})"


async def _wait(event: asyncio.Event, timeout_s: float) -> bool:
    """Whether `event` was set within `timeout_s`. `asyncio.timeout`, not `wait_for`: on Python 3.11
    `wait_for` can swallow a cancellation that lands as its timeout fires, and `stop()` then waited
    forever on a dispatch loop that went on polling."""
    try:
        async with asyncio.timeout(timeout_s):
            await event.wait()
        return True
    except TimeoutError:
        return False


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(cause_of(error), ModelOutOfMemory)


class Backoff:
    """When a kind may be claimed again after a capacity rejection: doubling from
    BACKOFF_INITIAL_S up to BACKOFF_MAX_S, each delay jittered to 50-100% (so dispatchers and
    jobs do not retry in step), reset once a run of the kind gets through."""

    def __init__(self, initial_s: float = BACKOFF_INITIAL_S, max_s: float = BACKOFF_MAX_S,
                 clock: Callable[[], float] = time.monotonic):
        self.initial_s, self.max_s, self.clock = initial_s, max_s, clock
        self._delay: dict[str, float] = {}
        self._until: dict[str, float] = {}

    def reject(self, kind: str) -> float:
        delay = min(self.max_s, self._delay.get(kind, self.initial_s / 2) * 2)
        self._delay[kind] = delay
        wait = delay * random.uniform(0.5, 1.0)
        self._until[kind] = self.clock() + wait
        return wait

    def succeeded(self, kind: str) -> None:
        self._delay.pop(kind, None)
        self._until.pop(kind, None)

    def waiting(self, kind: str) -> float:
        """Seconds until `kind` may be claimed again (0: now)."""
        return max(0.0, self._until.get(kind, 0.0) - self.clock())


def describe_failure(error: BaseException) -> str:
    """One line for the job's error: what went wrong, never a traceback."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

    if isinstance(error, (ActorDiedError, ActorUnavailableError, RayActorError)):
        return f"a model replica died while running the job ({type(error).__name__})"
    error = cause_of(error)
    lines = str(error).strip().splitlines()
    message = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
    return message[:500]


class JobRejected(Exception):
    """A submit the runner refuses: 429 (the queue is full) or 413 (the request is too large)."""

    def __init__(self, status: int, detail: str, retry_after_s: float | None = None):
        super().__init__(detail)
        self.status, self.detail, self.retry_after_s = status, detail, retry_after_s

    def __reduce__(self):  # Ray pickles it back to the ingress
        return (type(self), (self.status, self.detail, self.retry_after_s))


QUEUE_FULL_RETRY_AFTER_S = 30.0
# A synchronous request's turn in the fair order is a ticket in the store, marked by this request hash.
SYNC_TURN = "sync-turn"
TURN_POLL_S = 0.5  # how often a waiting turn looks in the store (a ticket another runner claimed)
SYNC_HOLD_S = 900.0  # the longest a granted turn holds its slot without its end being heard


def device_seconds(result: dict, wall_s: float) -> float:
    """A run's GPU time: what the image generator reported (`timings.device`), a video's generate
    time (`timings.video`), else the run's wall time."""
    timings = result.get("timings") or {}
    reported = timings.get("device") or timings.get("video")
    return float(reported) if reported else max(0.0, wall_s)


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
                 poll_interval_s: float = 1.0, max_queued_jobs: int | None = None,
                 max_request_bytes: int | None = None, queued_ttl_s: float | None = None,
                 lease_ttl_s: float = DEFAULT_LEASE_TTL_S, reconcile_interval_s: float | None = None,
                 policy: Callable[[], FairPolicy] = FairPolicy, on_claim: Callable[[Job], None] = lambda job: None,
                 deliverer=None):
        self.store = store
        self.deliverer = deliverer  # webhooks.Deliverer: tells receivers of jobs' ends while the lease holds
        # The fair order's weights and time constants, read at every claim (the keys file can change).
        self.policy = policy
        self._on_claim = on_claim  # the queue-wait metric
        self._turns: dict[str, tuple[asyncio.Event, asyncio.Event]] = {}  # sync turns: granted, released
        self._held: dict[str, str] = {}  # sync turns granted at once (no ticket): token -> kind
        self.lease_ttl_s = lease_ttl_s
        self.reconcile_interval_s = lease_ttl_s / 3 if reconcile_interval_s is None else reconcile_interval_s
        # Who holds the lease, in the store and the logs: this process, and this dispatcher in it.
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.max_queued_jobs = max_queued_jobs
        self.max_request_bytes = max_request_bytes
        self.queued_ttl_s = queued_ttl_s
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
        # Outcomes the store would not take (by job id: the attempt, and the write that records it).
        self._unrecorded: dict[str, tuple[int, Callable[[], object]]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watchers = _Watchers()
        self._wakeup: asyncio.Event | None = None
        self.backoff = Backoff()
        self._loops: list[asyncio.Task] = []
        self._main: asyncio.Task | None = None
        self._lost: asyncio.Event | None = None  # set by whatever meets LeaseLost
        self._holds_lease = False
        self._stopping = False
        self._halting = False  # the lease is gone: runs end without recording anything
        # The runs halts stopped since the last recover (job id -> attempt): if this runner takes
        # the lease back, they go back to the queue unspent (a halt stopped them, not the job).
        self._halted: dict[str, int] = {}
        self._claiming: asyncio.Future | None = None  # the store's claim in flight (see `_claim`)

    # Lifecycle

    def recover(self) -> list[Job]:
        """Requeue (or fail) the jobs a previous runner left running, counting the attempt (it may
        have died of the job). Runs this runner halted itself when it lost the lease go back
        without spending it. Call before `start`."""
        recovered = []
        for job in self.store.list(state=RUNNING, limit=1_000_000):
            if self._halted.get(job.id) == job.attempts:
                moved = self.store.requeue_unspent(job, HALTED_REASON)
            else:
                moved = self.store.retry_or_fail(job, RESTART_REASON, self.retry_limit)
            if moved is not None:
                recovered.append(moved)
        self._halted.clear()
        if recovered:
            logger.info("requeued %d job(s) left running: %s", len(recovered),
                        ", ".join(f"{job.id} -> {job.state}" for job in recovered))
        return recovered

    def start(self) -> None:
        """On the running event loop: take the lease (standing by until it is free), recover the
        jobs a previous runner left running, then dispatch and sweep while the lease holds."""
        self._loop = asyncio.get_running_loop()
        self._wakeup = asyncio.Event()
        self._lost = asyncio.Event()
        self._main = asyncio.create_task(self._serve_forever())

    def info(self) -> dict:
        return {"store": type(self.store).__name__, "slots": self.slots, "running": dict(self._running),
                "retry_limit": self.retry_limit, "ttl_s": self.store.ttl_s,
                "lease": "held" if self._holds_lease else "standby", "owner": self.owner}

    def healthy(self) -> bool:
        """The lease keeper runs, and while the lease holds so do dispatch and sweep (a standby is healthy)."""
        if self._main is None or self._main.done():
            return False
        return not (self._holds_lease and not self._lost.is_set() and any(loop.done() for loop in self._loops))

    # The lease

    async def _serve_forever(self) -> None:
        while not self._stopping:
            asked_at = time.monotonic()  # the lease runs from when it was asked for, not answered
            if not await self._acquire():
                await asyncio.sleep(self.lease_ttl_s / 3)
                continue
            self._holds_lease, self._halting = True, False
            try:
                await asyncio.to_thread(self.recover)
            except LeaseLost:
                self._lost.set()
            except Exception:  # the store is unreachable: hand the lease back and try again shortly
                logger.exception("could not recover the jobs left running; trying again")
                self._lost.set()
                await asyncio.sleep(self.lease_ttl_s / 3)
            if not self._lost.is_set():
                self._loops = [asyncio.create_task(self._dispatch_forever()),
                               asyncio.create_task(self._sweep_forever())]
                if self.deliverer is not None:
                    self._loops.append(asyncio.create_task(self.deliverer.run_forever(self._lost)))
                await self._keep_lease(asked_at)
            await self._halt()

    async def _acquire(self) -> bool:
        try:
            taken = await asyncio.to_thread(self.store.acquire_lease, self.owner, self.lease_ttl_s)
        except Exception as error:
            logger.warning("could not ask for the job runner lease (%s); trying again", type(error).__name__)
            return False
        if taken and self.store.leases:
            logger.info("job runner %s holds the lease: dispatching", self.owner)
        return taken

    async def _keep_lease(self, renewed: float) -> None:
        """Renew every third of the TTL; return once the lease is lost: a renew says no, a write
        met LeaseLost, or no renew got through for a whole TTL (the lease may have lapsed).

        A renew that fails (it timed out: up to redis_timeout_s) is retried at once, then every
        RENEW_RETRY_FRACTION of the TTL: waiting another third could land past the expiry, and one
        slow renew would lose the lease. `renewed` (and each renew's time) is when it was sent,
        since that is when the store extended the lease, not when the answer came."""
        wait = self.lease_ttl_s / 3
        while not await _wait(self._lost, wait):
            sent = time.monotonic()
            try:
                if not await asyncio.to_thread(self.store.renew_lease, self.lease_ttl_s):
                    return
                renewed, wait = sent, self.lease_ttl_s / 3
            except Exception as error:
                logger.warning("could not renew the job runner lease (%s); trying again", type(error).__name__)
                if time.monotonic() - renewed >= self.lease_ttl_s:
                    return
                wait = 0.0 if wait == self.lease_ttl_s / 3 else self.lease_ttl_s * RENEW_RETRY_FRACTION

    async def _halt(self) -> None:
        """The lease is gone: end dispatch and every run here without recording anything (the
        store refuses it now); the lease holder owns these jobs. Then stand by."""
        logger.warning("job runner %s lost the lease: stopping %d run(s) unrecorded and standing by",
                       self.owner, len(self._tasks))
        self._holds_lease, self._halting = False, True
        self._halted.update({job.id: job.attempts for job in self._active.values()})
        tasks = [*self._loops, *self._tasks.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._note_claim_in_flight()
        self._loops = []
        self._unrecorded.clear()  # not ours to record any more: the new holder requeues those jobs
        self._lost.clear()

    async def _note_claim_in_flight(self) -> None:
        """A claim the halted dispatch loop left in flight may still take a job (the lease held in
        the store when it got there): noted as halted, so that it is not counted either."""
        claiming, self._claiming = self._claiming, None
        if claiming is None:
            return
        await asyncio.wait({claiming}, timeout=STOP_CLAIM_WAIT_S)
        if claiming.done() and not claiming.cancelled() and claiming.exception() is None and claiming.result():
            job = claiming.result()
            self._halted[job.id] = job.attempts

    async def stop(self) -> None:
        """Stop dispatching, cancel every running job's model call and put those jobs back in the
        queue, in their places, without spending their attempts. Always ends: a store that cannot
        be reached leaves them running, for the next runner to requeue (counting the attempt)."""
        self._stopping = True
        if self._main is not None:  # no more renewing or halting: what follows settles this runner's jobs
            self._main.cancel()
            await asyncio.gather(self._main, return_exceptions=True)
        running = list(self._active.values())
        dispatch, *others = self._loops or [None]
        tasks = [*others, *self._tasks.values()]
        for task in tasks:
            task.cancel()
        if self._wakeup is not None:
            self._wakeup.set()  # the dispatch loop ends at once, or once a claim in flight returns
        await asyncio.gather(*tasks, return_exceptions=True)
        if dispatch is not None:
            try:
                async with asyncio.timeout(STOP_CLAIM_WAIT_S):
                    await dispatch
            except TimeoutError:
                logger.warning("the job dispatch loop did not end within %gs of stopping", STOP_CLAIM_WAIT_S)
            except Exception:
                logger.exception("the job dispatch loop failed as it stopped")
        for job in running:
            try:
                await self._record(job, lambda job=job: self._requeue_unspent(job, SHUTDOWN_REASON),
                                   within_s=STOP_RECORD_RETRY_S)
            except Exception as error:  # left running: the next runner's recover() requeues it
                logger.warning("job %s: could not put it back in the queue as the runner stopped (%s); the "
                               "next runner requeues it", job.id, type(error).__name__)
        if self._holds_lease:
            await self._reconcile_as_it_stops()
            self._holds_lease = False
            try:
                await asyncio.to_thread(self.store.release_lease)
            except Exception as error:  # it lapses after its TTL instead
                logger.warning("could not release the job runner lease (%s)", type(error).__name__)

    async def _reconcile_as_it_stops(self) -> None:
        """Settle the jobs no run here held (a lost claim answer, an unrecorded outcome) before the
        lease goes: a store error is retried for up to STOP_RECORD_RETRY_S, since the next runner
        would requeue what is left running counting the attempt."""
        delay, max_delay = RECORD_RETRY_S
        deadline = time.monotonic() + STOP_RECORD_RETRY_S
        while True:
            try:
                return await self._reconcile()
            except LeaseLost:
                return
            except Exception as error:
                if time.monotonic() + delay > deadline:
                    logger.warning("could not reconcile the running jobs as the runner stopped (%s)",
                                   type(error).__name__)
                    return
            await asyncio.sleep(delay)
            delay = min(2 * delay, max_delay)

    def _requeue_unspent(self, job: Job, reason: str) -> Job | None:
        """Put a job this runner claimed back in the queue without spending the attempt (cancelled
        if a cancel was asked for), if it is still at that attempt."""
        current = self.store.get(job.id)
        if current is not None and current.state == RUNNING and current.attempts == job.attempts:
            moved = self.store.requeue_unspent(current, reason)
            if moved is not None:
                logger.info("job %s: %s (%s)", job.id, reason, moved.state)
            return moved
        return None

    # What the JobRunner serves

    async def submit(self, kind: str, request: dict, idempotency_key: str | None = None,
                     request_hash: str | None = None, owner: str | None = None,
                     max_active: int | None = None, group: str | None = None, priority: str = "normal",
                     max_queued: int | None = None, targets: list[dict] | None = None) -> tuple[Job, bool, int | None]:
        """Record a job durably (`targets`: its webhook). Returns it, whether it is new (False: the idempotency key's job),
        and its queue position. Raises `ActiveJobsExceeded` when the owner is at `max_active`, and
        JobRejected past max_request_bytes or max_queued_jobs; a replay is never refused (a
        client retrying a submit whose answer it missed gets its job, whatever the queue holds)."""
        if idempotency_key is not None:
            replayed = await self.replay(idempotency_key, owner)
            if replayed is not None:
                return replayed[0], False, replayed[1]
        if self.max_request_bytes is not None:
            size = len(dumps(request).encode())
            if size > self.max_request_bytes:
                raise JobRejected(413, f"the job's request is {size} bytes; the most a job may store is "
                                       f"{self.max_request_bytes} (jobs.max_request_bytes)")
        if self.max_queued_jobs is not None:
            queued = (await asyncio.to_thread(self.store.counts))[QUEUED]
            if queued >= self.max_queued_jobs:
                raise JobRejected(429, f"the job queue is full ({queued} jobs waiting, jobs.max_queued_jobs is "
                                       f"{self.max_queued_jobs}); retry later", QUEUE_FULL_RETRY_AFTER_S)
        job, created = await asyncio.to_thread(
            self.store.create, kind, request, idempotency_key=idempotency_key, request_hash=request_hash,
            owner=owner, max_active=max_active, group=group, priority=priority, max_queued=max_queued, targets=targets,
        )
        if created and self._wakeup is not None:
            self._wakeup.set()
        return job, created, (await self.places([job]))[job.id][0]

    async def replay(self, idempotency_key: str, owner: str | None = None) -> tuple[Job, int | None] | None:
        """The job `owner` already submitted with `idempotency_key`, and its queue position; None if none."""
        job = await asyncio.to_thread(self.store.find_idempotent, owner, idempotency_key)
        if job is None:
            return None
        return job, (await self.places([job]))[job.id][0]

    async def status(self, job_id: str) -> tuple[Job, int | None] | None:
        found = await self.status_with_estimate(job_id)
        return None if found is None else found[:2]

    async def fair_usage(self) -> dict[str, dict]:
        """Each group's recent GPU-seconds (decayed to now), share of them, weight and jobs running."""
        policy = self.policy()
        usage = await asyncio.to_thread(self.store.usage)
        now = time.time()
        share = shares(usage, now, policy.half_life_s)
        return {group: {"gpu_seconds": round(use.decayed(now, policy.half_life_s)[0], 3),
                        "share": round(share[group], 4), "weight": policy.weight(group), "running": use.running}
                for group, use in usage.items()}

    async def status_with_estimate(self, job_id: str) -> tuple[Job, int | None, float | None] | None:
        """The job, its place in the fair order and the seconds until it is expected to start."""
        job = await asyncio.to_thread(self.store.get, job_id)
        if job is None:
            return None
        if job.targets and job.finished:
            job.deliveries = await asyncio.to_thread(self.store.deliveries, job_id)
        return job, *(await self.places([job]))[job.id]

    async def put_target(self, job_id: str, target: dict) -> bool | None:
        return await asyncio.to_thread(self.store.put_target, job_id, target)

    async def delete_target(self, job_id: str, target_id: str) -> bool | None:
        return await asyncio.to_thread(self.store.delete_target, job_id, target_id)

    async def list(self, state: str | None, limit: int, before: int | None,
                   owner: str | None = None) -> list[tuple[Job, int | None]]:
        jobs = await asyncio.to_thread(self.store.list, state, limit, before, owner)
        places = await self.places(jobs)
        return [(job, places[job.id][0]) for job in jobs]

    async def places(self, jobs: list[Job]) -> dict[str, tuple[int | None, float | None]]:
        """Each job's queue position (1: next) and estimated seconds to its start, while queued: the
        fair order the claim would follow if nothing else arrived (fairness.fair_order), each job
        ahead costing its group's mean GPU-seconds per job, over the kind's slots."""
        places: dict[str, tuple[int | None, float | None]] = {job.id: (None, None) for job in jobs}
        kinds = {job.kind for job in jobs if job.state == QUEUED}
        if not kinds:
            return places
        policy = self.policy()

        def orders():
            usage, ordered = self.store.usage(), {}
            for kind in kinds:
                queued = self.store.queued(kind)
                order = fair_order(queued, usage, policy, time.time())
                # Past fair_order's limit (a very deep queue), the rest in their own groups' order.
                placed = {job.id for job in order}
                ordered[kind] = order + sorted((job for job in queued if job.id not in placed and
                                                policy.weight(job.group) > 0), key=lambda job: job.order(policy))
            return usage, ordered

        usage, ordered = await asyncio.to_thread(orders)
        for kind, order in ordered.items():
            ahead_s = 0.0
            for index, queued in enumerate(order):
                if queued.id in places:
                    places[queued.id] = (index + 1, round(ahead_s / max(1, self.slots.get(kind, 1)), 2))
                use = usage.get(queued.group)
                ahead_s += use.per_job(policy) if use is not None else policy.estimate_s
        return places

    # Synchronous requests in the fair order

    async def sync_turn(self, kind: str, owner: str | None, group: str | None, wait_s: float) -> str | None:
        """A turn for a synchronous request of `kind`: a token to pass to `end_turn`, or None when
        none came within `wait_s` (at once for a paused group). With a slot free and nothing
        queued it is granted at once; otherwise a ticket waits in the store's fair order like a
        job, and the slot the claim gives it is held until `end_turn`."""
        if self.policy().weight(group_of(owner, group)) <= 0:
            return None  # a paused key (weight 0) gets no turn, as its jobs get none
        if (self._holds_lease and self._running.get(kind, 0) < self.slots.get(kind, 0)
                and (await asyncio.to_thread(self.store.counts))[QUEUED] == 0):
            token = f"now:{uuid.uuid4().hex}"
            self._running[kind] += 1
            self._held[token] = kind
            # An ingress that died never ends its turn: the slot comes back after SYNC_HOLD_S anyway.
            asyncio.get_running_loop().call_later(SYNC_HOLD_S, self._release_held, token)
            return token
        ticket, _ = await asyncio.to_thread(self.store.create, kind, {"sync": True}, request_hash=SYNC_TURN,
                                            owner=owner, group=group)
        self._turns[ticket.id] = granted, _released = asyncio.Event(), asyncio.Event()
        if self._wakeup is not None:
            self._wakeup.set()
        deadline = time.monotonic() + wait_s
        while not granted.is_set() and time.monotonic() < deadline:
            await _wait(granted, min(TURN_POLL_S, max(0.0, deadline - time.monotonic())))
            if not granted.is_set():  # a standby's ticket is claimed by the lease holder: look in the store
                current = await asyncio.to_thread(self.store.get, ticket.id)
                if current is None or current.state != QUEUED:
                    return ticket.id
        if granted.is_set():
            return ticket.id
        found = await asyncio.to_thread(self.store.request_cancel, ticket.id)
        if found is not None and found[0].state == CANCELLED:
            self._turns.pop(ticket.id, None)
            await asyncio.to_thread(self.store.delete, ticket.id)
            return None
        return ticket.id  # claimed as the wait ended: the turn came

    async def end_turn(self, token: str, group: str | None, device_s: float) -> None:
        """A synchronous request's turn is over: its slot frees and its GPU time joins its group's share."""
        if token in self._held:
            self._release_held(token)
        elif token in self._turns:
            self._turns[token][1].set()
        if device_s > 0 and self._holds_lease:
            await self._charge(group, device_s)

    def _release_held(self, token: str) -> None:
        kind = self._held.pop(token, None)
        if kind is not None:
            self._running[kind] -= 1
            if self._wakeup is not None:
                self._wakeup.set()

    async def _hold_turn(self, job: Job, cancel: asyncio.Event) -> None:
        """A claimed sync ticket: grant its turn and hold the slot until the request ends (or
        SYNC_HOLD_S at most: an ingress that died never ends it); then the ticket is deleted."""
        turn = self._turns.get(job.id)
        if turn is not None:
            turn[0].set()
            ended = asyncio.ensure_future(turn[1].wait())
            stopped = asyncio.ensure_future(cancel.wait())
            try:
                await asyncio.wait({ended, stopped}, timeout=SYNC_HOLD_S, return_when=asyncio.FIRST_COMPLETED)
            finally:
                ended.cancel()
                stopped.cancel()
                self._turns.pop(job.id, None)
        await self._record(job, lambda: self.store.transition(job.id, {RUNNING}, SUCCEEDED, attempt=job.attempts,
                                                              reason="sync turn ended", cancel_requested=False))
        await asyncio.to_thread(self.store.delete, job.id)

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

    async def delete(self, job_id: str) -> bool | None:
        """Delete a finished job and its files (True); False if not finished; None if unknown."""
        deleted = await asyncio.to_thread(self.store.delete, job_id)
        if deleted:
            self._watchers.changed(job_id)
        return deleted

    async def watch(self, job_id: str, after_version: int, timeout_s: float) -> Job | None:
        """The job once its version passes `after_version` (or it finished), else after `timeout_s`."""
        event = self._watchers.event(job_id)  # before reading, so no change slips in between
        try:
            job = await asyncio.to_thread(self.store.get, job_id)
            if job is None or job.version > after_version or job.finished:
                return job
            await _wait(event, timeout_s)
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
        if progress.get("preview"):
            record["preview"] = progress["preview"]
        self._progress[job_id] = record
        try:
            recorded = await asyncio.to_thread(self.store.record_progress, job_id, attempt, record)
        except LeaseLost:
            self._lost.set()
            return
        if recorded:
            self._watchers.changed(job_id)
        elif job_id in self._cancels:  # refused: a cancel may have been asked for through another runner
            current = await asyncio.to_thread(self.store.get, job_id)
            if current is not None and current.cancel_requested and job_id in self._cancels:
                self._cancels[job_id].set()  # the run stops at this step, as the cancel's 202 promised

    # Dispatch

    async def _dispatch_forever(self) -> None:
        next_reconcile = time.monotonic() + self.reconcile_interval_s
        while not self._stopping:
            if time.monotonic() >= next_reconcile:  # here, so that no claim is in flight meanwhile
                next_reconcile = time.monotonic() + self.reconcile_interval_s
                try:
                    await self._reconcile()
                except LeaseLost:
                    self._lost.set()
                    return
                except Exception:
                    logger.exception("could not reconcile the running jobs; trying again")
            self._wakeup.clear()  # before claiming: a submit from now on wakes the wait below
            free = [kind for kind, limit in self.slots.items()
                    if self._running[kind] < limit and not self.backoff.waiting(kind)]
            try:
                job = await self._claim(free) if free else None
            except LeaseLost:
                self._lost.set()
                return
            except Exception:
                logger.exception("could not claim a job; trying again")
                job = None
            if self._stopping:  # claimed as the runner stops: it never started, so back in its place
                if job is not None:
                    await asyncio.to_thread(self._requeue_unspent, job, SHUTDOWN_REASON)
                return
            if job is None:
                backing_off = [self.backoff.waiting(kind) for kind in self.slots if self.backoff.waiting(kind)]
                await _wait(self._wakeup, min([self.poll_interval_s, *backing_off]))
                continue
            self._begin(job)

    async def _claim(self, kinds: list[str]) -> Job | None:
        """`store.claim`, kept as `_claiming` while it is in flight: a halt cancels the dispatch loop,
        not the store call in its thread, so `_halt` waits for it and notes a job it took."""
        self._claiming = asyncio.ensure_future(asyncio.to_thread(lambda: self.store.claim(kinds, policy=self.policy())))
        job = await asyncio.shield(self._claiming)
        self._claiming = None
        if job is not None:
            self._on_claim(job)
        return job

    def _begin(self, job: Job) -> None:
        """Run a claimed job as a task. Its slot is freed when the task ends, by a callback rather
        than in the run's `finally`: a halt can cancel the task before its first step, and then
        no line of the run executes."""
        self._running[job.kind] += 1
        self._active[job.id] = job
        self._cancels[job.id] = cancel = asyncio.Event()
        if job.id in self._cancel_on_start:
            self._cancel_on_start.discard(job.id)
            cancel.set()
        self._tasks[job.id] = task = asyncio.create_task(self._run(job, cancel))
        task.add_done_callback(lambda _: self._ended(job, task))
        self._watchers.changed(job.id)

    def _ended(self, job: Job, task: asyncio.Task) -> None:
        self._running[job.kind] -= 1
        if self._tasks.get(job.id) is task:  # not a later run of the same job, claimed again since
            for registry in (self._active, self._tasks, self._cancels, self._progress):
                registry.pop(job.id, None)
        if not self._stopping:
            self._wakeup.set()
            if self.deliverer is not None and job.targets:
                self.deliverer.wake()  # its end's deliveries are due now
        self._watchers.changed(job.id)

    async def _run(self, job: Job, cancel: asyncio.Event) -> None:
        try:
            if job.request_hash == SYNC_TURN:
                await self._hold_turn(job, cancel)
                return
            await self._run_attempt(job, cancel)
        except LeaseLost:  # another runner holds the lease: this run's outcome is not ours to record
            logger.warning("job %s: outcome not recorded: this runner lost the lease", job.id)
            self._lost.set()
        except _Unrecorded as error:
            logger.error("job %s: %s; reconciliation records it once the store answers", job.id, error)
        except Exception:  # never a task dying unseen with its job running: reconciliation ends it
            logger.exception("job %s: its run failed unexpectedly", job.id)

    async def _record(self, job: Job, outcome: Callable[[], object], within_s: float | None = None):
        """Record a run's outcome with `outcome` (a store write, compare-and-set on the attempt, so
        doing it again after an error whose write did commit changes nothing). A store error is
        retried, backing off, for up to `within_s` (a lease TTL); then the outcome is kept for
        reconciliation and `_Unrecorded` raised. LeaseLost is final: the job is no longer ours."""
        delay, max_delay = RECORD_RETRY_S
        deadline = time.monotonic() + (self.lease_ttl_s if within_s is None else within_s)
        while True:
            try:
                return await asyncio.to_thread(outcome)
            except LeaseLost:
                raise
            except Exception as error:
                if time.monotonic() + delay > deadline:
                    self._unrecorded[job.id] = (job.attempts, outcome)
                    raise _Unrecorded(f"its outcome could not be recorded ({type(error).__name__}: {error})") \
                        from error
                logger.warning("job %s: could not record its outcome (%s); trying again", job.id, type(error).__name__)
                await asyncio.sleep(delay)
                delay = min(2 * delay, max_delay)

    async def _reconcile(self) -> None:
        """End the jobs `running` in the store that no run here holds (see the module docstring)."""
        for job_id, (attempt, outcome) in list(self._unrecorded.items()):
            try:
                await asyncio.to_thread(outcome)
            except LeaseLost:
                raise
            except Exception as error:
                logger.warning("job %s: its outcome still could not be recorded (%s)", job_id, type(error).__name__)
                continue
            if self._unrecorded.get(job_id, (None,))[0] == attempt:
                del self._unrecorded[job_id]
            self._watchers.changed(job_id)
        for job in await asyncio.to_thread(self.store.list, RUNNING, 1_000_000):
            if job.id in self._active:
                if job.cancel_requested and job.id in self._cancels:  # served by another runner
                    self._cancels[job.id].set()
                continue
            if job.id in self._unrecorded:
                continue
            if await asyncio.to_thread(self._requeue_unspent, job, ORPHAN_REASON) is not None:
                self._watchers.changed(job.id)

    async def _run_attempt(self, job: Job, cancel: asyncio.Event) -> None:
        """Run one attempt until it ends or its user cancels it. The cancel is an event rather than
        a cancellation of this task, so it is safe at any moment, even before the task starts."""
        generate = asyncio.ensure_future(self._generate(job))
        cancelled = asyncio.ensure_future(cancel.wait())
        try:
            await asyncio.wait({generate, cancelled}, return_when=asyncio.FIRST_COMPLETED)
            if not generate.done():
                generate.cancel()  # travels down the handles: the model stops at its next step end
                await asyncio.wait({generate})
                if generate.cancelled():
                    reason = f"cancelled while running{self._where(job.id)}"
                    await self._record(job, lambda: self.store.transition(job.id, {RUNNING}, CANCELLED,
                                                                          attempt=job.attempts, reason=reason))
                    return
            result, files = generate.result()  # re-raises the run's failure, if any
        except asyncio.CancelledError:
            if self._stopping or self._halting:  # stop() puts it back; a lost lease records nothing
                generate.cancel()
                # Until the cancel has gone down to the model call (a few steps of this loop later):
                # a runner that stopped first would leave it running while the job runs elsewhere.
                await asyncio.wait({generate}, timeout=MODEL_CANCEL_WAIT_S)
                raise
            await self._attempt_failed(job, RuntimeError("the run was cancelled, but not by its user"))
            return
        except (LeaseLost, _Unrecorded):
            raise  # not this run's failure (see _run)
        except Exception as error:
            if is_capacity(error):
                await self._turned_away(job, error)
            else:
                await self._attempt_failed(job, error)
            return
        finally:
            cancelled.cancel()
        self.backoff.succeeded(job.kind)
        await self._record(job, lambda: self._save(job, result, files))
        await self._charge(job.group, device_seconds(result, time.time() - (job.started_at or time.time())))

    async def _charge(self, group: str | None, seconds: float) -> None:
        """Add a finished run's device seconds to its group's share (advisory: a store error is logged)."""
        try:
            await asyncio.to_thread(self.store.record_usage, group or "local", seconds,
                                    half_life_s=self.policy().half_life_s)
        except LeaseLost:
            self._lost.set()
        except Exception as error:
            logger.warning("could not record %.2f GPU-seconds for group %s (%s)", seconds, group, type(error).__name__)

    async def _generate(self, job: Job) -> tuple[dict, list]:
        """The model part of a run: the result and its files, not yet recorded."""
        target = self._progress_target(job)
        if job.kind == "image":
            response = await self.images.generate_images(ImageRequest.model_validate(job.request), target)
            return image_result(job.id, response)
        if self.videos is not None:
            response, output = await self.videos.run(VideoRequest.model_validate(job.request), target)
            return video_result(job.id, response, output)
        raise RequestError("kind", "video generation is not deployed: add a video_models entry to the config", "image")

    def _save(self, job: Job, result: dict, files: list) -> None:
        saved = self.store.save_result(job.id, job.attempts, result, files)
        if saved is None:  # a cancel was asked for as it finished: the cancel wins, the result is dropped
            self.store.transition(job.id, {RUNNING}, CANCELLED, attempt=job.attempts, reason="cancelled as it finished")

    async def _turned_away(self, job: Job, error: Exception) -> None:
        wait = self.backoff.reject(job.kind)
        logger.info("job %s: %s (%s); %s jobs wait %.1fs", job.id, CAPACITY_REASON, type(error).__name__, job.kind, wait)
        reason = _capacity_reason(error)
        await self._record(job, lambda: self._requeue_unspent(job, reason))

    async def _attempt_failed(self, job: Job, error: Exception) -> None:
        reason = describe_failure(error)
        logger.warning("job %s attempt %d failed: %s", job.id, job.attempts, reason)
        if isinstance(error, (RequestError, ValidationError)):  # running it again cannot help
            await self._record(job, lambda: self.store.transition(job.id, {RUNNING}, FAILED, attempt=job.attempts,
                                                                  reason=reason, error=reason))
            return
        # Out of memory again on a re-run would most likely repeat: one retry at most (the
        # replica freed its cache; a different batch on it may fit), then fail, saying why.
        limit = min(self.retry_limit, 1) if is_out_of_memory(error) else self.retry_limit

        def retry_or_fail():
            current = self.store.get(job.id)
            if current is not None and current.state == RUNNING and current.attempts == job.attempts:
                return self.store.retry_or_fail(current, reason, limit)
            return None

        await self._record(job, retry_or_fail)

    def _where(self, job_id: str) -> str:
        progress = self._progress.get(job_id)
        if progress is None:
            return ""
        return f" (at {progress['stage']} step {progress['step']} of {progress['steps']})"

    def expire_queued(self, now: float | None = None) -> int:
        """Fail the jobs queued longer than queued_ttl_s (compare-and-set: one claimed meanwhile runs)."""
        if self.queued_ttl_s is None:
            return 0
        now = time.time() if now is None else now
        expired = 0
        for job in self.store.list(state=QUEUED, limit=1_000_000):
            if job.created_at < now - self.queued_ttl_s:
                reason = f"expired: still queued {self.queued_ttl_s:g}s after it was submitted (jobs.queued_ttl_s)"
                if self.store.transition(job.id, {QUEUED}, FAILED, reason=reason, error=reason, now=now):
                    expired += 1
                    # This runs in a worker thread: asyncio events are set on their own loop only.
                    if self._loop is not None:
                        self._loop.call_soon_threadsafe(self._watchers.changed, job.id)
                    else:
                        self._watchers.changed(job.id)
        return expired

    async def _sweep_forever(self) -> None:
        while not self._stopping:
            try:
                expired = await asyncio.to_thread(self.store.expire)
                if expired:
                    logger.info("deleted %d expired job(s)", expired)
                stale = await asyncio.to_thread(self.expire_queued)
                if stale:
                    logger.info("failed %d job(s) queued longer than %gs", stale, self.queued_ttl_s)
            except LeaseLost:
                self._lost.set()
                return
            except Exception:
                logger.exception("could not delete expired jobs")
            await asyncio.sleep(self.sweep_interval_s)

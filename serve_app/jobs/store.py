"""The job store interface: the job record is the source of truth, and only a store changes it.

Every state change is a compare-and-set: it names the states (and the attempt) it expects, and
does nothing when the job has moved on meanwhile. That is what makes a late result from an
interrupted run, or a cancel racing a claim, harmless: at most one of them wins.

Two implementations share one test suite (tests/unit/test_job_store.py):
- `SqliteJobStore`: the default, no server. One file in WAL mode in the data directory; result
  files next to it. Commits are fsynced (synchronous=FULL) before a submit is acknowledged.
- `RedisJobStore`: for deployments where the runner may move between nodes. Records and result
  bytes live in Redis, changed by Lua scripts (atomic), so nothing depends on a node's disk.

Stores are synchronous and thread-safe; the dispatcher calls them from worker threads.

The runner lease (fencing): two runners can reach one store (two clusters on one Redis during a
KubeRay upgrade; on either store, the new JobRunner replica Ray Serve starts while the old one
drains in a rolling update), so only the holder of the store's lease may change jobs on its own
account: claim, record progress, save a result, retry, fail, requeue, expire. Once its lease is
gone (released, expired, taken over) every such write raises `LeaseLost` and changes nothing,
checked atomically with the write. What a user asks for (submit, cancel, delete) is the same
change whichever runner serves it, so it is not fenced. Both stores have a lease (`leases`); a
store that never acquired one writes unfenced (tools and tests that use a store directly).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Iterable

from serve_app.jobs.fairness import FairPolicy, GroupUsage, Queued
from serve_app.jobs.model import CANCELLED, FAILED, QUEUED, RUNNING, Job, ResultFile

# The reason a requeue of a job whose cancel was asked for records, as it cancels the job instead.
CANCELLED_AT_REQUEUE = "cancelled instead of going back to the queue"
CANCEL_REASON = "cancelled before it started"


class LeaseLost(RuntimeError):
    """A write of a runner whose lease is gone: refused, nothing changed. The runner stops dispatching."""


class JobStore(ABC):
    """Durable job records and result files. `ttl_s`: how long finished jobs are kept."""

    # Whether runners must hold a lease to write (see the module docstring); a store without one
    # grants every acquire.
    leases = False

    def __init__(self, ttl_s: float):
        self.ttl_s = ttl_s

    def acquire_lease(self, owner: str, ttl_s: float) -> bool:
        """Take the runner lease for `owner` unless another runner holds it; this store's runner
        writes are then fenced with it. True when taken."""
        return True

    def renew_lease(self, ttl_s: float) -> bool:
        """Extend the lease this store holds by `ttl_s`; False when it is no longer held."""
        return True

    def release_lease(self) -> None:
        """Give the lease up (a standby runner takes it at once); this store's runner writes are refused after."""
        return None

    @abstractmethod
    def create(self, kind: str, request: dict, *, idempotency_key: str | None = None,
               request_hash: str | None = None, now: float | None = None, owner: str | None = None,
               max_active: int | None = None, group: str | None = None, priority: str = "normal",
               max_queued: int | None = None, targets: list[dict] | None = None) -> tuple[Job, bool]:
        """Record a new queued job, durably, before returning. `targets`: its webhook, if any. With an idempotency key that is
        already recorded for `owner`, return that job instead and `False`. With `max_active`,
        raise `ActiveJobsExceeded` if the owner already has that many jobs queued or running;
        with `max_queued`, `QueuedJobsExceeded` past that many queued (both checked atomically
        with the insert, so concurrent submits cannot overshoot). `group` and `priority`: its
        place in the fair order (fairness.py; the group defaults to the owner)."""

    @abstractmethod
    def find_idempotent(self, owner: str | None, idempotency_key: str) -> Job | None:
        """The job `owner` submitted with `idempotency_key` (its replay), if it is still kept."""

    @abstractmethod
    def get(self, job_id: str, with_request: bool = False) -> Job | None:
        """The job; its `request` only `with_request` (it can be large)."""

    @abstractmethod
    def list(self, state: str | None = None, limit: int = 20, before: int | None = None,
             owner: str | None = None) -> list[Job]:
        """Newest first; `before`: only jobs submitted before the job with that `seq` (a cursor);
        `owner`: only that owner's jobs."""

    @abstractmethod
    def delete(self, job_id: str) -> bool | None:
        """Delete a finished job and its files: True; False if it is not finished; None if unknown."""

    @abstractmethod
    def active_count(self, owner: str) -> int:
        """The owner's jobs queued or running."""

    @abstractmethod
    def queue_position(self, job: Job) -> int | None:
        """1 for the next job of its kind to start; None unless queued."""

    @abstractmethod
    def claim(self, kinds: Iterable[str], now: float | None = None, policy: FairPolicy | None = None) -> Job | None:
        """Move the next queued job of one of `kinds` in the fair order (fairness.py; `policy`:
        weights and time constants, default all weights 1) to running, counting an attempt; with
        its request. The choice and the move are one atomic step."""

    @abstractmethod
    def record_usage(self, group: str, seconds: float, now: float | None = None,
                     half_life_s: float | None = None) -> None:
        """Add a finished run's device seconds (and one job) to `group`'s usage, decayed with the
        policy's `half_life_s` (a runner's write: fenced)."""

    @abstractmethod
    def usage(self) -> dict[str, GroupUsage]:
        """Every group's usage as recorded (decay it to now with `GroupUsage.decayed`) and jobs running."""

    @abstractmethod
    def queued(self, kind: str) -> list[Queued]:
        """The queued jobs of `kind`, as the fair order sees them (for positions and estimates)."""

    @abstractmethod
    def transition(self, job_id: str, expect: Iterable[str], to: str, *, attempt: int | None = None,
                   reason: str | None = None, error: str | None = None, cancel_requested: bool | None = None,
                   refund_attempt: bool = False, now: float | None = None, fenced: bool = True) -> Job | None:
        """Compare-and-set: when the job is in one of `expect` (and at `attempt`, if given), move
        it to `to` and return it; else change nothing and return None. A change of state is
        recorded in the history with `reason`; a terminal state sets `finished_at`/`expires_at`.
        `refund_attempt`: count the attempt as never made (a run the models had no room to start);
        such requeues coalesce in the history (`model.with_requeue`).
        A running job whose cancel was asked for is never put back in the queue: a move from
        running to queued cancels it instead (checked in the same step, so a cancel that lands
        between a runner's read and its requeue still wins), unless `cancel_requested=False`.
        `fenced`: a runner's own change, refused (LeaseLost) without the lease; False for a user's."""

    @abstractmethod
    def record_progress(self, job_id: str, attempt: int, progress: dict) -> bool:
        """Set the progress of a running job's current attempt; False if it is not that any more,
        or a cancel was asked for (its run should stop: the cancel may have been served by another
        runner). Progress is advisory, so stores may make it durable lazily."""

    @abstractmethod
    def save_result(self, job_id: str, attempt: int, result: dict, files: list[tuple[ResultFile, bytes]],
                    now: float | None = None) -> Job | None:
        """Atomically store the result and files (keyed by job id and file name, so a re-run
        overwrites rather than adds) and mark the job succeeded. Only for a running job at
        `attempt` with no cancel requested; else change nothing and return None."""

    @abstractmethod
    def read_file(self, job_id: str, name: str) -> bytes | None: ...

    @abstractmethod
    def expire(self, now: float | None = None) -> int:
        """Delete finished jobs past `expires_at`, files included; how many were deleted."""

    @abstractmethod
    def counts(self) -> dict[str, int]:
        """How many jobs are in each state, every state named (zero included)."""

    @abstractmethod
    def ping(self) -> None:
        """Raise if the store cannot be reached."""

    def close(self) -> None:  # noqa: B027 - a store with nothing to close need not override it
        return None

    @abstractmethod
    def request_cancel(self, job_id: str, now: float | None = None) -> tuple[Job, bool] | None:
        """A queued job is cancelled at once; a running one is flagged for its runner to stop.
        Returns the job and whether this call changed it (False: it had already finished);
        None for an unknown id. One atomic step, not two compare-and-sets: a runner moving the
        job between queued and running meanwhile (a claim, a requeue) cannot make it miss both."""

    # Who is told when a job ends (serve_app.jobs.webhooks): targets on the job, deliveries made
    # atomically with its final state, then attempted by the lease holder until one is answered.

    @abstractmethod
    def put_target(self, job_id: str, target: dict) -> bool | None:
        """Add a target to a job, replacing the one with its id: True; None if the job is unknown.
        A job's deliveries are made as it ends: a target added after that is kept (and listed),
        never delivered to. A user's change: unfenced."""

    @abstractmethod
    def delete_target(self, job_id: str, target_id: str) -> bool | None:
        """Remove a job's target by id: whether one was removed; None if the job is unknown."""

    @abstractmethod
    def deliveries(self, job_id: str) -> list[dict]:
        """A job's deliveries, in the order of its targets."""

    @abstractmethod
    def due_deliveries(self, now: float | None = None, limit: int = 100) -> list[dict]:
        """Pending deliveries whose next attempt is due, the longest due first."""

    @abstractmethod
    def record_delivery(self, delivery_id: str, attempt: int, outcome: dict) -> dict | None:
        """Record attempt `attempt` of a pending delivery (compare-and-set: it had `attempt - 1`
        attempts): `outcome` sets state, next_at, last_status, last_error, delivered_at. A runner's
        write, fenced. Returns the delivery, or None when it had moved on."""

    # The quality gate's tallies (serve_app.services.quality): per model and metric, counters and
    # a score histogram, each a named number. Not job records: unfenced, never expired.

    @abstractmethod
    def add_quality(self, model: str, metric: str, increments: dict[str, float]) -> None:
        """Add each increment to the named number of (`model`, `metric`), atomically."""

    @abstractmethod
    def quality_tallies(self) -> dict[tuple[str, str], dict[str, float]]:
        """Every (model, metric) recorded, with its named numbers."""

    # What follows is built on the primitives above, so both stores share it.

    def retry_or_fail(self, job: Job, reason: str, retry_limit: int, now: float | None = None) -> Job | None:
        """End a running attempt that did not finish: back to the queue while retries are left
        (`retry_limit` re-runs after the first), else failed; cancelled if a cancel was asked for."""
        if job.cancel_requested:
            return self.transition(job.id, {RUNNING}, CANCELLED, attempt=job.attempts,
                                   reason=f"cancelled; {reason}", now=now)
        if job.attempts <= retry_limit:
            return self.transition(job.id, {RUNNING}, QUEUED, attempt=job.attempts,
                                   reason=f"{reason}; retrying (attempt {job.attempts + 1} of {retry_limit + 1})",
                                   now=now)
        error = f"{reason}; gave up after {job.attempts} attempt{'s' if job.attempts != 1 else ''}"
        return self.transition(job.id, {RUNNING}, FAILED, attempt=job.attempts, reason=reason, error=error, now=now)

    def requeue_unspent(self, job: Job, reason: str, now: float | None = None) -> Job | None:
        """End a running attempt that never got capacity (back-pressure, no replica): back to the
        queue, in its place, without spending the attempt; cancelled if a cancel was asked for."""
        if job.cancel_requested:
            return self.transition(job.id, {RUNNING}, CANCELLED, attempt=job.attempts,
                                   reason=f"cancelled; {reason}", now=now)
        return self.transition(job.id, {RUNNING}, QUEUED, attempt=job.attempts, refund_attempt=True,
                               reason=f"{reason}; back in the queue (the attempt is not counted)", now=now)

    def requeue_running(self, retry_limit: int, reason: str, now: float | None = None) -> list[Job]:
        """At start-up: every job left running by a runner that is gone is retried or failed."""
        changed = []
        for job in self.list(state=RUNNING, limit=1_000_000):
            moved = self.retry_or_fail(job, reason, retry_limit, now=now)
            if moved is not None:
                changed.append(moved)
        return changed


def _now(now: float | None) -> float:
    return time.time() if now is None else now

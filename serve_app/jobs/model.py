"""The job record: what a store keeps for each job, and the states it moves through.

    queued ──claim──> running ──result──> succeeded
      │  ^               │ └──error / interrupted, attempts left──> queued (retry, reason kept)
      │  └───────────────┘ └──error, no attempts left──> failed
      └──cancel──> cancelled <──cancel (the run stops at the next denoising step)── running

Every change appends to `history` (state, time, attempt, reason), which is what GET /v1/jobs/{id}
reports as timings and retries, and what the event stream replays. One exception keeps it
bounded: requeues that spend no attempt (a run turned away for capacity, again and again while
the models are busy) coalesce into one `queued` entry with their count (`requeues`), the time
and reason of the last (see `with_requeue`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

QUEUED = "queued"
RUNNING = "running"
SUCCEEDED = "succeeded"
FAILED = "failed"
CANCELLED = "cancelled"
STATES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED)
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})
KINDS = ("image", "video")


@dataclass(frozen=True)
class ResultFile:
    """One file of a job's result, stored under the job id with a name fixed by the request."""

    name: str
    content_type: str
    size: int

    def to_dict(self) -> dict:
        return {"name": self.name, "content_type": self.content_type, "size": self.size}


@dataclass
class Job:
    """A job as a store returns it. Times are Unix seconds."""

    id: str
    kind: str
    state: str
    request: dict | None  # loaded only where it is needed: when a job is claimed to run
    seq: int  # submission order: the queue is first in, first out per kind
    version: int  # bumps on every write, so a watcher can tell what changed
    attempts: int  # runs started, the current one included
    created_at: float
    history: list[dict]
    idempotency_key: str | None = None  # as the store keeps it: scoped to the owner ("<owner>:<key>")
    owner: str | None = None  # the API key id that submitted it ("local" without keys; None: internal)
    group: str | None = None  # whose share of the GPU it runs in (fairness.group_of: the key's group, or the key)
    priority: str = "normal"  # low, normal or high: order within the group's own share (fairness.py)
    request_hash: str | None = None
    cancel_requested: bool = False
    started_at: float | None = None
    finished_at: float | None = None
    expires_at: float | None = None
    progress: dict | None = None
    error: str | None = None
    result: dict | None = None
    files: list[ResultFile] = field(default_factory=list)
    # Who is told when the job ends: its webhook and A2A push configs (see `webhooks`), each
    # {"id", "kind": "webhook"|"a2a", "url", "events", ...}; a delivery per target is recorded
    # atomically with the job's final state.
    targets: list[dict] = field(default_factory=list)
    deliveries: list[dict] = field(default_factory=list)  # filled by the dispatcher's status() only

    @property
    def finished(self) -> bool:
        return self.state in TERMINAL

    def file(self, name: str) -> ResultFile | None:
        return next((f for f in self.files if f.name == name), None)


def scoped_idempotency_key(owner: str | None, key: str | None) -> str | None:
    """Idempotency keys are per owner: two API keys sending the same one get two jobs. Key ids
    have no ':', so the scoped key cannot collide with another owner's."""
    if key is None or owner is None:
        return key
    return f"{owner}:{key}"


def unscoped_idempotency_key(owner: str | None, key: str | None) -> str | None:
    """The idempotency key as its caller sent it: `scoped_idempotency_key` undone."""
    if key is None or owner is None:
        return key
    return key.removeprefix(f"{owner}:")


class ActiveJobsExceeded(Exception):
    """An owner already has `limit` jobs queued or running."""

    def __init__(self, owner: str, limit: int):
        super().__init__(f"{owner} has {limit} jobs queued or running")
        self.owner = owner
        self.limit = limit


EVENTS = {SUCCEEDED: "job.succeeded", FAILED: "job.failed", CANCELLED: "job.cancelled"}
PENDING, DELIVERED, GAVE_UP = "pending", "delivered", "failed"  # a delivery's states


def new_deliveries(job_id: str, owner: str | None, targets: list[dict], state: str, now: float) -> list[dict]:
    """The deliveries a job's end makes: one per target that wants the event, due at once. The id
    (the webhook-id a receiver deduplicates on) is fixed here, so every retry carries the same one."""
    event = EVENTS[state]
    return [{"id": f"msg_{job_id}_{index}", "job_id": job_id, "owner": owner, "target": target, "event": event,
             "state": PENDING, "attempts": 0, "next_at": now, "created_at": now, "last_status": None,
             "last_error": None, "delivered_at": None}
            for index, target in enumerate(targets) if event in target.get("events", EVENTS.values())]
class QueuedJobsExceeded(Exception):
    """An owner already has `limit` jobs queued (its key's limits.queued_jobs)."""

    def __init__(self, owner: str, limit: int):
        super().__init__(f"{owner} has {limit} jobs queued")
        self.owner = owner
        self.limit = limit


def history_entry(state: str, at: float, attempt: int, reason: str | None = None) -> dict:
    entry: dict[str, Any] = {"state": state, "at": at, "attempt": attempt}
    if reason:
        entry["reason"] = reason
    return entry


def dumps(value: Any) -> str:
    """Compact JSON, as every store writes it."""
    return json.dumps(value, separators=(",", ":"))


def with_requeue(history: list[dict], entry: dict) -> list[dict]:
    """`history` with `entry` added, a requeue that spent no attempt: when the entries before it
    are such a requeue and the claim it ended, that pair becomes this entry, its count one more
    (so a job claimed and put back N times keeps 2 entries for it, not 2N). The stores do this
    atomically with the change (the Redis store in its Lua script, the same way)."""
    if len(history) >= 2 and history[-1]["state"] == RUNNING and history[-2].get("requeues"):
        return [*history[:-2], {**entry, "requeues": history[-2]["requeues"] + 1}]
    return [*history, {**entry, "requeues": 1}]

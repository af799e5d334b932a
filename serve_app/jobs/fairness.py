"""Weighted fair queueing across keys: which queued job a free slot takes next.

Each job belongs to a *group*: its API key's `group` in the keys file, else the key id itself
("local" without keys). Each group has a weight (the keys file's `groups:`; 1 when unnamed; 0
pauses it). The store keeps, per group, the GPU-seconds its finished jobs spent, decayed with a
half-life (`usage`), so "recent" GPU time counts and old history fades.

When a slot frees, the store's claim (one transaction on SQLite, one Lua script on Redis, so two
runners never take the same job) picks:

1. the group with the least *normalised cost*: (decayed GPU-seconds + running jobs x its mean
   seconds per job) / weight; its running jobs count at once, so a burst of claims does not all
   go to the same group before any of them finishes. Weight 0: never picked.
2. within that group, the job with the smallest *virtual time*: its submit time, minus
   `priority_age_s` for `high`, plus it for `low`. So order is first in, first out within a
   priority, a high job goes ahead of normal ones up to `priority_age_s` older, and a low job is
   passed over only by jobs submitted less than `priority_age_s` after it: it ages into the
   queue's front, never waits forever. Priority moves jobs within their own group's share only.

Every group with a positive weight gets its turn: the others' cost grows with each job they run
while its own decays, so a waiting group's cost becomes the least. This module holds the
arithmetic both stores share (SQLite runs it in Python inside its transaction; the Lua script
mirrors `cost` and `virtual_time`) and the simulation behind queue positions and start estimates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

PRIORITIES = ("low", "normal", "high")
PRIORITY_RANK = {name: rank for rank, name in enumerate(PRIORITIES)}
LOCAL_GROUP = "local"  # jobs without an owner's key (no keys file, or internal)
DEFAULT_ESTIMATE_S = 1.0  # a group's seconds per job before any of its jobs finished


@dataclass(frozen=True)
class FairPolicy:
    """What the claim needs besides the store's own records: weights and the two time constants."""

    weights: dict[str, float] = field(default_factory=dict)
    default_weight: float = 1.0
    half_life_s: float = 300.0
    priority_age_s: float = 120.0
    estimate_s: float = DEFAULT_ESTIMATE_S

    def weight(self, group: str) -> float:
        return self.weights.get(group, self.default_weight)

    def to_json(self) -> dict:
        """For the Redis claim script (cjson): weights as a map, the rest as numbers."""
        return {"weights": self.weights, "default": self.default_weight,
                "half_life": self.half_life_s, "age": self.priority_age_s, "estimate": self.estimate_s}


@dataclass
class GroupUsage:
    """A group's decayed GPU-seconds and job count (as of `at`), and its jobs running now."""

    seconds: float = 0.0
    jobs: float = 0.0
    at: float = 0.0
    running: int = 0

    def decayed(self, now: float, half_life_s: float) -> tuple[float, float]:
        factor = decay(now - self.at, half_life_s)
        return self.seconds * factor, self.jobs * factor

    def per_job(self, policy: FairPolicy) -> float:
        return self.seconds / self.jobs if self.jobs > 0 else policy.estimate_s


def decay(elapsed_s: float, half_life_s: float) -> float:
    return math.pow(0.5, max(0.0, elapsed_s) / half_life_s)


def group_of(owner: str | None, group: str | None = None) -> str:
    return group or owner or LOCAL_GROUP


def virtual_time(created_at: float, priority: int, priority_age_s: float) -> float:
    """The within-group order key: submit time shifted by priority (high earlier, low later)."""
    return created_at + (1 - priority) * priority_age_s


def cost(usage: GroupUsage | None, weight: float, now: float, policy: FairPolicy) -> float:
    """A group's normalised cost; the least goes next (weight > 0 only)."""
    if usage is None:
        return 0.0
    seconds, _ = usage.decayed(now, policy.half_life_s)
    return (seconds + usage.running * usage.per_job(policy)) / weight


@dataclass(frozen=True)
class Queued:
    """A queued job as the fair order sees it."""

    id: str
    group: str
    created_at: float
    priority: int  # PRIORITY_RANK
    seq: int

    def order(self, policy: FairPolicy) -> tuple[float, int]:
        return virtual_time(self.created_at, self.priority, policy.priority_age_s), self.seq


def fair_order(queued: list[Queued], usage: dict[str, GroupUsage], policy: FairPolicy, now: float,
               limit: int = 2000) -> list[Queued]:
    """The order the claim would take these jobs in if nothing else changed: each pick charges its
    group one job at the group's mean seconds per job (as a running job does). Paused groups'
    jobs are left out. At most `limit` picks, so a status read stays cheap under a deep queue."""
    lanes: dict[str, list[Queued]] = {}
    for job in sorted(queued, key=lambda job: job.order(policy)):
        if policy.weight(job.group) > 0:
            lanes.setdefault(job.group, []).append(job)
    charged = {group: 0.0 for group in lanes}
    heads = {group: 0 for group in lanes}
    order: list[Queued] = []
    while lanes and len(order) < limit:
        def key(group: str) -> tuple:
            head = lanes[group][heads[group]]
            return (cost(usage.get(group), policy.weight(group), now, policy) + charged[group] / policy.weight(group),
                    *head.order(policy))

        group = min(lanes, key=key)
        order.append(lanes[group][heads[group]])
        charged[group] += (usage.get(group) or GroupUsage()).per_job(policy)
        heads[group] += 1
        if heads[group] == len(lanes[group]):
            del lanes[group]
    return order


def pick(heads: list[Queued], usage: dict[str, GroupUsage], policy: FairPolicy, now: float) -> Queued | None:
    """The job a claim takes among each group's first job (`heads`), or None (all paused)."""
    return next(iter(fair_order(heads, usage, policy, now, limit=1)), None)


def shares(usage: dict[str, GroupUsage], now: float, half_life_s: float) -> dict[str, float]:
    """Each group's fraction of the recent (decayed) GPU-seconds."""
    decayed = {group: use.decayed(now, half_life_s)[0] for group, use in usage.items()}
    total = sum(decayed.values())
    return {group: (seconds / total if total > 0 else 0.0) for group, seconds in decayed.items()}

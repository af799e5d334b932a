"""Per-key rate limits and quotas on the `limits` library's storage (memory:// or redis://).

- requests per minute: `limits`' moving window: at most N requests in any 60 s (no burst of 2N
  across a window edge, which a fixed window allows). The issue asked for a token bucket; a moving
  window of N per minute admits the same sustained rate with a burst of at most N.
- concurrent synchronous requests: a counter incremented on entry and decremented on exit (it
  expires after `hold_s`, so a replica that dies mid-request cannot leave it stuck).
- per client (auth.client_limits): the same concurrency counter and a moving window of
  synchronous requests, keyed by the API key or, without one, by `addr:<remote address>`.
- daily images: a fixed window of one day, charged with the request's image count when it is
  accepted (a video charges its frames). Images are what a client asks for and can predict;
  GPU-seconds are only known afterwards and differ by GPU, so a budget in them could not be checked
  before the work starts.
- active jobs (queued + running) are counted by the job store itself, atomically with the submit.

One storage for every Ingress replica (redis:// in clusters) makes the limits shared; memory://
keeps them in one process and is refused with more than one Ingress replica (serve_app.config).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from limits import RateLimitItemPerDay, RateLimitItemPerMinute
from limits.storage import storage_from_string
from limits.strategies import FixedWindowRateLimiter, MovingWindowRateLimiter

from serve_app.security.keys import KeyLimits

NAMESPACE = "genserve-limits"


@dataclass(eq=False)
class LimitExceeded(Exception):
    """Over a limit: which one, the limit's value, and when a retry can succeed (Unix seconds)."""

    limit: str
    value: int
    reset_at: float
    detail: str

    def retry_after(self, now: float | None = None) -> int:
        now = time.time() if now is None else now
        return max(1, math.ceil(self.reset_at - now))

    def body(self) -> dict:
        return {"detail": self.detail, "limit": self.limit, "value": self.value, "reset_at": round(self.reset_at, 3),
                "retry_after_s": self.retry_after()}


class KeyLimiter:
    def __init__(self, storage_uri: str, hold_s: float = 1200.0, password: str | None = None):
        self.storage_uri = storage_uri
        # `password`: the Redis password from the environment or a file, never in the URI (a deployment argument).
        self.storage = storage_from_string(storage_uri, **({} if password is None else {"password": password}))
        self.moving = MovingWindowRateLimiter(self.storage)
        self.fixed = FixedWindowRateLimiter(self.storage)
        self.hold_s = hold_s
        self.local = storage_uri.startswith("memory")

    def _concurrency_key(self, key_id: str) -> str:
        return f"{NAMESPACE}/concurrent/{key_id}"

    def hit_request(self, key_id: str, limits: KeyLimits) -> None:
        if limits.requests_per_minute is None:
            return
        item = RateLimitItemPerMinute(limits.requests_per_minute, namespace=NAMESPACE)
        if not self.moving.hit(item, "rpm", key_id):
            reset = self.moving.get_window_stats(item, "rpm", key_id).reset_time
            raise LimitExceeded("requests_per_minute", limits.requests_per_minute, reset,
                                f"rate limit: {limits.requests_per_minute} requests per minute for this key")

    def acquire(self, key_id: str, limits: KeyLimits, default: int | None = None, who: str = "this key") -> bool:
        """Take a concurrent-request slot of `key_id` (a key id, or a client address): at most
        `limits.concurrent_requests`, else `default` (auth.client_limits). False when none is needed."""
        allowed = limits.concurrent_requests if limits.concurrent_requests is not None else default
        if allowed is None:
            return False
        key = self._concurrency_key(key_id)
        if self.storage.incr(key, int(self.hold_s)) > allowed:
            self.storage.incr(key, int(self.hold_s), -1)
            raise LimitExceeded("concurrent_requests", allowed, time.time() + 1,
                                f"concurrency limit: {allowed} synchronous requests at once "
                                f"for {who}; retry when one finishes")
        return True

    def hit_sync(self, client: str, per_minute: int | None) -> None:
        """Count a synchronous request of `client` against auth.client_limits.requests_per_minute
        (a window of its own: a key's requests_per_minute counts every request, this only these)."""
        if per_minute is None:
            return
        item = RateLimitItemPerMinute(per_minute, namespace=NAMESPACE)
        if not self.moving.hit(item, "sync-rpm", client):
            reset = self.moving.get_window_stats(item, "sync-rpm", client).reset_time
            raise LimitExceeded("sync_requests_per_minute", per_minute, reset,
                                f"rate limit: {per_minute} synchronous requests per minute for this client "
                                "(auth.client_limits)")

    def release(self, key_id: str) -> None:
        self.storage.incr(self._concurrency_key(key_id), int(self.hold_s), -1)

    def charge_images(self, key_id: str, limits: KeyLimits, images: int) -> None:
        if limits.daily_images is None:
            return
        item = RateLimitItemPerDay(limits.daily_images, namespace=NAMESPACE)
        refused = images > limits.daily_images
        if not refused and not self.fixed.hit(item, "daily", key_id, cost=images):
            # `limits` counts a refused hit too; give it back, so a refusal costs nothing.
            self.storage.incr(item.key_for("daily", key_id), item.get_expiry(), -images)
            refused = True
        if refused:
            stats = self.fixed.get_window_stats(item, "daily", key_id)
            raise LimitExceeded("daily_images", limits.daily_images, stats.reset_time,
                                f"daily budget: {limits.daily_images} images per day for this key "
                                f"({stats.remaining} left today; this request needs {images})")

    def refund_images(self, key_id: str, limits: KeyLimits, images: int) -> None:
        """Give back a charge for work that was not done (a replayed idempotent submit)."""
        if limits.daily_images is None:
            return
        item = RateLimitItemPerDay(limits.daily_images, namespace=NAMESPACE)
        self.storage.incr(item.key_for("daily", key_id), item.get_expiry(), -images)

    def usage(self, key_id: str, limits: KeyLimits) -> dict:
        """What a key has used of each limit it has, now."""
        used: dict = {"concurrent_requests": max(0, self.storage.get(self._concurrency_key(key_id)))}
        if limits.requests_per_minute is not None:
            item = RateLimitItemPerMinute(limits.requests_per_minute, namespace=NAMESPACE)
            used["requests_last_minute"] = item.amount - self.moving.get_window_stats(item, "rpm", key_id).remaining
        if limits.daily_images is not None:
            item = RateLimitItemPerDay(limits.daily_images, namespace=NAMESPACE)
            stats = self.fixed.get_window_stats(item, "daily", key_id)
            used["images_today"] = item.amount - stats.remaining
            used["daily_reset_at"] = stats.reset_time
        return used

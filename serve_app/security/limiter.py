"""Per-key rate limits and quotas on the `limits` library's storage (memory:// or redis://).

- requests per minute: `limits`' moving window: at most N requests in any 60 s (no burst of 2N
  across a window edge, which a fixed window allows). The issue asked for a token bucket; a moving
  window of N per minute admits the same sustained rate with a burst of at most N.
- concurrent synchronous requests: each request in flight takes a hold with its own expiry,
  `hold_s` (longer than any request may run) after it started, and gives it back when it ends; a
  client's count is its live holds. A replica that dies mid-request cannot leave a slot stuck
  (its hold expires), and a client that always has requests in flight is counted exactly. (A
  single counter with one expiry could not do both: `limits`' `incr` sets the expiry only when
  the counter leaves 0, so under continuous traffic it vanished after `hold_s`, went negative on
  the releases, and the client's limit grew.)
- per client (auth.client_limits): the same concurrency counter and a moving window of
  synchronous requests, keyed by the API key or, without one, by `addr:<remote address>`.
- signed file downloads (no key sent): a moving window per client address.
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
import threading
import time
import uuid
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


class _LocalHolds:
    """memory://: each client's holds (token -> expiry time), in this process."""

    def __init__(self):
        self._holds: dict[str, dict[str, float]] = {}
        self._lock = threading.Lock()

    def _live(self, key: str, now: float) -> dict[str, float]:
        holds = {token: until for token, until in self._holds.get(key, {}).items() if until > now}
        if holds:
            self._holds[key] = holds
        else:
            self._holds.pop(key, None)
        return holds

    def take(self, key: str, allowed: int, hold_s: float) -> str | None:
        now = time.time()
        with self._lock:
            holds = self._live(key, now)
            if len(holds) >= allowed:
                return None
            token = uuid.uuid4().hex
            self._holds[key] = {**holds, token: now + hold_s}
            return token

    def give_back(self, key: str, token: str) -> None:
        with self._lock:
            holds = self._holds.get(key, {})
            holds.pop(token, None)
            if not holds:
                self._holds.pop(key, None)

    def count(self, key: str) -> int:
        with self._lock:
            return len(self._live(key, time.time()))


# KEYS[1]: a client's holds, a sorted set of tokens by expiry (ms). Expired holds are dropped,
# and a new one taken only below the limit, in one step, so concurrent requests cannot overshoot.
_TAKE = """
local now, allowed, hold, token = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= allowed then return 0 end
redis.call('ZADD', KEYS[1], now + hold, token)
redis.call('PEXPIRE', KEYS[1], hold)  -- the newest hold is the last to expire: the set goes with it
return 1
"""


class _RedisHolds:
    """redis:// (and sentinel): the holds in the limits storage's Redis, shared by every Ingress replica."""

    def __init__(self, storage):
        self.storage = storage
        self._take = storage.get_connection().register_script(_TAKE)

    def _key(self, key: str) -> str:
        return self.storage.prefixed_key(key)

    def take(self, key: str, allowed: int, hold_s: float) -> str | None:
        token = uuid.uuid4().hex
        taken = self._take(keys=[self._key(key)], args=[_millis(time.time()), allowed, _millis(hold_s), token],
                           client=self.storage.get_connection())
        return token if taken else None

    def give_back(self, key: str, token: str) -> None:
        self.storage.get_connection().zrem(self._key(key), token)

    def count(self, key: str) -> int:
        return int(self.storage.get_connection().zcount(self._key(key), f"({_millis(time.time())}", "+inf"))


def _millis(seconds: float) -> int:
    return int(seconds * 1000)


class KeyLimiter:
    def __init__(self, storage_uri: str, hold_s: float = 1200.0, password: str | None = None):
        self.storage_uri = storage_uri
        # `password`: the Redis password from the environment or a file, never in the URI (a deployment argument).
        self.storage = storage_from_string(storage_uri, **({} if password is None else {"password": password}))
        self.moving = MovingWindowRateLimiter(self.storage)
        self.fixed = FixedWindowRateLimiter(self.storage)
        self.hold_s = hold_s
        self.local = storage_uri.startswith("memory")
        if self.local:
            self.holds = _LocalHolds()
        elif hasattr(self.storage, "get_connection") and hasattr(self.storage, "prefixed_key"):
            self.holds = _RedisHolds(self.storage)
        else:
            raise ValueError(f"auth.limits_storage: {storage_uri.split(':', 1)[0]}:// is not supported; "
                             "use memory:// or redis://")

    def _concurrency_key(self, key_id: str) -> str:
        return f"{NAMESPACE}/holds/{key_id}"

    def hit_request(self, key_id: str, limits: KeyLimits) -> None:
        if limits.requests_per_minute is None:
            return
        item = RateLimitItemPerMinute(limits.requests_per_minute, namespace=NAMESPACE)
        if not self.moving.hit(item, "rpm", key_id):
            reset = self.moving.get_window_stats(item, "rpm", key_id).reset_time
            raise LimitExceeded("requests_per_minute", limits.requests_per_minute, reset,
                                f"rate limit: {limits.requests_per_minute} requests per minute for this key")

    def acquire(self, key_id: str, limits: KeyLimits, default: int | None = None, who: str = "this key") -> str | None:
        """Take a concurrent-request slot of `key_id` (a key id, or a client address): at most
        `limits.concurrent_requests`, else `default` (auth.client_limits). Returns the hold's token,
        to give to `release` when the request ends; None when no slot is needed."""
        allowed = limits.concurrent_requests if limits.concurrent_requests is not None else default
        if allowed is None:
            return None
        token = self.holds.take(self._concurrency_key(key_id), allowed, self.hold_s)
        if token is None:
            raise LimitExceeded("concurrent_requests", allowed, time.time() + 1,
                                f"concurrency limit: {allowed} synchronous requests at once "
                                f"for {who}; retry when one finishes")
        return token

    def hit_sync(self, client: str, per_minute: int | None) -> None:
        """Count a synchronous request of `client` against auth.client_limits.requests_per_minute
        (a window of its own: a key's requests_per_minute counts every request, this only these)."""
        self._hit_window("sync-rpm", client, per_minute, "sync_requests_per_minute",
                         f"rate limit: {per_minute} synchronous requests per minute for this client "
                         "(auth.client_limits)")

    def hit_download(self, address: str, per_minute: int | None) -> None:
        """Count a signed file download (no key sent) of a client address against
        auth.signed_downloads_per_minute: a leaked URL cannot be fetched without bound."""
        self._hit_window("signed-rpm", address, per_minute, "signed_downloads_per_minute",
                         f"rate limit: {per_minute} signed file downloads per minute for this client address "
                         "(auth.signed_downloads_per_minute)")

    def _hit_window(self, window: str, client: str, per_minute: int | None, limit: str, detail: str) -> None:
        if per_minute is None:
            return
        item = RateLimitItemPerMinute(per_minute, namespace=NAMESPACE)
        if not self.moving.hit(item, window, client):
            reset = self.moving.get_window_stats(item, window, client).reset_time
            raise LimitExceeded(limit, per_minute, reset, detail)

    def release(self, key_id: str, token: str) -> None:
        """Give back the hold `acquire` took (once the request has ended)."""
        self.holds.give_back(self._concurrency_key(key_id), token)

    def in_flight(self, key_id: str) -> int:
        """How many concurrent-request slots `key_id` holds now."""
        return self.holds.count(self._concurrency_key(key_id))

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
        used: dict = {"concurrent_requests": self.in_flight(key_id)}
        if limits.requests_per_minute is not None:
            item = RateLimitItemPerMinute(limits.requests_per_minute, namespace=NAMESPACE)
            used["requests_last_minute"] = item.amount - self.moving.get_window_stats(item, "rpm", key_id).remaining
        if limits.daily_images is not None:
            item = RateLimitItemPerDay(limits.daily_images, namespace=NAMESPACE)
            stats = self.fixed.get_window_stats(item, "daily", key_id)
            used["images_today"] = item.amount - stats.remaining
            used["daily_reset_at"] = stats.reset_time
        return used

"""When the client may send a call again, and how long it waits first.

Retried: 503 and 429 (Serve's back-pressure past `max_queued_requests`, a replica being replaced)
and connection failures before anything was sent, and only for calls that are safe to repeat:
reads, scoring and enhancing (no side effects), generation with a `seed` (the same images again),
and job submits with an `Idempotency-Key` (the server answers a repeat with the first job).
The wait is the server's `Retry-After` when it gives one, else exponential back-off from
`backoff_s`; the sum of waits stays under `max_wait_s`, after which the last answer is raised.
"""

from __future__ import annotations

import email.utils
import time
from dataclasses import dataclass

RETRY_STATUSES = frozenset({429, 503})


@dataclass(frozen=True)
class RetryPolicy:
    max_wait_s: float = 60.0  # total seconds spent waiting between attempts, per call
    backoff_s: float = 0.5  # the first wait when the server gives no Retry-After; doubles each time
    max_backoff_s: float = 10.0

    def delay(self, attempt: int, retry_after_s: float | None) -> float:
        """Seconds to wait before attempt `attempt + 1` (attempts count from 1)."""
        if retry_after_s is not None:
            return max(0.0, retry_after_s)
        return min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1))


def retry_after(value: str | None, now: float | None = None) -> float | None:
    """Retry-After in seconds: either delta-seconds or an HTTP date (RFC 9110 10.2.3)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))

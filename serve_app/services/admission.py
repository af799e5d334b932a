"""Admission control: a request the model cannot take is turned away before any work is done.

Serve bounds each model deployment's queue per caller (`max_queued_requests`) and rejects past it,
but only when the call reaches the model's router: after the ingress has planned the request and
the enhancer has run. Under a storm of clients that retry at once, that work is done again and
again for nothing, and the rejections queue behind it. So each ingress replica (and job runner)
counts its requests in flight per image model and, past what the model's deployment holds for one
caller (replicas x max_ongoing_requests + max_queued_requests, `limit_of`), answers the same 503 with
the same Retry-After at once. Only a bound: requests inside it go on to Serve's router and queue
there, as before; a model without a bounded queue (max_queued_requests -1 or unset) is not checked.
"""

from __future__ import annotations

import collections
import contextlib
from typing import Iterator

from serve_app.services.graph import Overloaded


class Admission:
    def __init__(self, limits: dict[str, tuple[int, float]]):
        """`limits`: image model id -> (requests in flight at most, Retry-After seconds)."""
        self._limits = limits
        self._in_flight: collections.Counter[str] = collections.Counter()

    def in_flight(self, model: str) -> int:
        return self._in_flight[model]

    @contextlib.contextmanager
    def admitted(self, model: str) -> Iterator[None]:
        """Hold one of `model`'s places for the block, or raise `Overloaded` (503) at once when none is free."""
        limit = self._limits.get(model)
        if limit is not None and self._in_flight[model] >= limit[0]:
            raise Overloaded("generate", 503, limit[1])
        self._in_flight[model] += 1
        try:
            yield
        finally:
            self._in_flight[model] -= 1

"""What the quality gate has seen: how each model scores, and what its gate costs.

Per model and gate metric, a tally of named numbers:
- `b<i>`: images whose score fell in bin i of the metric's range (`BINS` equal bins): the score
  distribution, from which a `quality_percentile` becomes a threshold;
- `first_images`, `first_passed`: images of a request's first round, and those that passed;
- `generated`, `accepted`: every image generated, and the returned images that passed;
- `device_seconds`: what the generator reported spending on them (GPU time on a GPU).
Bins are tallied for every gate metric an image was scored on; the counters only for the metric
that gated its request.

Where jobs are deployed the tallies live in the job store (`serve_app.jobs.quality`), so every
replica and a restart see the same; without jobs, in this process (`MemoryQualityBook`). A profile
ships a starting calibration (`policy.calibration`, written by `genserve calibrate`): bins only,
added to what the server sees, so a percentile works on a fresh server.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path

from deployments.names import SCORE_RANGES

logger = logging.getLogger(__name__)

BINS = 10_000  # a ten-thousandth of the metric's range: tiny random models score within a narrow band
MIN_SAMPLES = 20  # fewer scored images than this make no calibration
SUMMARY_PERCENTILES = (10, 50, 70, 90)

Tally = dict[str, float]
Calibration = dict[str, dict[str, dict[int, float]]]  # model -> metric -> bin -> images


def bin_of(metric: str, value: float) -> int:
    low, high = SCORE_RANGES[metric]
    return min(BINS - 1, max(0, int((value - low) / (high - low) * BINS)))


def bins_of(tally: Mapping[str, float]) -> dict[int, float]:
    return {int(name[1:]): count for name, count in tally.items() if name.startswith("b") and count > 0}


def score_at(metric: str, bins: Mapping[int, float], percentile: float) -> float | None:
    """The score that `percentile` percent of the tallied images fall below (linear within a bin);
    None with fewer than MIN_SAMPLES images."""
    total = sum(bins.values())
    if total < MIN_SAMPLES:
        return None
    low, high = SCORE_RANGES[metric]
    width = (high - low) / BINS
    target, seen = percentile / 100 * total, 0.0
    for index in sorted(bins):
        count = bins[index]
        if seen + count >= target:
            return low + width * (index + (target - seen) / count)
        seen += count
    return low + width * (max(bins) + 1)


def add_into(into: dict, increments: Mapping[str, float]) -> None:
    for name, value in increments.items():
        into[name] = into.get(name, 0.0) + value


def tally_of(metric: str, first_images: int, first_passed: int, generated: list[dict], accepted: int,
             device_seconds: float) -> dict[str, Tally]:
    """The increments one request adds, by metric: `generated` holds every image's scores."""
    tallies: dict[str, Tally] = {}
    for scores in generated:
        for name, value in scores.items():
            if name in SCORE_RANGES and isinstance(value, (int, float)):
                add_into(tallies.setdefault(name, {}), {f"b{bin_of(name, value)}": 1.0})
    add_into(tallies.setdefault(metric, {}), {
        "first_images": first_images, "first_passed": first_passed, "generated": len(generated),
        "accepted": accepted, "device_seconds": device_seconds,
    })
    return tallies


def load_calibration(path: str | None) -> Calibration:
    """A calibration file (`genserve calibrate`): {"bins": BINS, "models": {model: {metric: {bin: images}}}}."""
    if path is None:
        return {}
    data = json.loads(Path(path).read_text())
    if data.get("bins") != BINS:
        raise ValueError(f"{path}: calibrated with {data.get('bins')} bins; this version reads {BINS} "
                         "(run genserve calibrate again)")
    return {model: {metric: {int(index): float(count) for index, count in bins.items()}
                    for metric, bins in metrics.items() if metric in SCORE_RANGES}
            for model, metrics in data["models"].items()}


def figures(metric: str, seen: Mapping[str, float], starting: Mapping[int, float]) -> dict:
    """The summary of one model and metric: pass rate, cost per accepted image, score percentiles."""
    accepted = seen.get("accepted", 0.0)
    bins = dict(starting)
    add_into(bins, bins_of(seen))

    def ratio(top: float, bottom: float) -> float | None:
        return round(top / bottom, 4) if bottom else None

    return {
        "scored_images": int(sum(bins_of(seen).values())),
        "calibration_images": int(sum(starting.values())),
        "first_attempt_images": int(seen.get("first_images", 0)),
        "first_attempt_pass_rate": ratio(seen.get("first_passed", 0.0), seen.get("first_images", 0.0)),
        "generated_images": int(seen.get("generated", 0)),
        "accepted_images": int(accepted),
        "attempts_per_accepted_image": ratio(seen.get("generated", 0.0), accepted),
        "device_seconds_per_accepted_image": ratio(seen.get("device_seconds", 0.0), accepted),
        "percentiles": {str(p): _rounded(score_at(metric, bins, p)) for p in SUMMARY_PERCENTILES},
    }


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


class QualityBook(ABC):
    """The tallies, read and added to; `starting`: the profile's calibration. Reads are cached for
    `refresh_s` (a percentile request reads the calibration; a few seconds stale is fine)."""

    def __init__(self, starting: Calibration | None = None, refresh_s: float = 5.0):
        self.starting = starting or {}
        self.refresh_s = refresh_s
        self._cache: tuple[float, dict] | None = None
        self._pending: set[asyncio.Task] = set()

    @abstractmethod
    async def _add(self, model: str, metric: str, increments: Tally) -> None: ...

    @abstractmethod
    async def _read(self) -> dict[tuple[str, str], Tally]: ...

    async def tallies(self) -> dict[tuple[str, str], Tally]:
        if self._cache is None or time.monotonic() - self._cache[0] > self.refresh_s:
            self._cache = (time.monotonic(), await self._read())
        return self._cache[1]

    async def add(self, model: str, tallies: Mapping[str, Tally]) -> None:
        for metric, increments in tallies.items():
            await self._add(model, metric, increments)
        self._cache = None

    def add_later(self, model: str, tallies: Mapping[str, Tally]) -> None:
        """Add off the request's path: a failure is logged, never the request's."""
        task = asyncio.get_running_loop().create_task(self._add_logged(model, tallies))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _add_logged(self, model: str, tallies: Mapping[str, Tally]) -> None:
        try:
            await self.add(model, tallies)
        except Exception:  # the gate's bookkeeping must never fail an image that was made
            logger.exception("could not record the quality tallies of a %s request", model)

    async def drain(self) -> None:
        """Wait for the additions under way (tests, benchmarks, a calibration run)."""
        while self._pending:
            await asyncio.gather(*list(self._pending))

    async def calibration(self, model: str, metric: str) -> dict[int, float]:
        """The score histogram a percentile of `model`'s `metric` is read from: shipped plus seen."""
        bins = dict(self.starting.get(model, {}).get(metric, {}))
        add_into(bins, bins_of((await self.tallies()).get((model, metric), {})))
        return bins

    async def summary(self, models: list[str] | None = None) -> dict[str, dict[str, dict]]:
        """model -> metric -> figures, for the models with a calibration or anything seen."""
        tallies = await self.tallies()
        keys = {*tallies, *((model, metric) for model, metrics in self.starting.items() for metric in metrics)}
        result: dict[str, dict[str, dict]] = {}
        for model, metric in sorted(keys):
            if models is None or model in models:
                starting = self.starting.get(model, {}).get(metric, {})
                result.setdefault(model, {})[metric] = figures(metric, tallies.get((model, metric), {}), starting)
        return result


class MemoryQualityBook(QualityBook):
    """The tallies of this process only: where no job store is deployed, and in tests and benchmarks."""

    def __init__(self, starting: Calibration | None = None):
        super().__init__(starting, refresh_s=0.0)
        self._tallies: dict[tuple[str, str], Tally] = {}

    async def _add(self, model: str, metric: str, increments: Tally) -> None:
        add_into(self._tallies.setdefault((model, metric), {}), increments)

    async def _read(self) -> dict[tuple[str, str], Tally]:
        return {key: dict(value) for key, value in self._tallies.items()}

"""`genserve bench-scores`: what scoring a batch of images costs against scoring one.

Runs the config's `ClipScorer` class in this process (no Serve: the constant cost of a call through
Serve would only flatten the ratio) on random images of the config's default image size, one call
per batch, and prints p50/p95 per call, per image, and each batch size's p50 over batch 1's.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass

import numpy as np

from serve_app.appconfig import app_args_from_config


@dataclass
class BatchSample:
    batch: int
    seconds: list[float]

    @property
    def p50(self) -> float:
        return statistics.median(self.seconds)

    @property
    def p95(self) -> float:
        ordered = sorted(self.seconds)
        return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


def run_score_benchmark(config: str, batches: list[int], requests: int, warmup: int,
                        width: int | None = None, height: int | None = None) -> tuple[list[BatchSample], dict]:
    """Score `requests` calls of each batch size (after `warmup`), batch sizes interleaved so that
    load from elsewhere on the machine hits them alike."""
    from deployments.clip_scorer import ClipScorer

    args = app_args_from_config(config)
    width = width or args.flux.default_width
    height = height or args.flux.default_height
    scorer = ClipScorer.func_or_class(args.scorer, metrics=False)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(max(batches), height, width, 3), dtype=np.uint8)
    samples = {batch: BatchSample(batch, []) for batch in batches}

    async def run() -> None:
        for index in range(warmup + requests):
            for batch in batches:
                started = time.perf_counter()
                await scorer.score(images[:batch], "a lighthouse on a cliff at dusk")
                if index >= warmup:
                    samples[batch].seconds.append(time.perf_counter() - started)

    asyncio.run(run())
    setup = {"config": config, "width": width, "height": height, "scorer": args.scorer.source,
             "laion": args.scorer.laion_source if args.scorer.laion.enabled else "off", **scorer.info()}
    return list(samples.values()), setup


def format_score_table(samples: list[BatchSample]) -> str:
    baseline = samples[0]
    lines = [f"{'batch':>5}{'n':>5}{'p50 ms':>9}{'p95 ms':>9}{'ms/image':>10}{'p50 x batch ' + str(baseline.batch):>16}"]
    for sample in samples:
        lines.append(
            f"{sample.batch:>5}{len(sample.seconds):>5}{sample.p50 * 1000:>9.1f}{sample.p95 * 1000:>9.1f}"
            f"{sample.p50 * 1000 / sample.batch:>10.2f}{sample.p50 / baseline.p50:>16.2f}"
        )
    return "\n".join(lines)

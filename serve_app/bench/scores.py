"""`genserve bench-scores`: what scoring a batch of images costs against scoring one.

Runs the config's `ClipScorer` on random images of the config's default image size, one call per
batch, and prints p50/p95 per call, per image, and each batch size's p50 over batch 1's. First in
this process (the scorer's own cost), then, with `serve=True`, as a Serve replica with the config's
resources called through a handle (what the graph pays, images through the object store).
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass

import numpy as np

from serve_app.config import app_args_from_config


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


PROMPT = "a lighthouse on a cliff at dusk"


def run_score_benchmark(config: str, batches: list[int], requests: int, warmup: int,
                        width: int | None = None, height: int | None = None,
                        serve: bool = False) -> tuple[dict[str, list[BatchSample]], dict]:
    """Score `requests` calls of each batch size (after `warmup`), batch sizes interleaved so that
    load from elsewhere on the machine hits them alike. Returns samples by path."""
    from deployments.scoring.clip_scorer import ClipScorer

    args = app_args_from_config(config)
    model = args.image_model(args.default_model_id)
    default_width, default_height = model.model_family.size_default(model)
    width = width or default_width
    height = height or default_height
    scorer = ClipScorer.func_or_class(args.model_config_for("ClipScorer"), metrics=False)
    images = np.random.default_rng(0).integers(0, 256, size=(max(batches), height, width, 3), dtype=np.uint8)

    loop = asyncio.new_event_loop()  # one loop for every call, as a replica has
    try:
        paths = {"in-process": _measure(lambda batch: loop.run_until_complete(scorer.score(images[:batch], PROMPT)),
                                        batches, requests, warmup)}
    finally:
        loop.close()
    info = scorer.info()
    setup = {"config": config, "width": width, "height": height,
             "scorer": ", ".join(f"{entry.family} {entry.source}" for entry in args.served_scorers),
             "laion": info["laion_head"] or "off", **info}
    scorer = None  # frees the model before the served run
    if serve:
        paths["serve handle"] = _through_serve(args, images, batches, requests, warmup)
    return paths, setup


def _measure(call, batches: list[int], requests: int, warmup: int) -> list[BatchSample]:
    samples = {batch: BatchSample(batch, []) for batch in batches}
    for index in range(warmup + requests):
        for batch in batches:
            started = time.perf_counter()
            call(batch)
            if index >= warmup:
                samples[batch].seconds.append(time.perf_counter() - started)
    return list(samples.values())


def _through_serve(args, images: np.ndarray, batches: list[int], requests: int, warmup: int) -> list[BatchSample]:
    """ClipScorer alone as a Serve replica with the config's options, on a Ray of its own."""
    import os

    import ray
    from ray import serve

    from deployments.scoring.clip_scorer import ClipScorer

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    try:
        app = ClipScorer.options(**args.options_for("ClipScorer")).bind(args.model_config_for("ClipScorer"),
                                                                        metrics=False)
        handle = serve.run(app, name="bench-scores", route_prefix=None)
        return _measure(lambda batch: handle.score.remote(images[:batch], PROMPT).result(), batches, requests, warmup)
    finally:
        serve.shutdown()
        ray.shutdown()


def format_score_table(paths: dict[str, list[BatchSample]]) -> str:
    """Per path and batch size: p50/p95 per call, p50 per image, and p50 over the path's batch 1."""
    lines = [f"{'path':<14}{'batch':>6}{'n':>5}{'p50 ms':>9}{'p95 ms':>9}{'ms/image':>10}{'p50 x batch 1':>15}"]
    for path, samples in paths.items():
        baseline = samples[0]
        for sample in samples:
            lines.append(
                f"{path:<14}{sample.batch:>6}{len(sample.seconds):>5}{sample.p50 * 1000:>9.1f}"
                f"{sample.p95 * 1000:>9.1f}{sample.p50 * 1000 / sample.batch:>10.2f}{sample.p50 / baseline.p50:>15.2f}"
            )
    return "\n".join(lines)

"""`genserve bench --concurrency 1 8 64`: throughput and latency under concurrent clients, batching off and on.

The config's app runs on a Ray of its own, once per mode (the app is redeployed in place between
modes): with the default model's and the scorer's `batching` off, then on (`with_batching`: their
`max_ongoing_requests` raised to the batch size where lower, so a replica can hold a full batch). At each concurrency level, that many clients (genserve's own `AsyncClient`) send
`POST /v1/images` back to back until the level's requests are done. Each request has a seed, so
the client retries it after the server's `Retry-After` when a bounded queue turns it away (503 or
429), as any user of the client gets: its latency runs from the first send to the answer, and
the rejections are counted. Throughput is successful responses per second of wall time; p50/p95
are client-side latencies of the successful ones; a request that still failed counts as failed.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field

from serve_app.config import AppArgs


@dataclass
class Level:
    mode: str
    clients: int
    seconds: list[float] = field(default_factory=list)
    failures: int = 0
    wall_s: float = 0.0
    rejections: int = 0  # 503/429 answers the clients waited out and retried

    @property
    def throughput(self) -> float:
        return len(self.seconds) / self.wall_s if self.wall_s else 0.0

    def percentile(self, q: float) -> float:
        if not self.seconds:
            return float("nan")
        ordered = sorted(self.seconds)
        return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def with_batching(args: AppArgs, enabled: bool, max_batch_images: int, wait_ms: float) -> AppArgs:
    """`args` with the default model's and the scorer's batching set; on, their replicas take a full batch at once."""
    settings = {"enabled": enabled, "max_batch_images": max_batch_images, "wait_ms": wait_ms}
    entries = []
    for entry in args.image_models:
        if entry.id == args.default_model_id:
            deployment = entry.deployment.model_dump(exclude_unset=True)
            if enabled and (entry.deployment.max_ongoing_requests or 0) < max_batch_images:
                deployment["max_ongoing_requests"] = max_batch_images
            entry = type(entry).model_validate({**entry.model_dump(exclude_unset=True), "batching": settings,
                                                "deployment": deployment})
        entries.append(entry)
    deployments = dict(args.deployments)
    scorer_options = deployments.get("ClipScorer")
    if enabled and (scorer_options is None or (scorer_options.max_ongoing_requests or 0) < max_batch_images):
        base = scorer_options.model_dump(exclude_unset=True) if scorer_options is not None else {}
        deployments["ClipScorer"] = {**base, "max_ongoing_requests": max(max_batch_images, 8)}
    return AppArgs.model_validate({**args.model_dump(exclude_unset=True), "image_models": [
        entry.model_dump(exclude_unset=True) for entry in entries],
        "scores": {**args.scores.model_dump(exclude_unset=True), "batching": settings},
        "deployments": {name: (options if isinstance(options, dict) else options.model_dump(exclude_unset=True))
                        for name, options in deployments.items()}})


async def run_level(url: str, body: dict, mode: str, clients: int, requests: int, transport=None) -> Level:
    """`clients` concurrent clients sending `requests` requests in all (seeds 1000, 1001, ...);
    `transport`: httpx's, for tests."""
    from serve_app.client import AsyncClient, GenserveError

    level = Level(mode, clients)
    remaining = iter(range(requests))

    async def waiting_out_a_rejection(seconds: float) -> None:
        level.rejections += 1
        await asyncio.sleep(seconds)

    async def client() -> None:
        async with AsyncClient(url, timeout=600, sleep=waiting_out_a_rejection, transport=transport) as http:
            for index in remaining:
                started = time.perf_counter()
                try:
                    await http.images({**body, "seed": 1000 + index})
                except GenserveError:
                    level.failures += 1
                else:
                    level.seconds.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    level.wall_s = time.perf_counter() - started
    return level


def run_concurrency_benchmark(modes: list[tuple[str, AppArgs]], levels: list[int], requests: int, warmup: int,
                              width: int, height: int, steps: int, on_level=None) -> list[Level]:
    """Each mode's app in turn, on one Ray: at each level, max(requests, 2 x clients) requests after
    `warmup` alone. `on_level(level)` is called as each level finishes, so a run cut short still
    shows what it measured."""
    import httpx
    import ray
    from ray import serve

    from serve_app import APP_NAME
    from serve_app.bench.images import _free_port, _request_body
    from serve_app.builder import build_app

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    body = _request_body(width, height, steps)
    results = []
    # A cluster of its own: serve.shutdown() at the end must never stop someone else's apps.
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    try:
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        url = f"http://127.0.0.1:{port}"
        for mode, args in modes:
            serve.run(build_app(args), name=APP_NAME, route_prefix="/")
            with httpx.Client(base_url=url, timeout=300) as client:
                for _ in range(warmup):
                    client.post("/v1/images", json=body).raise_for_status()
            for clients in levels:
                level = asyncio.run(run_level(url, body, mode, clients, max(requests, 2 * clients)))
                results.append(level)
                if on_level is not None:
                    on_level(level)
    finally:
        serve.shutdown()
        ray.shutdown()
    return results


def format_concurrency_table(levels: list[Level]) -> str:
    """One row per mode and level: throughput, its ratio to the mode's first level (one client) and
    to the first mode at the same level, and latency percentiles."""
    first_mode = levels[0].mode if levels else ""
    baseline = {level.clients: level for level in levels if level.mode == first_mode}
    first = {}
    for level in levels:
        first.setdefault(level.mode, level)
    header = (f"{'mode':<32}{'clients':>8}{'ok':>6}{'fail':>6}{'503s':>6}{'img/s':>8}{'x 1st level':>12}"
              f"{'x 1st mode':>11}{'p50 ms':>9}{'p95 ms':>9}")
    lines = [header]
    for level in levels:
        base = first[level.mode].throughput
        same = baseline.get(level.clients)
        versus = level.throughput / same.throughput if same and same.throughput else float("nan")
        lines.append(
            f"{level.mode:<32}{level.clients:>8}{len(level.seconds):>6}{level.failures:>6}{level.rejections:>6}"
            f"{level.throughput:>8.2f}{(level.throughput / base if base else float('nan')):>12.2f}{versus:>11.2f}"
            f"{level.percentile(50) * 1000:>9.0f}{level.percentile(95) * 1000:>9.0f}"
        )
    return "\n".join(lines)

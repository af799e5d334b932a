"""`genserve bench --concurrency 1 8 64`: throughput and latency under concurrent clients, batching off and on.

The config's app runs on a Ray of its own, deployed twice: with the default model's and the
scorer's `batching` off, then on (the model's `max_ongoing_requests` raised to the batch size, so
a replica can hold a full batch). At each concurrency level, that many HTTP clients send `POST /v1/images` back to back until the level's requests are done. Throughput is
successful responses per second of wall time; p50/p95 are client-side latencies of the
successful ones; failures (e.g. 503 when a queue bound is hit) are counted, not hidden.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from serve_app.config import AppArgs, app_args_from_config


@dataclass
class Level:
    mode: str
    clients: int
    seconds: list[float] = field(default_factory=list)
    failures: int = 0
    wall_s: float = 0.0

    @property
    def throughput(self) -> float:
        return len(self.seconds) / self.wall_s if self.wall_s else 0.0

    def percentile(self, q: float) -> float:
        if not self.seconds:
            return float("nan")
        ordered = sorted(self.seconds)
        return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def with_batching(args: AppArgs, enabled: bool, max_batch_images: int, wait_ms: float) -> AppArgs:
    """`args` with the default model's batching set; on, its replicas take a full batch at once."""
    entries = []
    for entry in args.image_models:
        if entry.id == args.default_model_id:
            batching = entry.batching.model_copy(update={"enabled": enabled, "max_batch_images": max_batch_images,
                                                         "wait_ms": wait_ms})
            deployment = entry.deployment
            if enabled and (deployment.max_ongoing_requests or 0) < max_batch_images:
                deployment = deployment.model_copy(update={"max_ongoing_requests": max_batch_images})
            entry = entry.model_validate({**entry.model_dump(), "batching": batching.model_dump(),
                                          "deployment": deployment.model_dump(exclude_unset=True)})
        entries.append(entry)
    scorer = args.scorer.model_copy(update={"batching": args.scorer.batching.model_copy(
        update={"enabled": enabled, "max_batch_images": max_batch_images, "wait_ms": wait_ms})})
    return args.model_copy(update={"image_models": entries, "scorer": scorer})


async def _level(base_url: str, body: dict, mode: str, clients: int, requests: int) -> Level:
    import httpx

    level = Level(mode, clients)
    remaining = iter(range(requests))

    async def client(http: httpx.AsyncClient) -> None:
        for index in remaining:
            started = time.perf_counter()
            response = await http.post("/v1/images", json={**body, "seed": 1000 + index})
            if response.status_code == 200:
                level.seconds.append(time.perf_counter() - started)
            else:
                level.failures += 1

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base_url, timeout=300, limits=limits) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        level.wall_s = time.perf_counter() - started
    return level


def run_concurrency_benchmark(config: str, levels: list[int], requests: int, warmup: int, width: int, height: int,
                              steps: int, max_batch_images: int = 8, wait_ms: float = 20.0,
                              on_level=None) -> list[Level]:
    """Batching off, then on, on one Ray (the app is redeployed in place between the modes): at
    each level, max(requests, 2 x clients) requests after `warmup` alone. `on_level(level)` is
    called as each level finishes, so a run cut short still shows what it measured."""
    import httpx
    import ray
    from ray import serve

    from serve_app import APP_NAME
    from serve_app.bench.images import _free_port, _request_body
    from serve_app.builder import build_app

    args = app_args_from_config(config)
    body = _request_body(width, height, steps)
    results = []
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    try:
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        base_url = f"http://127.0.0.1:{port}"
        for enabled in (False, True):
            mode = f"batching on ({max_batch_images} images, {wait_ms:g} ms)" if enabled else "batching off"
            serve.run(build_app(with_batching(args, enabled, max_batch_images, wait_ms)), name=APP_NAME,
                      route_prefix="/")
            with httpx.Client(base_url=base_url, timeout=300) as client:
                for _ in range(warmup):
                    client.post("/v1/images", json=body).raise_for_status()
            for clients in levels:
                level = asyncio.run(_level(base_url, body, mode, clients, max(requests, 2 * clients)))
                results.append(level)
                if on_level is not None:
                    on_level(level)
    finally:
        serve.shutdown()
        ray.shutdown()
    return results


def format_concurrency_table(levels: list[Level]) -> str:
    """One row per mode and level: throughput, its ratio to one client of the same mode and to
    batching off at the same level, and latency percentiles."""
    off = {level.clients: level for level in levels if level.mode == "batching off"}
    first = {}
    for level in levels:
        first.setdefault(level.mode, level)
    header = (f"{'mode':<32}{'clients':>8}{'ok':>6}{'fail':>6}{'img/s':>8}{'x 1 client':>12}{'x off':>8}"
              f"{'p50 ms':>9}{'p95 ms':>9}")
    lines = [header]
    for level in levels:
        base = first[level.mode].throughput
        versus_off = level.throughput / off[level.clients].throughput if off.get(level.clients) else float("nan")
        lines.append(
            f"{level.mode:<32}{level.clients:>8}{len(level.seconds):>6}{level.failures:>6}{level.throughput:>8.2f}"
            f"{(level.throughput / base if base else float('nan')):>12.2f}{versus_off:>8.2f}"
            f"{level.percentile(50) * 1000:>9.0f}{level.percentile(95) * 1000:>9.0f}"
        )
    return "\n".join(lines)

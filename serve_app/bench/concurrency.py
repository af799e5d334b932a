"""`genserve bench --concurrency 1 8 64`: throughput and latency under concurrent clients, batching off and on.

The config's app runs on a Ray of its own, once per mode (the app is redeployed in place between
modes): with the default model's and the scorer's `batching` off, then on (`with_batching`: their
`max_ongoing_requests` raised to twice the batch size where lower, so a replica holds the next full
batch while one runs and the device has no gap between calls). At each concurrency level, that many clients (genserve's own `AsyncClient`) send
`POST /v1/images` back to back until the level's requests are done. Each request has a seed, so
the client retries it after the server's `Retry-After` when a bounded queue turns it away (503 or
429), as any user of the client gets: its latency runs from the first send to the answer, and
the rejections are counted, each with its own latency (send to the 503). Throughput is successful
responses per second of wall time; p50/p95 are client-side latencies of the successful ones; a
request that still failed counts as failed. A storm level (`--storm`, 64 clients by default) comes
last: its clients send a rejected request again at once, ignoring `Retry-After`, the most pressure.

Around each level the benchmark reads the model replicas' device time (the generator's, the
scorer's and the enhancer LLM's) and its Ray processes' CPU
times (`serve_app.bench.device`): utilization, the serving overhead at 1 client and the CPU per image
spent outside the model. `level_json` is one level as `--json` prints it.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field

import httpx

from serve_app.bench.device import DeviceUse, cpu_ms_per_image, overhead_ms
from serve_app.bench.images import nearest_rank
from serve_app.config import AppArgs


@dataclass
class Level:
    mode: str
    clients: int
    seconds: list[float] = field(default_factory=list)
    failures: int = 0
    wall_s: float = 0.0
    rejections: int = 0  # 503/429 answers, each try counted
    rejection_seconds: list[float] = field(default_factory=list)  # each rejection's own latency
    storm: bool = False  # its clients retry a rejection at once
    images_per_request: int = 1
    device: DeviceUse | None = None  # read around the level; None in process or when not read

    @property
    def throughput(self) -> float:
        return len(self.seconds) / self.wall_s if self.wall_s else 0.0

    def percentile(self, q: float, values: list[float] | None = None) -> float:
        """The q-th percentile (nearest rank) of `values`, by default the successful latencies."""
        return nearest_rank(self.seconds if values is None else values, q)

    @property
    def images(self) -> int:
        return len(self.seconds) * self.images_per_request


def _ms(seconds: float) -> float | None:
    """Seconds as rounded ms; NaN (nothing measured) as None, which JSON writes as null."""
    return None if seconds != seconds else round(seconds * 1000, 1)


def level_json(level: Level) -> dict:
    """One level as `genserve bench --concurrency ... --json` prints it (docs/benchmarks.md reads it).
    `overhead_ms` is given at 1 client only: with more, latency also holds the wait for the others."""
    use = level.device
    overhead = overhead_ms(level.seconds, use.device_s) if use is not None and level.clients == 1 else None
    cpu = cpu_ms_per_image(use, level.images) if use is not None else None
    return {
        "mode": level.mode, "clients": level.clients, "storm": level.storm, "ok": len(level.seconds),
        "failures": level.failures, "throughput": round(level.throughput, 3),
        "p50_ms": _ms(level.percentile(50)), "p95_ms": _ms(level.percentile(95)),
        "utilization": None if use is None or use.utilization is None else round(use.utilization, 4),
        "utilization_per_replica": {} if use is None else {
            replica: round(value, 4) for replica, value in use.per_replica.items()},
        "device_ms_per_request": _ms(use.device_s / len(level.seconds)) if use is not None and level.seconds else None,
        "overhead_ms": None if overhead is None else round(overhead, 1),
        "cpu_ms_per_image": None if cpu is None else round(cpu, 1),
        "idle_cpu_cores": round(use.idle_cpu_s / level.wall_s, 4) if use is not None and level.wall_s else None,
        "rejections": level.rejections,
        "rejection_p50_ms": _ms(level.percentile(50, level.rejection_seconds)),
    }


class _TimedRejections(httpx.AsyncBaseTransport):
    """Around the client's transport: counts each 503/429 with its latency (the client itself only
    says that it waits, not how long the answer took)."""

    def __init__(self, level: Level, inner: httpx.AsyncBaseTransport):
        self._level, self._inner = level, inner

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        started = time.perf_counter()
        response = await self._inner.handle_async_request(request)
        if response.status_code in (429, 503):
            self._level.rejections += 1
            self._level.rejection_seconds.append(time.perf_counter() - started)
        return response

    async def aclose(self) -> None:
        await self._inner.aclose()


def with_batching(args: AppArgs, enabled: bool, max_batch_images: int, wait_ms: float) -> AppArgs:
    """`args` with the default model's and the scorer's batching set; on, their replicas take two full
    batches at once: one running, the next one gathering (with only one, a batch starts gathering only
    when the last call has ended and its answers are out, and the device waits meanwhile)."""
    held = 2 * max_batch_images
    settings = {"enabled": enabled, "max_batch_images": max_batch_images, "wait_ms": wait_ms}
    entries = []
    for entry in args.image_models:
        if entry.id == args.default_model_id:
            deployment = entry.deployment.model_dump(exclude_unset=True)
            if enabled and (entry.deployment.max_ongoing_requests or 0) < held:
                deployment["max_ongoing_requests"] = held
            entry = type(entry).model_validate({**entry.model_dump(exclude_unset=True), "batching": settings,
                                                "deployment": deployment})
        entries.append(entry)
    deployments = dict(args.deployments)
    scorer_options = deployments.get("ClipScorer")
    if enabled and (scorer_options is None or (scorer_options.max_ongoing_requests or 0) < held):
        base = scorer_options.model_dump(exclude_unset=True) if scorer_options is not None else {}
        deployments["ClipScorer"] = {**base, "max_ongoing_requests": held}
    return AppArgs.model_validate({**args.model_dump(exclude_unset=True), "image_models": [
        entry.model_dump(exclude_unset=True) for entry in entries],
        "scores": {**args.scores.model_dump(exclude_unset=True), "batching": settings},
        "deployments": {name: (options if isinstance(options, dict) else options.model_dump(exclude_unset=True))
                        for name, options in deployments.items()}})


async def run_level(url: str, body: dict, mode: str, clients: int, requests: int, transport=None,
                    storm: bool = False) -> Level:
    """`clients` concurrent clients sending `requests` requests in all (seeds 1000, 1001, ...); with
    `storm`, each sends a rejected request again at once. `transport`: httpx's, for tests."""
    from serve_app.client import AsyncClient, GenserveError
    from serve_app.client.retry import RetryPolicy

    level = Level(mode, clients, storm=storm, images_per_request=body.get("num_images", 1))
    remaining = iter(range(requests))

    async def waiting_out_a_rejection(seconds: float) -> None:
        await asyncio.sleep(0 if storm else seconds)

    # A storm waits for nothing, so the client's bound on the total wait must not end its retries.
    retry = RetryPolicy(max_wait_s=float("inf")) if storm else None

    async def client() -> None:
        timed = _TimedRejections(level, transport or httpx.AsyncHTTPTransport())
        async with AsyncClient(url, timeout=600, retry=retry, sleep=waiting_out_a_rejection, transport=timed) as http:
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
                              width: int, height: int, steps: int, on_level=None, storm: int = 0) -> list[Level]:
    """Each mode's app in turn, on one Ray: at each level, max(requests, 2 x clients) requests after
    `warmup` alone, then with `storm` a level of that many clients retrying at once. `on_level(level)`
    is called as each level finishes, so a run cut short still shows what it measured."""
    import httpx
    import ray
    from ray import serve

    from serve_app import APP_NAME
    from serve_app.bench.device import idle_cores
    from serve_app.bench.images import _free_port, _request_body
    from serve_app.builder import build_app

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    body = _request_body(width, height, steps)
    results = []
    # A cluster of its own: serve.shutdown() at the end must never stop someone else's apps, and
    # the CPU read around each level is that of this cluster's processes only.
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
            idle = idle_cores()
            plan = [(clients, False) for clients in levels] + ([(storm, True)] if storm else [])
            for clients, storming in plan:
                level = _measured_level(args, url, body, mode, clients, max(requests, 2 * clients), storming, idle)
                results.append(level)
                if on_level is not None:
                    on_level(level)
    finally:
        serve.shutdown()
        ray.shutdown()
    return results


def _measured_level(args: AppArgs, url: str, body: dict, mode: str, clients: int, requests: int,
                    storm: bool, idle: float) -> Level:
    """One level, with the default model's and the scorer's device time and the cluster's CPU read
    before and after it (`idle`: the cluster's CPU seconds per second without traffic)."""
    from serve_app import APP_NAME
    from serve_app.bench.device import cluster_cpu_seconds, device_use, read_device_times
    from serve_app.config import generator_name

    generator = generator_name(args.default_model_id)

    def readings() -> tuple:
        return (read_device_times(APP_NAME, generator), read_device_times(APP_NAME, "ClipScorer"),
                cluster_cpu_seconds(), read_device_times(APP_NAME, "PromptEnhancer"))

    before = readings()
    level = asyncio.run(run_level(url, body, mode, clients, requests, storm=storm))
    after = readings()
    level.device = device_use((before[0], after[0]), (before[1], after[1]), (before[2], after[2]), level.wall_s,
                              idle, enhancer=(before[3], after[3]))
    return level


def _cell(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_concurrency_table(levels: list[Level]) -> str:
    """One row per mode and level: throughput, its ratio to the mode's first level (one client) and
    to the first mode at the same level, latency percentiles, then what `level_json` adds: device
    utilization (the mean; with several replicas, each beside it), the serving overhead at 1 client,
    CPU ms per image outside the model and the rejections' p50."""
    first_mode = levels[0].mode if levels else ""
    baseline = {(level.clients, level.storm): level for level in levels if level.mode == first_mode}
    first = {}
    for level in levels:
        first.setdefault(level.mode, level)
    header = (f"{'mode':<32}{'clients':>9}{'ok':>6}{'fail':>6}{'503s':>6}{'img/s':>8}{'x 1st level':>12}"
              f"{'x 1st mode':>11}{'p50 ms':>9}{'p95 ms':>9}{'util %':>8}{'ovh ms':>8}{'cpu ms/img':>11}"
              f"{'rej p50':>8}  per replica")
    lines = [header]
    for level in levels:
        base = first[level.mode].throughput
        same = baseline.get((level.clients, level.storm))
        versus = level.throughput / same.throughput if same and same.throughput else float("nan")
        row = level_json(level)
        utilization = None if row["utilization"] is None else row["utilization"] * 100
        replicas = row["utilization_per_replica"]
        each = " ".join(f"{value * 100:.0f}" for value in replicas.values()) if len(replicas) > 1 else ""
        clients = f"{level.clients}{'!' if level.storm else ''}"
        lines.append(
            f"{level.mode:<32}{clients:>9}{len(level.seconds):>6}{level.failures:>6}{level.rejections:>6}"
            f"{level.throughput:>8.2f}{(level.throughput / base if base else float('nan')):>12.2f}{versus:>11.2f}"
            f"{level.percentile(50) * 1000:>9.0f}{level.percentile(95) * 1000:>9.0f}{_cell(utilization):>8}"
            f"{_cell(row['overhead_ms']):>8}{_cell(row['cpu_ms_per_image'], 1):>11}{_cell(row['rejection_p50_ms']):>8}"
            f"  {each}".rstrip()
        )
    if any(level.storm for level in levels):
        lines.append("clients with !: a storm, each client sends a rejected request again at once")
    return "\n".join(lines)

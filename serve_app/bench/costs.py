"""`genserve bench-costs`: the per-component costs the plan to 100 GPUs (docs/scaling.md) is built from.

One app (the config's, its jobs moved to a throwaway `redis-server` on loopback: its own port and
directory, append-only and fsynced per write as the cluster profiles run it) on a Ray of its own:

- **The proxy.** `clients` concurrent clients send GET /livez (the ingress answers it without a
  downstream call: the cheapest route) for `seconds`. Reported: requests/s, and the CPU ms per
  request of Ray Serve's proxy and of the Ingress (`serve_app.bench.device.cpu_by_role`, each
  role's idle rate taken off); requests per proxy CPU-second is the proxy's throughput per core.
- **Redis.** `jobs` image jobs, one after another as `genserve bench-jobs` sends them (POST /v1/jobs,
  its event stream to the final state, then GET of its PNG). Redis's INFO commandstats before and
  after give the commands per job, by command; INFO cpu and stats give Redis's CPU ms and the bytes
  it received per job. What the JobRunner does with no jobs (its claim polls, lease renewals), read
  for as long beforehand, is taken off.
- **PNG encoding** (in this process, no Ray): the ingress encodes every image; a 1024x1024 one as the
  simulated device draws it (blocks of colour: compresses well) and as uniform noise (the worst case
  for PNG), to bound what a real picture costs.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field

from serve_app.config import AppArgs


@dataclass
class ProxyCost:
    requests: int
    wall_s: float
    cpu_ms_by_role: dict[str, float]  # per request, idle taken off

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.wall_s if self.wall_s else 0.0

    @property
    def requests_per_proxy_core(self) -> float | None:
        """Requests per CPU-second of the proxy: what one core running only the proxy would carry."""
        ms = self.cpu_ms_by_role.get("ProxyActor")
        return 1000 / ms if ms and ms > 0 else None


@dataclass
class RedisCost:
    jobs: int
    commands: dict[str, float] = field(default_factory=dict)  # per job, by command, idle taken off
    cpu_ms: float = 0.0  # Redis's user + system CPU per job, idle taken off
    bytes_in: float = 0.0  # per job
    idle_commands_per_s: float = 0.0

    @property
    def commands_per_job(self) -> float:
        return sum(self.commands.values())


def command_deltas(before: dict[str, dict], after: dict[str, dict]) -> dict[str, int]:
    """Calls per command between two INFO commandstats readings (`cmdstat_get: {calls: ...}`)."""
    deltas = {}
    for key, stats in after.items():
        calls = stats["calls"] - before.get(key, {}).get("calls", 0)
        if calls:
            deltas[key.removeprefix("cmdstat_")] = calls
    return deltas


def per_job(run: dict[str, int], idle: dict[str, int], idle_scale: float, jobs: int) -> dict[str, float]:
    """Calls per job by command: the run's less the idle reading scaled to the run's wall time."""
    commands = {command: (calls - idle.get(command, 0) * idle_scale) / jobs for command, calls in run.items()}
    return dict(sorted(((c, n) for c, n in commands.items() if n > 0.005), key=lambda item: -item[1]))


@contextlib.contextmanager
def redis_server():
    """A `redis-server` on 127.0.0.1 on a free port and a temp directory; yields its URL."""
    import redis

    from serve_app.bench.images import _free_port

    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("bench-costs needs redis-server (Debian: apt-get install redis-server)")
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="genserve-bench-redis-") as directory:
        process = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", directory,
                                    "--save", "", "--appendonly", "yes", "--appendfsync", "always"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            client = redis.Redis(port=port)
            deadline = time.monotonic() + 20
            while True:
                try:
                    client.ping()
                    break
                except redis.ConnectionError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            yield f"redis://127.0.0.1:{port}/0", client
        finally:
            process.terminate()
            process.wait(timeout=20)


def run_costs_benchmark(args: AppArgs, clients: int, seconds: float, jobs: int) -> tuple[ProxyCost, RedisCost]:
    from serve_app.bench.images import serving

    with redis_server() as (url, redis_client):
        args = args.model_copy(update={"jobs": args.jobs.model_copy(update={"store": "redis", "redis_url": url})})
        with serving(args) as client:
            client.get("/livez").raise_for_status()
            proxy = _proxy_cost(str(client.base_url), clients, seconds)
            return proxy, _redis_cost(client, redis_client, jobs)


def _proxy_cost(url: str, clients: int, seconds: float) -> ProxyCost:
    from serve_app.bench.device import cluster_cpu_by_process, cpu_by_role
    from serve_app.bench.replicas import roles_per_image

    idle_started, idle_before = time.perf_counter(), cluster_cpu_by_process()
    time.sleep(5.0)
    idle_rates = {role: spent / (time.perf_counter() - idle_started)
                  for role, spent in cpu_by_role(idle_before, cluster_cpu_by_process()).items()}
    before = cluster_cpu_by_process()
    started = time.perf_counter()
    count = asyncio.run(_livez_load(url, clients, seconds))
    wall = time.perf_counter() - started
    spent = cpu_by_role(before, cluster_cpu_by_process())
    return ProxyCost(count, wall, roles_per_image(spent, idle_rates, wall, count))


async def _livez_load(url: str, clients: int, seconds: float) -> int:
    import httpx

    done = 0
    deadline = time.perf_counter() + seconds

    async def client() -> None:
        nonlocal done
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            while time.perf_counter() < deadline:
                (await http.get("/livez")).raise_for_status()
                done += 1

    await asyncio.gather(*(client() for _ in range(clients)))
    return done


def _redis_readings(redis_client) -> tuple[dict, float, int]:
    cpu = redis_client.info("cpu")
    return (redis_client.info("commandstats"), cpu["used_cpu_user"] + cpu["used_cpu_sys"],
            redis_client.info("stats")["total_net_input_bytes"])


def _redis_cost(client, redis_client, jobs: int) -> RedisCost:
    from serve_app.bench.images import _request_body
    from serve_app.bench.jobs import _job_round

    body = {key: value for key, value in _request_body(0, 0, 0).items()
            if key not in ("width", "height", "num_inference_steps")}  # the default model's own size and steps
    _job_round(client, body)  # warm-up: the first job loads the store's scripts
    idle_before, idle_started = _redis_readings(redis_client), time.perf_counter()
    time.sleep(5.0)
    idle_after, idle_wall = _redis_readings(redis_client), time.perf_counter() - idle_started
    before, started = _redis_readings(redis_client), time.perf_counter()
    for index in range(jobs):
        _job_round(client, {**body, "seed": 2000 + index})
    after, wall = _redis_readings(redis_client), time.perf_counter() - started
    scale = wall / idle_wall
    commands = per_job(command_deltas(before[0], after[0]), command_deltas(idle_before[0], idle_after[0]), scale, jobs)
    idle_calls = sum(command_deltas(idle_before[0], idle_after[0]).values())
    return RedisCost(jobs, commands,
                     cpu_ms=((after[1] - before[1]) - (idle_after[1] - idle_before[1]) * scale) / jobs * 1000,
                     bytes_in=((after[2] - before[2]) - (idle_after[2] - idle_before[2]) * scale) / jobs,
                     idle_commands_per_s=idle_calls / idle_wall)


def png_encode_ms(width: int = 1024, height: int = 1024, repeats: int = 5) -> dict[str, tuple[float, int]]:
    """Median ms to encode one image with the ingress's `encode_png`, and its PNG's bytes: the
    simulated picture, and noise."""
    import statistics

    import numpy as np

    from deployments.runtime.sim.pipeline import seed_picture
    from serve_app.services.media import encode_png

    images = {"simulated picture": (seed_picture(7, width, height) * 255).astype(np.uint8),
              "uniform noise": np.random.default_rng(7).integers(0, 256, (height, width, 3), dtype=np.uint8)}
    meta = {"prompt": "a lighthouse on a cliff at dusk", "steps": 28, "guidance_scale": 3.5, "seed": 7,
            "width": width, "height": height, "model": "flux-dev"}
    timings = {}
    for name, image in images.items():
        seconds = []
        for _ in range(repeats):
            started = time.perf_counter()
            png = encode_png(image, meta)
            seconds.append(time.perf_counter() - started)
        timings[name] = (statistics.median(seconds) * 1000, len(png))
    return timings


def format_costs(proxy: ProxyCost, redis_cost: RedisCost, png_ms: dict[str, tuple[float, int]] | None = None) -> str:
    roles = ", ".join(f"{role} {ms:.2f}" for role, ms in list(proxy.cpu_ms_by_role.items())[:6])
    per_core = proxy.requests_per_proxy_core
    commands = ", ".join(f"{command} {calls:.1f}" for command, calls in redis_cost.commands.items())
    return "\n".join([
        f"proxy: GET /livez, {proxy.requests} requests in {proxy.wall_s:.1f} s = {proxy.requests_per_s:.0f} req/s",
        f"  CPU ms per request by role: {roles}",
        f"  proxy throughput per core: {'-' if per_core is None else f'{per_core:.0f}'} requests per proxy CPU-second",
        f"redis: {redis_cost.jobs} image jobs (submit, event stream, PNG)",
        f"  commands per job: {redis_cost.commands_per_job:.1f} ({commands})",
        f"  Redis CPU ms per job: {redis_cost.cpu_ms:.2f}; bytes in per job: {redis_cost.bytes_in:.0f}; "
        f"with no jobs: {redis_cost.idle_commands_per_s:.1f} commands/s",
        *(["PNG encode 1024x1024 (ingress code, in process): "
           + ", ".join(f"{name} {ms:.1f} ms ({size / 1e6:.2f} MB)" for name, (ms, size) in png_ms.items())]
          if png_ms else []),
    ])

"""`genserve bench-autoscale`: how fast a model pool's autoscaling answers a step in load.

The config's app runs on a Ray of its own that declares `gpus` logical GPUs; the model's deployment
autoscales (its `deployment.autoscaling`, with flags over it), one logical GPU per replica, so each
replica of a simulated model has a simulated GPU of its own and pays its own cold start. Clients
(genserve's `AsyncClient`, retrying a 503 after its `Retry-After` as any user does) follow the phases,
e.g. 1 client for 30 s, 32 for 150 s, 1 for 150 s; a client beyond the phase's count finishes its
request and waits. Every `interval_s` a sample records the replicas by state (`serve.status()`), the
requests in flight, and the throughput and p95 latency of the requests that ended in the last
`window_s`. The summary reads the samples: how long after the step up the pool decided to grow and
reached its maximum, the p95 meanwhile and once there, how long after the step down it was back at its
minimum, and each replica's mean start (replica-seconds spent STARTING over the replicas started:
Little's law), beside the modelled cold start of a simulated model.
"""

from __future__ import annotations

import asyncio
import csv
import time
from dataclasses import asdict, dataclass, field

import httpx

from serve_app.bench.images import nearest_rank
from serve_app.config import AppArgs, AutoscalingOptions


@dataclass(frozen=True)
class Phase:
    clients: int
    seconds: float


def parse_phases(texts: list[str]) -> list[Phase]:
    """`["1:30", "32:150", "1:150"]` as phases (clients:seconds); ValueError naming a bad one."""
    phases = []
    for text in texts:
        try:
            clients, seconds = text.split(":")
            phase = Phase(int(clients), float(seconds))
        except ValueError:
            raise ValueError(f"--phases: {text!r} is not CLIENTS:SECONDS (e.g. 32:150)") from None
        if phase.clients < 0 or phase.seconds <= 0:
            raise ValueError(f"--phases: {text!r} needs clients >= 0 and seconds > 0")
        phases.append(phase)
    if not phases:
        raise ValueError("--phases: at least one CLIENTS:SECONDS")
    return phases


def phase_starts(phases: list[Phase]) -> list[float]:
    """When each phase starts, in seconds from the run's start."""
    starts, at = [], 0.0
    for phase in phases:
        starts.append(at)
        at += phase.seconds
    return starts


def clients_at(phases: list[Phase], t: float) -> int:
    """The clients the schedule asks for at `t` seconds (0 after the last phase)."""
    for start, phase in zip(phase_starts(phases), phases):
        if start <= t < start + phase.seconds:
            return phase.clients
    return 0


@dataclass(frozen=True)
class Done:
    """One request: when it ended (s from the run's start), its latency, whether it succeeded."""

    t: float
    latency_s: float
    ok: bool


@dataclass(frozen=True)
class Sample:
    t: float
    clients: int
    running: int  # replicas RUNNING
    starting: int  # replicas STARTING (scheduled, their constructor running)
    stopping: int
    in_flight: int  # the clients' requests sent and not answered
    throughput: float  # successful requests per second over the window
    p95_s: float | None  # of the successful requests that ended in the window


def window_stats(done: list[Done], now: float, window_s: float) -> tuple[float, float | None]:
    """Throughput and p95 latency (nearest rank) of the successful requests that ended in the last
    `window_s` before `now` (the window shorter at the run's start)."""
    span = min(window_s, now)
    recent = sorted(one.latency_s for one in done if one.ok and now - window_s < one.t <= now)
    if not recent or span <= 0:
        return 0.0, None
    return len(recent) / span, nearest_rank(recent, 95)


@dataclass
class Summary:
    """What the samples say of one run (seconds from the step it follows; None: never happened)."""

    step_up_at: float
    step_down_at: float | None
    decided_s: float | None  # the step up to the first replica added (STARTING)
    scale_up_s: float | None  # the step up to max_replicas RUNNING
    ramp_p95_s: float | None  # requests that ended between the step up and max_replicas RUNNING
    peak_p95_s: float | None  # requests sent after that that ended before the step down
    peak_throughput: float | None  # successful requests per second over the same time
    scale_down_s: float | None  # the step down to min_replicas, nothing starting or stopping
    replica_start_s: float | None  # mean seconds a replica spent STARTING
    replicas_started: int
    peak_replicas: int
    ok: int
    failed: int
    rejections: int
    settings: dict = field(default_factory=dict)
    cold_start: dict | None = None  # the modelled cold start of one replica (simulated)


def _first(samples: list[Sample], after: float, test) -> float | None:
    return next((sample.t - after for sample in samples if sample.t >= after and test(sample)), None)


def _step_times(phases: list[Phase]) -> tuple[float, float | None]:
    """The start of the busiest phase, and of the first phase after it with fewer clients."""
    starts = phase_starts(phases)
    top = max(range(len(phases)), key=lambda index: phases[index].clients)
    down = next((starts[index] for index in range(top + 1, len(phases)) if phases[index].clients < phases[top].clients),
                None)
    return starts[top], down


def summarize(samples: list[Sample], done: list[Done], phases: list[Phase], options: AutoscalingOptions,
              rejections: int = 0) -> Summary:
    up, down = _step_times(phases)
    before = next((sample.running for sample in samples if sample.t >= up), options.min_replicas)
    decided = _first(samples, up, lambda sample: sample.running + sample.starting > before)
    scaled = _first(samples, up, lambda sample: sample.running >= options.max_replicas)
    end_of_peak = down if down is not None else float("inf")
    reached = up + scaled if scaled is not None else end_of_peak
    ramp = sorted(one.latency_s for one in done if one.ok and up < one.t <= reached)
    peak = [one for one in done if one.ok and reached < one.t <= end_of_peak]
    # The steady state's latency: requests sent once the pool was full (earlier ones waited for it).
    steady = sorted(one.latency_s for one in peak if one.t - one.latency_s >= reached)
    peak_span = (end_of_peak if down is not None else max((one.t for one in done), default=reached)) - reached
    scaled_down = None if down is None else _first(
        samples, down, lambda sample: sample.running <= options.min_replicas and not sample.starting and not sample.stopping)
    started, starting_s = _starts(samples)
    return Summary(
        step_up_at=up, step_down_at=down, decided_s=decided, scale_up_s=scaled,
        ramp_p95_s=nearest_rank(ramp, 95) if ramp else None,
        peak_p95_s=nearest_rank(steady, 95) if steady else None,
        peak_throughput=len(peak) / peak_span if peak and peak_span > 0 else None,
        scale_down_s=scaled_down, replica_start_s=starting_s / started if started else None,
        replicas_started=started, peak_replicas=max((sample.running for sample in samples), default=0),
        ok=sum(one.ok for one in done), failed=sum(not one.ok for one in done), rejections=rejections,
        settings=options.model_dump())


def _starts(samples: list[Sample]) -> tuple[int, float]:
    """Replicas that came up during the run (each rise of RUNNING), and the replica-seconds spent
    STARTING (each sample's count times the time to the next)."""
    started = sum(max(0, later.running - earlier.running) for earlier, later in zip(samples, samples[1:]))
    seconds = sum(earlier.starting * (later.t - earlier.t) for earlier, later in zip(samples, samples[1:]))
    return started, seconds


def _s(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f} s"


def format_summary(summary: Summary) -> str:
    settings = summary.settings
    cold = summary.cold_start
    lines = [
        f"autoscaling: min {settings['min_replicas']}, max {settings['max_replicas']}, target_ongoing_requests "
        f"{settings['target_ongoing_requests']:g}, upscale_delay_s {settings['upscale_delay_s']:g}, downscale_delay_s "
        f"{settings['downscale_delay_s']:g}, look_back_period_s {settings['look_back_period_s'] or 'Serve default'}, "
        f"metrics_interval_s {settings['metrics_interval_s'] or 'Serve default'}",
        f"step up at {summary.step_up_at:.0f} s: first replica added after {_s(summary.decided_s)}, "
        f"{settings['max_replicas']} replicas running after {_s(summary.scale_up_s)} (peak {summary.peak_replicas})",
        f"p95 during the ramp {_s(summary.ramp_p95_s)}; at the peak (sent once full) {_s(summary.peak_p95_s)}, "
        + ("-" if summary.peak_throughput is None else f"{summary.peak_throughput:.2f} img/s"),
        "step down: " + ("none" if summary.step_down_at is None else
                         f"at {summary.step_down_at:.0f} s, back to {settings['min_replicas']} after "
                         f"{_s(summary.scale_down_s)}"),
        f"replica start: {_s(summary.replica_start_s)} mean STARTING over {summary.replicas_started} replicas started"
        + ("" if cold is None else f"; of which the modelled cold start {cold['total_s']:.2f} s (simulated: "
                                   f"{cold['read_gb']:.1f} GB from disk {cold['disk_read_s']:.2f} s + to the card "
                                   f"{cold['host_to_device_s']:.2f} s)"),
        f"requests: {summary.ok} ok, {summary.failed} failed, {summary.rejections} 503/429 answers retried",
    ]
    return "\n".join(lines)


def write_samples(samples: list[Sample], path: str) -> None:
    """The samples as CSV, one row a second (docs/benchmarks.md's plot is drawn from them)."""
    _write_rows(Sample, samples, path)


def write_requests(done: list[Done], path: str) -> None:
    """Every request (when it ended, its latency, whether it succeeded) as CSV: the summary's input."""
    _write_rows(Done, done, path)


def _write_rows(kind: type, rows: list, path: str) -> None:
    """Dataclass rows of `kind` as CSV, a column per field."""
    with open(path, "w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=list(kind.__dataclass_fields__))
        writer.writeheader()
        writer.writerows(asdict(row) for row in rows)


def plot(samples: list[Sample], path: str, title: str, max_replicas: int) -> None:
    """Replicas (the client count as a step beside them), throughput and p95 over time, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display: a file only
    import matplotlib.pyplot as plt

    t = [sample.t for sample in samples]
    figure, (top, middle, bottom) = plt.subplots(3, 1, sharex=True, figsize=(9, 7.5))
    top.step(t, [sample.running for sample in samples], where="post", label="replicas running", color="tab:blue")
    top.step(t, [sample.running + sample.starting for sample in samples], where="post", label="+ starting",
             color="tab:blue", alpha=0.4, linestyle="--")
    top.axhline(max_replicas, color="grey", linestyle=":", linewidth=1)
    top.set_ylabel("replicas")
    clients = top.twinx()
    clients.step(t, [sample.clients for sample in samples], where="post", color="tab:orange", label="clients")
    clients.set_ylabel("clients", color="tab:orange")
    top.legend(loc="upper left", fontsize=8)
    middle.plot(t, [sample.throughput for sample in samples], color="tab:green")
    middle.set_ylabel("img/s")
    bottom.plot(t, [sample.p95_s if sample.p95_s is not None else float("nan") for sample in samples],
                color="tab:red")
    bottom.set_ylabel("p95 s")
    bottom.set_xlabel("seconds")
    top.set_title(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def autoscaled(args: AppArgs, model: str, options: AutoscalingOptions, replica_cpus: float) -> AppArgs:
    """`args` with `model`'s deployment autoscaled by `options`, one logical GPU and `replica_cpus`
    CPUs per replica (a simulated replica sleeps through its calls: a small share lets 8 fit 2 cores)."""
    entries = []
    for entry in args.image_models:
        if entry.id == model:
            deployment = {**entry.deployment.model_dump(exclude_unset=True), "autoscaling": options.model_dump(),
                          "num_gpus": 1, "num_cpus": replica_cpus}
            deployment.pop("num_replicas", None)
            entry = type(entry).model_validate({**entry.model_dump(exclude_unset=True), "deployment": deployment})
        entries.append(entry)
    return AppArgs.model_validate({**args.model_dump(exclude_unset=True),
                                   "image_models": [entry.model_dump(exclude_unset=True) for entry in entries]})


class _Counted(httpx.AsyncBaseTransport):
    """Around the client's transport: counts the 503/429 answers the client then retries."""

    def __init__(self, counts: dict, inner: httpx.AsyncBaseTransport):
        self._counts, self._inner = counts, inner

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self._inner.handle_async_request(request)
        if response.status_code in (429, 503):
            self._counts["rejections"] += 1
        return response

    async def aclose(self) -> None:
        await self._inner.aclose()


async def drive(url: str, body: dict, phases: list[Phase], replica_states, interval_s: float = 1.0,
                window_s: float = 10.0, transport=None) -> tuple[list[Sample], list[Done], int]:
    """Run the phases against `url`, sampling every `interval_s` (`replica_states()`: (running,
    starting, stopping), called in a thread). Returns the samples, the requests and the rejections."""
    from serve_app.client import AsyncClient, GenserveError

    done: list[Done] = []
    counts = {"rejections": 0, "in_flight": 0, "seed": 0}
    total = sum(phase.seconds for phase in phases)
    started = time.perf_counter()

    def now() -> float:
        return time.perf_counter() - started

    async def client(index: int) -> None:
        async with AsyncClient(url, timeout=600, transport=_Counted(counts, transport or httpx.AsyncHTTPTransport())) as http:
            while now() < total:
                if index >= clients_at(phases, now()):
                    await asyncio.sleep(min(interval_s, 0.25))
                    continue
                counts["seed"] += 1
                counts["in_flight"] += 1
                sent = now()
                try:
                    await http.images({**body, "seed": counts["seed"]})
                    ok = True
                except GenserveError:
                    ok = False
                finally:
                    counts["in_flight"] -= 1
                done.append(Done(now(), now() - sent, ok))

    async def sampler(samples: list[Sample]) -> None:
        while (at := now()) < total:
            running, starting, stopping = await asyncio.to_thread(replica_states)
            throughput, p95 = window_stats(done, at, window_s)
            samples.append(Sample(round(at, 2), clients_at(phases, at), running, starting, stopping,
                                  counts["in_flight"], round(throughput, 3), None if p95 is None else round(p95, 3)))
            await asyncio.sleep(max(0.0, interval_s - (now() - at)))

    samples: list[Sample] = []
    most = max(phase.clients for phase in phases)
    await asyncio.gather(sampler(samples), *(client(index) for index in range(most)))
    return samples, done, counts["rejections"]


def replica_states(app: str, deployment: str):
    """A `drive` reader: the deployment's replicas RUNNING, STARTING and STOPPING, by `serve.status()`."""
    from ray import serve

    def read() -> tuple[int, int, int]:
        status = serve.status().applications[app].deployments.get(deployment)
        states = status.replica_states if status is not None else {}
        return states.get("RUNNING", 0), states.get("STARTING", 0), states.get("STOPPING", 0)

    return read


def modelled_cold_start(args: AppArgs, model: str) -> dict | None:
    """One replica's modelled cold start where `model` runs on a simulated device (its describe())."""
    from deployments.runtime.sim import flops, memory, timing
    from deployments.sim_profiles import profile

    entry = args.image_model(model)
    if entry.device.simulated is None or not entry.device.simulated_cold_start:
        return None
    arch = flops.architecture_for(entry.source)
    dtype = "bfloat16" if entry.device.dtype == "auto" else entry.device.dtype
    read = memory.weight_bytes(arch, dtype, "none", entry.memory.weights)
    copy = memory.weight_bytes(arch, dtype, entry.acceleration.quantization, entry.memory.weights)
    return timing.cold_start(profile(entry.device.simulated), read, copy).describe()


def run_autoscale_benchmark(args: AppArgs, model: str, options: AutoscalingOptions, phases: list[Phase], gpus: int,
                            replica_cpus: float, interval_s: float = 1.0,
                            window_s: float = 10.0) -> tuple[list[Sample], list[Done], int]:
    """The run (see the module's docstring) on a Ray of its own: its samples, requests and rejections."""
    import os
    import tempfile

    import ray
    from ray import serve

    from serve_app import APP_NAME
    from serve_app.bench.images import _free_port
    from serve_app.builder import build_app
    from serve_app.config import generator_name

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    app = autoscaled(args, model, options, replica_cpus)
    body = {"prompt": "a lighthouse on a cliff at dusk", "model": model, "enhance": False}
    with tempfile.TemporaryDirectory(prefix="genserve-bench-autoscale-") as folder:
        app = app.model_copy(update={"jobs": app.jobs.model_copy(update={"data_dir": folder})})
        # A cluster of its own, declaring the logical GPUs the pool scales over.
        ray.init(address="local", num_gpus=gpus, include_dashboard=False, log_to_driver=False)
        try:
            port = _free_port()
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            serve.run(build_app(app), name=APP_NAME, route_prefix="/")
            httpx.post(f"http://127.0.0.1:{port}/v1/images", json=body, timeout=300).raise_for_status()  # warm
            samples, done, rejections = asyncio.run(drive(
                f"http://127.0.0.1:{port}", body, phases, replica_states(APP_NAME, generator_name(model)),
                interval_s, window_s))
        finally:
            serve.shutdown()
            ray.shutdown()
    return samples, done, rejections

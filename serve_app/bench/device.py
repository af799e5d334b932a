"""What `genserve bench --concurrency` measures around the model: device use and the CPU outside it.

Every model replica keeps the totals of its model calls (busy seconds, the CPU its process spent
meanwhile, calls: `deployments.runtime.metrics.DeviceClock`) and answers them from `device_time()`.
The benchmark reads them before and after each level, and the CPU times of every process of its own
Ray cluster (the processes this one started: GCS, raylet, the proxy, the controller, the replicas),
then:
- utilization of a replica: its busy seconds over the level's wall seconds; of the deployment, the
  mean over its replicas (the per-replica figures beside it);
- device seconds per request: the busy seconds of the generator, the scorer and the enhancer's LLM
  (where it runs one) over the requests answered (the scorer's are its forward passes only: the
  resize and tokenising before them are CPU work around the model, `BusyMeter`); at 1 client, the serving overhead is the mean end-to-end latency minus that;
- CPU per image outside the model: the Ray processes' CPU seconds minus the model calls' CPU seconds
  and minus what the cluster spends idle (its CPU rate with no traffic, measured once after the
  warm-up, times the level's wall time), over the images answered: proxy, ingress, enhancer,
  encoding, score pre-processing, and Ray's own work per request.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# A sample per replica: {"replica", "model", "pid", "busy_s", "cpu_s", "calls"}.
Samples = dict[str, dict]


@dataclass
class DeviceUse:
    """What one level did to the models and the CPU (deltas between the readings around it)."""

    utilization: float | None  # the generator's, the mean over its replicas; None if none answered
    per_replica: dict[str, float] = field(default_factory=dict)
    device_s: float = 0.0  # busy seconds of every model read (the generator and the scorer)
    model_cpu_s: float = 0.0  # their processes' CPU seconds during those calls
    ray_cpu_s: float = 0.0  # CPU seconds of every process of the cluster
    idle_cpu_s: float = 0.0  # of those, what the cluster spends with no traffic in as long


def busy_deltas(before: Samples, after: Samples, key: str = "busy_s") -> dict[str, float]:
    """Per replica of `after`, how much `key` grew since `before` (a replica new since then, from 0)."""
    return {replica: sample[key] - before.get(replica, {}).get(key, 0.0) for replica, sample in after.items()}


def utilization(before: Samples, after: Samples, wall_s: float) -> tuple[float | None, dict[str, float]]:
    """Busy over wall seconds per replica, and their mean (None without replicas or wall time)."""
    if wall_s <= 0 or not after:
        return None, {}
    per_replica = {replica: busy / wall_s for replica, busy in busy_deltas(before, after).items()}
    return sum(per_replica.values()) / len(per_replica), per_replica


def cpu_delta(before: dict[tuple, float], after: dict[tuple, float]) -> float:
    """CPU seconds the processes of `after` spent since `before` (keyed by pid and start time, so a
    reused pid is a new process; a process that ended in between is not counted)."""
    return sum(seconds - before.get(key, 0.0) for key, seconds in after.items())


def device_use(generator: tuple[Samples, Samples], scorer: tuple[Samples, Samples],
               cpu: tuple[dict, dict], wall_s: float, idle_cores: float = 0.0,
               enhancer: tuple[Samples, Samples] | None = None) -> DeviceUse:
    """A level's `DeviceUse` from the readings before and after it; `idle_cores`: the cluster's CPU
    seconds per second with no traffic; `enhancer`: its LLM's readings, when it runs one on the device
    (its calls are device time too, as the generator's and the scorer's are)."""
    mean, per_replica = utilization(*generator, wall_s)
    models = [generator, scorer] + ([enhancer] if enhancer is not None else [])
    device_s = sum(sum(busy_deltas(*readings).values()) for readings in models)
    model_cpu_s = sum(sum(busy_deltas(*readings, key="cpu_s").values()) for readings in models)
    return DeviceUse(mean, per_replica, device_s, model_cpu_s, cpu_delta(*cpu), idle_cores * wall_s)


def overhead_ms(latencies_s: list[float], device_s: float) -> float | None:
    """Mean end-to-end latency minus the mean device seconds per request, in ms: what serving adds
    around the model when requests do not wait for each other (the 1-client level)."""
    if not latencies_s:
        return None
    return (sum(latencies_s) - device_s) / len(latencies_s) * 1000


def cpu_ms_per_image(use: DeviceUse, images: int) -> float | None:
    """CPU ms per image spent outside the model calls."""
    return (use.ray_cpu_s - use.model_cpu_s - use.idle_cpu_s) / images * 1000 if images else None


def idle_cores(seconds: float = 3.0) -> float:
    """The cluster's CPU seconds per second over `seconds` with no traffic: Ray's background work
    (health checks, metrics, the controller's loop), which a level would otherwise charge to its
    images."""
    import time

    before, started = cluster_cpu_seconds(), time.perf_counter()
    time.sleep(seconds)
    return cpu_delta(before, cluster_cpu_seconds()) / (time.perf_counter() - started)


def cluster_cpu_seconds() -> dict[tuple, float]:
    """User + system CPU seconds of every process this one started, recursively: with a local Ray,
    its GCS, raylet and workers (the replicas, the proxy, the controller); not this process itself,
    which runs the benchmark's clients."""
    return {key: seconds for key, (_, seconds) in cluster_cpu_by_process().items()}


def cluster_cpu_by_process() -> dict[tuple, tuple[str, float]]:
    """`cluster_cpu_seconds`, each process with its role (`process_role`)."""
    import psutil

    samples = {}
    for process in psutil.Process().children(recursive=True):
        try:
            times = process.cpu_times()
            role = process_role(process.cmdline())
            # When it started, in seconds since boot: psutil's create_time is that plus the boot time,
            # which the kernel derives from the wall clock, so a clock step (NTP setting a freshly
            # started machine's clock) moved every process's create_time, every process looked new,
            # and a level counted the whole CPU of all of them (hundreds of ms an image instead of ~90).
            started = round(process.create_time() - psutil.boot_time(), 2)
            samples[(process.pid, started)] = (role, times.user + times.system)
        except psutil.Error:  # ended meanwhile
            continue
    return samples


def process_role(cmdline: list[str]) -> str:
    """What a Ray process does, from its command line: Ray titles its workers `ray::<actor>` (a Serve
    replica `ray::ServeReplica:<app>:<deployment>`, the proxy `ray::ProxyActor`), with `.method()`
    added while a task runs; its daemons are `gcs_server`, `raylet` and Python scripts (the
    dashboard's agent, the log monitor)."""
    if not cmdline:
        return "other"
    first = cmdline[0]
    if first.startswith("ray::"):
        title = first.split()[0][len("ray::"):]
        if title.startswith("ServeReplica:"):
            return title.split(":")[-1].split(".")[0]  # the deployment
        return title.split(".")[0]  # ProxyActor, ServeController, IDLE, ...
    scripts = [part for part in cmdline if part.endswith(".py")]
    name = (scripts[0] if scripts else first).rsplit("/", 1)[-1]
    return name.removesuffix(".py")


def cpu_by_role(before: dict[tuple, tuple[str, float]], after: dict[tuple, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds per role that the processes of `after` spent since `before` (as `cpu_delta`)."""
    roles: dict[str, float] = {}
    for key, (role, seconds) in after.items():
        spent = seconds - before.get(key, (role, 0.0))[1]
        roles[role] = roles.get(role, 0.0) + spent
    return roles


def read_device_times(app: str, deployment: str, tries_per_replica: int = 8) -> Samples:
    """Every running replica's `device_time()` of `deployment` in `app`, through a handle. A handle
    picks the replica itself, so it asks until each running replica has answered (or gives up after
    `tries_per_replica` calls per replica, leaving out the ones it did not reach)."""
    from ray import serve

    status = serve.status().applications[app].deployments.get(deployment)
    running = status.replica_states.get("RUNNING", 0) if status is not None else 0
    handle = serve.get_deployment_handle(deployment, app)
    samples: Samples = {}
    for _ in range(tries_per_replica * running):
        sample = handle.device_time.remote().result(timeout_s=30)
        if sample is None:  # a deployment with no model on the device (the template enhancer)
            return {}
        samples[sample["replica"]] = sample
        if len(samples) >= running:
            break
    return samples

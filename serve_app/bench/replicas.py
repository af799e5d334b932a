"""`genserve bench --replicas 1 2 4 8 16`: how throughput grows with GPUs, on one node.

For each N, a Ray cluster of its own declares N logical GPUs (`ray.init(num_gpus=N)`) and enough
logical CPUs for every replica's reservation; the chosen model's deployment gets N replicas of one
whole GPU each (`with_replicas`), so on a simulated device each replica has a simulated card of its
own (its memory ledger is keyed by the GPU index Ray gives it). `clients_per_replica x N` clients
(genserve's `AsyncClient`, as in `--concurrency`; rounded up) then send `requests_per_replica x N` requests for
that model at its default size and steps, after a warm-up of N. Every N gets the same requests per
replica. The drain at the end still weighs more at large N: one replica runs its last image to the
end, while of 16 some finish a few seconds before the last one. So each replica needs many images
(30 by default) for the ratio to N = 1 to be the scaling itself: at 10 a replica, 16 simulated GPUs
measured 13.6x with every replica 85% busy; at 30, 15.2x and 95% (docs/benchmarks.md).

Around each run it reads what `--concurrency` reads (`serve_app.bench.device`): the model replicas'
busy time (utilization, each replica's), the cluster's CPU outside the model per image, and the CPU
per image by Ray process role (`cpu_by_role`: the proxy, the Ingress, each deployment, the
controller, GCS, raylet), each role's idle rate (measured for 5 s, 2 s after the warm-up) taken off.
"""

from __future__ import annotations

import asyncio
import math
import os
from dataclasses import dataclass, field

from serve_app.bench.concurrency import Level, level_json, run_level
from serve_app.config import AppArgs

# A deployment whose config leaves num_cpus unset reserves its decorator's; at most 1 in genserve.
_UNSET_CPUS = 1.0


@dataclass
class ReplicaRun:
    """One N: the level it measured and the CPU per image by process role."""

    replicas: int
    ingress_replicas: int
    level: Level
    cpu_ms_by_role: dict[str, float] = field(default_factory=dict)  # idle rate taken off; per image
    idle_cores_by_role: dict[str, float] = field(default_factory=dict)  # CPU s per s with no traffic


def with_replicas(args: AppArgs, model_id: str, replicas: int, ingress_replicas: int | None = None,
                  max_ongoing_requests: int | None = None) -> AppArgs:
    """`args` with image model `model_id` at `replicas` fixed replicas of one whole GPU each (its
    autoscaling dropped) and, when given, the Ingress at `ingress_replicas` fixed replicas and the
    model's `max_ongoing_requests`."""
    if model_id not in {entry.id for entry in args.served_image_models}:
        known = ", ".join(entry.id for entry in args.served_image_models)
        raise ValueError(f"--model: {model_id!r} is not an image model of this config; it serves {known}")
    entries = []
    for entry in args.image_models:
        if entry.id == model_id:
            deployment = entry.deployment.model_dump(exclude_unset=True)
            deployment.pop("autoscaling", None)
            deployment.update(num_replicas=replicas, num_gpus=1)
            if max_ongoing_requests is not None:
                deployment["max_ongoing_requests"] = max_ongoing_requests
            entry = type(entry).model_validate({**entry.model_dump(exclude_unset=True), "deployment": deployment})
        entries.append(entry.model_dump(exclude_unset=True))
    deployments = {name: options.model_dump(exclude_unset=True) for name, options in args.deployments.items()}
    if ingress_replicas is not None:
        ingress = {key: value for key, value in deployments.get("Ingress", {}).items() if key != "autoscaling"}
        deployments["Ingress"] = {**ingress, "num_replicas": ingress_replicas}
    return AppArgs.model_validate({**args.model_dump(exclude_unset=True), "image_models": entries,
                                   "deployments": deployments})


def ingress_replicas_of(args: AppArgs) -> int:
    """The Ingress replicas `args` starts with (autoscaling: its minimum, at least 1)."""
    options = args.deployments.get("Ingress")
    if options is None:
        return 1
    if options.autoscaling is not None:
        return max(1, options.autoscaling.min_replicas)
    return options.num_replicas or 1


def logical_cpus(args: AppArgs) -> int:
    """Logical CPUs for Ray to declare so every replica's reservation fits (at max replicas): the
    reservations are a placement unit here, not the machine's cores, and a simulated replica waits."""
    reserved = sum((options.num_cpus if options.num_cpus is not None else _UNSET_CPUS) * options.max_replicas
                   for options in args.all_deployment_options().values())
    return max(os.cpu_count() or 1, math.ceil(reserved) + 1)


def run_replica_benchmark(args: AppArgs, model_id: str, counts: list[int], requests_per_replica: int,
                          clients_per_replica: float, ingress_replicas: int | None = None,
                          max_ongoing_requests: int | None = None, on_run=None) -> list[ReplicaRun]:
    """Each N of `counts` on a Ray of its own (the GPU count is fixed when Ray starts); `on_run(run)`
    is called as each finishes, so a run cut short still shows what it measured."""
    runs = []
    for replicas in counts:
        scaled = with_replicas(args, model_id, replicas, ingress_replicas, max_ongoing_requests)
        clients = math.ceil(clients_per_replica * replicas)
        run = _one_count(scaled, model_id, replicas, requests_per_replica * replicas, clients)
        runs.append(run)
        if on_run is not None:
            on_run(run)
    return runs


def _one_count(args: AppArgs, model_id: str, replicas: int, requests: int, clients: int) -> ReplicaRun:
    import ray
    from ray import serve

    from serve_app import APP_NAME
    from serve_app.bench.images import _free_port
    from serve_app.builder import build_app

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    body = {"prompt": "a lighthouse on a cliff at dusk", "model": model_id}
    # A cluster of its own, as --concurrency's: the CPU read is that of this cluster's processes only.
    ray.init(address="local", num_gpus=replicas, num_cpus=logical_cpus(args), include_dashboard=False,
             log_to_driver=False)
    try:
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        url = f"http://127.0.0.1:{port}"
        serve.run(build_app(args), name=APP_NAME, route_prefix="/")
        asyncio.run(run_level(url, body, "warm-up", replicas, replicas))
        level, roles, idle = _measured(args, model_id, url, body, clients, requests)
    finally:
        serve.shutdown()
        ray.shutdown()
    return ReplicaRun(replicas, ingress_replicas_of(args), level, roles, idle)


def _measured(args: AppArgs, model_id: str, url: str, body: dict, clients: int,
              requests: int) -> tuple[Level, dict, dict]:
    """The level with its `DeviceUse`, CPU ms per image by role with each role's idle rate taken off,
    and those idle rates (CPU seconds per second)."""
    import time

    from serve_app import APP_NAME
    from serve_app.bench.device import cluster_cpu_by_process, cpu_by_role, device_use, read_device_times

    generator = args.image_model(model_id).deployment_name
    time.sleep(2.0)  # the warm-up's last answers leave work behind (logs, metrics) that is not idle work
    idle_started, idle_before = time.perf_counter(), cluster_cpu_by_process()
    time.sleep(5.0)
    idle_rates = {role: seconds / (time.perf_counter() - idle_started)
                  for role, seconds in cpu_by_role(idle_before, cluster_cpu_by_process()).items()}

    def readings() -> tuple:
        return (read_device_times(APP_NAME, generator), read_device_times(APP_NAME, "ClipScorer"),
                cluster_cpu_by_process())

    before = readings()
    level = asyncio.run(run_level(url, body, f"{model_id}", clients, requests))
    after = readings()
    cpu = tuple({key: seconds for key, (_, seconds) in sample.items()} for sample in (before[2], after[2]))
    level.device = device_use((before[0], after[0]), (before[1], after[1]), cpu, level.wall_s,
                              sum(idle_rates.values()))
    spent = cpu_by_role(before[2], after[2])
    return level, roles_per_image(spent, idle_rates, level.wall_s, level.images), idle_rates


def roles_per_image(spent: dict[str, float], idle_rates: dict[str, float], wall_s: float,
                    images: int) -> dict[str, float]:
    """CPU ms per image by role: what each role spent in the run less its idle rate over the run's
    wall time (Ray's background work, not the images'), largest first."""
    if not images:
        return {}
    per_image = {role: (seconds - idle_rates.get(role, 0.0) * wall_s) / images * 1000
                 for role, seconds in spent.items()}
    return dict(sorted(per_image.items(), key=lambda item: -item[1]))


def run_json(run: ReplicaRun, baseline: float | None) -> dict:
    """One N as `--replicas ... --json` prints it: `level_json`'s fields, the ingress replicas, the
    throughput's ratio to N = 1 (or the first N) and the CPU per image by role."""
    throughput = run.level.throughput
    return {"replicas": run.replicas, "ingress_replicas": run.ingress_replicas, **level_json(run.level),
            "x_first": round(throughput / baseline, 3) if baseline else None,
            "cpu_ms_per_image_by_role": {role: round(ms, 1) for role, ms in run.cpu_ms_by_role.items()},
            "idle_cores_by_role": {role: round(cores, 4) for role, cores in run.idle_cores_by_role.items()}}


def format_replica_table(runs: list[ReplicaRun]) -> str:
    """One row per N: throughput, its ratio to the first N, p50/p95, utilization (mean, then each
    replica's), CPU ms per image outside the model, the ingress replicas."""
    baseline = runs[0].level.throughput if runs else None
    header = (f"{'GPUs':>5}{'ingress':>8}{'clients':>8}{'ok':>6}{'fail':>5}{'img/s':>8}{'x first':>8}"
              f"{'p50 s':>7}{'p95 s':>7}{'util %':>7}{'cpu ms/img':>11}  util % per replica")
    lines = [header]
    for run in runs:
        row = run_json(run, baseline)
        mean = "-" if row["utilization"] is None else f"{row['utilization'] * 100:.0f}"
        each = " ".join(f"{value * 100:.0f}" for value in row["utilization_per_replica"].values())
        cpu = "-" if row["cpu_ms_per_image"] is None else f"{row['cpu_ms_per_image']:.1f}"
        ratio = "-" if row["x_first"] is None else f"{row['x_first']:.2f}"
        lines.append(f"{run.replicas:>5}{run.ingress_replicas:>8}{run.level.clients:>8}{row['ok']:>6}"
                     f"{row['failures']:>5}{row['throughput']:>8.3f}{ratio:>8}{run.level.percentile(50):>7.2f}"
                     f"{run.level.percentile(95):>7.2f}{mean:>7}{cpu:>11}  {each}")
    return "\n".join(lines)


def format_role_table(runs: list[ReplicaRun], top: int = 8) -> str:
    """CPU ms per image by Ray process role, one column per N; the `top` largest at the largest N,
    the rest summed as `others`."""
    if not runs:
        return ""
    order = list(runs[-1].cpu_ms_by_role)[:top]
    lines = [f"{'role (CPU ms per image)':<28}" + "".join(f"{f'N={run.replicas}':>9}" for run in runs)]
    for role in [*order, "others"]:
        cells = []
        for run in runs:
            ms = (sum(v for r, v in run.cpu_ms_by_role.items() if r not in order) if role == "others"
                  else run.cpu_ms_by_role.get(role))
            cells.append(f"{'-' if ms is None else f'{ms:.1f}':>9}")
        lines.append(f"{role:<28}" + "".join(cells))
    return "\n".join(lines)


def scaling_line(runs: list[ReplicaRun]) -> str:
    """`scaling: 16 replicas 14.2x one`: the largest N's throughput over the first N's (N = 1 when
    it was run; otherwise the ratio is to the smallest N, and the line says so)."""
    if not runs:
        return "scaling: nothing measured"
    first = min(runs, key=lambda run: run.replicas)
    last = max(runs, key=lambda run: run.replicas)
    ratio = last.level.throughput / first.level.throughput if first.level.throughput else float("nan")
    one = "one" if first.replicas == 1 else f"{first.replicas} replicas"
    return f"scaling: {last.replicas} replicas {ratio:.1f}x {one}"

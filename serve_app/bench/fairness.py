"""`genserve bench-fairness`: is the job queue fair between keys (docs/jobs.md#fair-between-keys)?

One app (its own Ray cluster and a temporary job store) with a keys file of five keys, each its
own group, so the phases do not share usage:

1. idle: key `b_idle` submits a few jobs one at a time: B's wait on an idle service;
2. A alone: key `a_alone` submits `a_jobs` at once: A's throughput and one A job's run time;
3. A and B, equal weights: `a_fair` submits `a_jobs` at once, `b_fair` one job every
   `b_interval_s` while A's backlog lasts: B's p95 wait (submit to start) against the bound
   2 x (B's idle wait) + (one A job's run time) (a running job is not preempted), and A+B
   throughput against A alone's;
4. weights 3:1: `a_heavy` (weight 3) and `b_light` (weight 1) submit `backlog` jobs each at
   once: the GPU-seconds (`timings.device`) of the jobs that started while both still had jobs
   queued, as shares.

Waits and run times are the store's own (`timings.queued`, `timings.running` of GET /v1/jobs/{id}).
On configs/sim-h200.yaml every GPU figure is simulated.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from serve_app.bench.images import serving
from serve_app.config import app_args_from_config

FINISHED = ("succeeded", "failed", "cancelled")
KEYS = {"b_idle": 1.0, "a_alone": 1.0, "a_fair": 1.0, "b_fair": 1.0, "a_heavy": 3.0, "b_light": 1.0}


@dataclass
class Done:
    """A finished job as the store recorded it."""

    key: str
    created_at: float
    started_at: float
    finished_at: float
    wait_s: float
    device_s: float = 0.0


@dataclass
class FairnessReport:
    b_idle_wait_s: float
    a_run_s: float
    a_alone_per_s: float
    b_waits_s: list[float]
    together_per_s: float
    shares: dict[str, float] = field(default_factory=dict)
    sizes: dict[str, float] = field(default_factory=dict)
    simulated: str | None = None  # the simulated device profile, when the image model runs on one

    @property
    def bound_s(self) -> float:
        return 2 * self.b_idle_wait_s + self.a_run_s

    @property
    def b_p95_s(self) -> float:
        return percentile(self.b_waits_s, 95)

    def lines(self) -> list[str]:
        heavy, light = self.shares.get("a_heavy", 0.0), self.shares.get("b_light", 0.0)
        ratio = heavy / light if light else float("inf")
        return [
            f"sizes: {', '.join(f'{name} {value:g}' for name, value in self.sizes.items())}",
            f"B idle wait {self.b_idle_wait_s:.3f}s, one A job runs {self.a_run_s:.3f}s: bound {self.bound_s:.3f}s",
            f"B waits behind A's backlog: p50 {percentile(self.b_waits_s, 50):.3f}s p95 {self.b_p95_s:.3f}s "
            f"({len(self.b_waits_s)} jobs)",
            f"throughput: A alone {self.a_alone_per_s:.2f} jobs/s, A+B {self.together_per_s:.2f} jobs/s",
            f"weights 3:1, both backlogged: GPU-seconds {heavy:.1f} : {light:.1f} (ratio {ratio:.2f})",
            summary_line(self.b_p95_s / self.bound_s if self.bound_s else float("inf"),
                         self.together_per_s / self.a_alone_per_s if self.a_alone_per_s else 0.0, heavy, light),
        ]


def summary_line(wait_ratio: float, throughput_ratio: float, heavy_s: float, light_s: float) -> str:
    """The benchmark's last line, for scripts: shares as X:Y with Y scaled to 1."""
    share = heavy_s / light_s if light_s else float("inf")
    return (f"fairness: B p95 wait {wait_ratio:.2f}x bound; A+B throughput {throughput_ratio:.2f}x A alone; "
            f"weights 3:1 -> shares {share:.2f}:1")


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def throughput(jobs: list[Done]) -> float:
    """Jobs per second from the first submit to the last finish."""
    span = max(job.finished_at for job in jobs) - min(job.created_at for job in jobs)
    return len(jobs) / span if span > 0 else float("inf")


def backlogged_shares(jobs: list[Done]) -> dict[str, float]:
    """GPU-seconds per key of the jobs that started while every key still had jobs waiting: before
    the first key's last start (after that, the other key runs alone)."""
    last_start = {}
    for job in jobs:
        last_start[job.key] = max(last_start.get(job.key, 0.0), job.started_at)
    until = min(last_start.values())
    totals = dict.fromkeys(last_start, 0.0)
    for job in jobs:
        if job.started_at <= until:
            totals[job.key] += job.device_s
    return totals


def _keys_file(folder: str) -> tuple[str, dict[str, str]]:
    import yaml

    from serve_app.security.keys import key_entry_yaml, new_key

    entries, secrets = [], {}
    for name, weight in {**KEYS, "admin": 1.0}.items():
        _, key = new_key()
        scopes = ["admin"] if name == "admin" else ["generate", "read"]
        entries.append({**key_entry_yaml(name, name, key, scopes), "weight": weight})
        secrets[name] = key
    path = Path(folder) / "keys.yaml"
    path.write_text(yaml.safe_dump({"url_signing_secret": "f" * 64, "keys": entries}))
    path.chmod(0o600)
    return str(path), secrets


class _Bench:
    def __init__(self, client, secrets: dict[str, str], body: dict):
        self.client, self.secrets, self.body = client, secrets, body
        self.submitted: dict[str, list[str]] = {}
        self._seed = 0

    def submit(self, key: str) -> str:
        self._seed += 1
        response = self.client.post("/v1/jobs", headers=self._auth(key),
                                    json={"kind": "image", "request": {**self.body, "seed": self._seed}})
        response.raise_for_status()
        self.submitted.setdefault(key, []).append(response.json()["id"])
        return response.json()["id"]

    def _auth(self, key: str) -> dict:
        return {"Authorization": f"Bearer {self.secrets[key]}"}

    def status(self, job_id: str) -> dict:
        response = self.client.get(f"/v1/jobs/{job_id}", headers=self._auth("admin"))
        response.raise_for_status()
        return response.json()

    def wait(self, ids: list[str], timeout_s: float = 3600.0) -> None:
        deadline = time.monotonic() + timeout_s
        pending = list(ids)
        while pending:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(pending)} jobs did not finish within {timeout_s:g}s")
            if self.status(pending[-1])["state"] in FINISHED:
                pending = [job_id for job_id in pending if self.status(job_id)["state"] not in FINISHED]
            if pending:
                time.sleep(0.5)

    def done(self, key: str, with_device: bool = False) -> list[Done]:
        jobs = []
        for job_id in self.submitted.get(key, []):
            status = self.status(job_id)
            if status["state"] != "succeeded":
                raise RuntimeError(f"job {job_id} of {key} ended {status['state']}: {status.get('error')}")
            device = 0.0
            if with_device:
                result = self.client.get(f"/v1/jobs/{job_id}/result", headers=self._auth("admin")).json()
                device = result["timings"].get("device", status["timings"]["running"])
            jobs.append(Done(key, status["created_at"], status["started_at"], status["finished_at"],
                             status["timings"]["queued"], device))
        return jobs


def run_fairness_benchmark(config: str, a_jobs: int = 500, b_interval_s: float = 2.0, backlog: int = 300,
                           idle_jobs: int = 5) -> FairnessReport:
    args = app_args_from_config(config)
    simulated = next((entry.device.simulated for entry in args.served_image_models if entry.device.simulated), None)
    body = {"prompt": "a lighthouse on a cliff at dusk", "enhance": False}
    with tempfile.TemporaryDirectory(prefix="genserve-bench-fairness-") as folder:
        keys_file, secrets = _keys_file(folder)
        args = args.model_copy(update={
            "jobs": args.jobs.model_copy(update={"data_dir": str(Path(folder) / "jobs")}),
            "auth": args.auth.model_copy(update={"keys_file": keys_file}),
        })
        with serving(args) as client:
            bench = _Bench(client, secrets, body)
            for _ in range(idle_jobs):  # one at a time: the wait of a job on an idle service
                bench.wait([bench.submit("b_idle")])
            idle = bench.done("b_idle")
            bench.wait([bench.submit("a_alone") for _ in range(a_jobs)])
            alone = bench.done("a_alone")
            backlog_a = [bench.submit("a_fair") for _ in range(a_jobs)]
            while bench.status(backlog_a[-1])["state"] == "queued":
                bench.submit("b_fair")
                time.sleep(b_interval_s)
            bench.wait(backlog_a + bench.submitted["b_fair"])
            fair_a, fair_b = bench.done("a_fair"), bench.done("b_fair")
            heavy = [bench.submit(key) for _ in range(backlog) for key in ("a_heavy", "b_light")]
            bench.wait(heavy)
            weighted = backlogged_shares(bench.done("a_heavy", True) + bench.done("b_light", True))
    return FairnessReport(
        b_idle_wait_s=statistics.median(job.wait_s for job in idle),
        a_run_s=statistics.median(job.finished_at - job.started_at for job in alone),
        a_alone_per_s=throughput(alone),
        b_waits_s=[job.wait_s for job in fair_b],
        together_per_s=throughput(fair_a + fair_b),
        shares=weighted,
        sizes={"A jobs": a_jobs, "B every s": b_interval_s, "3:1 backlog each": backlog, "idle B jobs": idle_jobs},
        simulated=simulated,
    )

"""`genserve bench-overload`: C concurrent clients for D seconds against a running app.

Each client posts `POST /v1/images` back to back. A 503/429 is counted, and the client goes on
at once (the most pressure), or with `honour_retry_after` waits the `Retry-After` seconds first,
as a well-behaved client does. Per client count it prints the status
counts, p50/p95 latency of the 200s and of the rejections, throughput (200s per second) and its
ratio to the first client count's, and the resident memory of the Ray processes on this node
before and after. A benchmark, not a test: run it against a deployed app (make serve).
"""

from __future__ import annotations

import asyncio
import collections
import time
from dataclasses import dataclass, field

import httpx


@dataclass
class OverloadRun:
    clients: int
    seconds: float
    statuses: collections.Counter = field(default_factory=collections.Counter)
    ok_latencies: list[float] = field(default_factory=list)
    rejected_latencies: list[float] = field(default_factory=list)
    errors: collections.Counter = field(default_factory=collections.Counter)  # transport errors, by type
    memory_before_mib: float = 0.0
    memory_after_mib: float = 0.0

    @property
    def throughput(self) -> float:
        return len(self.ok_latencies) / self.seconds

    @property
    def server_errors(self) -> int:
        return sum(count for status, count in self.statuses.items() if status >= 500 and status not in (503, 504))


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def ray_memory_mib() -> float:
    """Resident memory of this node's Ray processes (raylet, GCS, workers and replicas), MiB."""
    import psutil

    total = 0
    for process in psutil.process_iter(["name", "cmdline", "memory_info"]):
        try:
            name = process.info["name"] or ""
            command = " ".join(process.info["cmdline"] or [])
            if name.startswith("ray::") or "raylet" in name or "gcs_server" in name or "ray::" in command:
                total += process.info["memory_info"].rss
        except (psutil.Error, TypeError):
            continue
    return total / 2**20


async def _client(http: httpx.AsyncClient, body: dict, until: float, run: OverloadRun,
                  honour_retry_after: bool = False) -> None:
    while time.monotonic() < until:
        started = time.perf_counter()
        try:
            response = await http.post("/v1/images", json=body)
        except httpx.HTTPError as error:
            run.errors[type(error).__name__] += 1
            continue
        elapsed = time.perf_counter() - started
        run.statuses[response.status_code] += 1
        if response.status_code == 200:
            run.ok_latencies.append(elapsed)
        elif response.status_code in (429, 503):
            run.rejected_latencies.append(elapsed)
            retry_after = response.headers.get("Retry-After", "")
            if honour_retry_after and retry_after.isdigit():
                await asyncio.sleep(min(float(retry_after), max(0.0, until - time.monotonic())))


async def _run(url: str, clients: int, seconds: float, body: dict, timeout_s: float,
               honour_retry_after: bool) -> OverloadRun:
    run = OverloadRun(clients=clients, seconds=seconds, memory_before_mib=ray_memory_mib())
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits) as http:
        until = time.monotonic() + seconds
        await asyncio.gather(*(_client(http, body, until, run, honour_retry_after) for _ in range(clients)))
    run.memory_after_mib = ray_memory_mib()
    return run


def run_overload(url: str, client_counts: list[int], seconds: float, body: dict, timeout_s: float = 600.0,
                 honour_retry_after: bool = False) -> list[OverloadRun]:
    return [asyncio.run(_run(url, clients, seconds, body, timeout_s, honour_retry_after)) for clients in client_counts]


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f}"


def format_overload_table(runs: list[OverloadRun]) -> str:
    header = (f"{'clients':>7} {'200':>6} {'503':>6} {'429':>5} {'504':>5} {'5xx':>4} {'other':>5} "
              f"{'200 p50 ms':>10} {'200 p95 ms':>10} {'rej p50 ms':>10} {'rej p95 ms':>10} "
              f"{'img req/s':>9} {'ratio':>6} {'ray MiB before':>14} {'after':>7}")
    lines = [header]
    base = runs[0].throughput if runs else 0.0
    for run in runs:
        s = run.statuses
        other = sum(count for status, count in s.items() if status not in (200, 503, 429, 504)) - run.server_errors
        other += sum(run.errors.values())
        ratio = f"{run.throughput / base:.2f}" if base else "-"
        lines.append(
            f"{run.clients:>7} {s[200]:>6} {s[503]:>6} {s[429]:>5} {s[504]:>5} {run.server_errors:>4} {other:>5} "
            f"{_ms(_quantile(run.ok_latencies, 0.5)):>10} {_ms(_quantile(run.ok_latencies, 0.95)):>10} "
            f"{_ms(_quantile(run.rejected_latencies, 0.5)):>10} {_ms(_quantile(run.rejected_latencies, 0.95)):>10} "
            f"{run.throughput:>9.2f} {ratio:>6} {run.memory_before_mib:>14.0f} {run.memory_after_mib:>7.0f}"
        )
    errors = collections.Counter()
    for run in runs:
        errors.update(run.errors)
    if errors:
        lines.append("transport errors: " + ", ".join(f"{name} x{count}" for name, count in errors.items()))
    return "\n".join(lines)


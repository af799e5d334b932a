"""`genserve bench --auth-overhead`: what API keys and per-key limits add to a cheap request.

Two measurements in one run:
- through Serve: the config is deployed twice in one Serve instance, side by side: `plain` at
  /plain without keys (a loopback client, so the Guard only checks the address) and `keyed` at
  /keyed with a keys file (the Guard hashes the bearer key, compares it with every entry, checks
  the scope and counts the request in the key's per-minute window in `auth.limits_storage`). One
  image job is run to the end in each, then its status (GET /v1/jobs/{id}, with the ownership
  check) is read `requests` times from each app in turn, A B A B, so drift in the machine's load
  hits both alike. The difference of the p50s is the overhead, plus noise.
- in process: the Guard alone around a no-op ASGI app, without and with a key: its own CPU cost,
  free of HTTP and Serve.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import time
from pathlib import Path

from serve_app.bench.images import Sample, _free_port
from serve_app.config import app_args_from_config

FINISHED = ("succeeded", "failed", "cancelled")


def _keys_file(folder: str) -> tuple[str, str]:
    import yaml

    from serve_app.security.keys import key_entry_yaml, new_key

    key_id, key = new_key()
    # Limits high enough never to refuse, so every request pays for the counting.
    entry = key_entry_yaml(key_id, "bench", key, ["generate", "read"],
                           {"requests_per_minute": 10**9, "concurrent_requests": 10**6})
    path = Path(folder) / "keys.yaml"
    path.write_text(yaml.safe_dump({"url_signing_secret": "b" * 64, "keys": [entry]}))
    return str(path), key


def _finished_job(client, prefix: str, headers: dict) -> str:
    body = {"kind": "image", "request": {"prompt": "a lighthouse", "num_inference_steps": 1, "seed": 1}}
    accepted = client.post(f"{prefix}/v1/jobs", json=body, headers=headers)
    accepted.raise_for_status()
    job_id = accepted.json()["id"]
    deadline = time.monotonic() + 300
    while client.get(f"{prefix}/v1/jobs/{job_id}", headers=headers).json()["state"] not in FINISHED:
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} did not finish within 300 s")
        time.sleep(0.2)
    return job_id


@contextlib.contextmanager
def _two_apps(plain, keyed):
    import httpx
    import ray
    from ray import serve

    from serve_app.builder import build_app

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # Two graphs side by side reserve twice the config's CPUs: declare enough logical CPUs for both
    # (they are reservations for placement; the work is light next to what was measured).
    ray.init(address="local", include_dashboard=False, log_to_driver=False, num_cpus=2 * max(2, os.cpu_count() or 2))
    try:
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(plain), name="plain", route_prefix="/plain")
        serve.run(build_app(keyed), name="keyed", route_prefix="/keyed")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=300) as client:
            yield client
    finally:
        serve.shutdown()
        ray.shutdown()


def _through_serve(args, requests: int, warmup: int, limits_storage: str | None) -> list[Sample]:
    with tempfile.TemporaryDirectory(prefix="genserve-bench-auth-") as folder:
        keys_file, key = _keys_file(folder)
        jobs = args.jobs
        plain = args.model_copy(update={
            "auth": args.auth.model_copy(update={"keys_file": None}),
            "jobs": jobs.model_copy(update={"data_dir": f"{folder}/plain-jobs", "redis_prefix": "bench:plain"})})
        update = {"keys_file": keys_file, **({"limits_storage": limits_storage} if limits_storage else {})}
        keyed = args.model_copy(update={
            "auth": args.auth.model_copy(update=update),
            "jobs": jobs.model_copy(update={"data_dir": f"{folder}/keyed-jobs", "redis_prefix": "bench:keyed"})})
        headers = {"Authorization": f"Bearer {key}"}
        label = f"HTTP, keys (limits in {keyed.limits_storage().split('://')[0]})"
        samples = [Sample("HTTP, no keys (loopback)", [], []), Sample(label, [], [])]
        with _two_apps(plain, keyed) as client:
            paths = [(f"/plain/v1/jobs/{_finished_job(client, '/plain', {})}", {}),
                     (f"/keyed/v1/jobs/{_finished_job(client, '/keyed', headers)}", headers)]
            for index in range(warmup + requests):
                for sample, (path, sent) in zip(samples, paths):
                    started = time.perf_counter()
                    response = client.get(path, headers=sent)
                    elapsed = time.perf_counter() - started
                    response.raise_for_status()
                    if index >= warmup:
                        sample.seconds.append(elapsed)
        return samples


def _guard_in_process(requests: int, warmup: int) -> list[Sample]:
    """The Guard around a no-op app, called as Serve's replica calls the app: one ASGI call each."""
    from starlette.datastructures import State

    from serve_app.security.guard import Auth, Guard

    async def noop(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    class App:
        def __init__(self, auth):
            self.state = State()
            self.state.auth = auth

    async def receive():
        return {"type": "http.request", "body": b""}

    async def send(message):
        if message["type"] == "http.response.start" and message["status"] != 200:
            raise RuntimeError(f"the Guard answered {message['status']}")

    with tempfile.TemporaryDirectory(prefix="genserve-bench-guard-") as folder:
        keys_file, key = _keys_file(folder)
        cases = [("in process: Guard, no keys (loopback)", Auth(None, metrics=False), []),
                 ("in process: Guard, keys (limits in memory)", Auth(keys_file, metrics=False),
                  [(b"authorization", f"Bearer {key}".encode())])]
        samples = []
        for name, auth, headers in cases:
            guard = Guard(noop)
            scope = {"type": "http", "method": "GET", "path": "/v1/jobs/abc", "root_path": "", "query_string": b"",
                     "headers": headers, "client": ("127.0.0.1", 5000), "app": App(auth)}
            sample = Sample(name, [], [])

            async def run(guard=guard, scope=scope, sample=sample):
                for index in range(warmup + requests):
                    started = time.perf_counter()
                    await guard(dict(scope), receive, send)
                    if index >= warmup:
                        sample.seconds.append(time.perf_counter() - started)

            asyncio.run(run())
            samples.append(sample)
    return samples


def run_auth_benchmark(config: str, requests: int, warmup: int, limits_storage: str | None = None) -> list[Sample]:
    args = app_args_from_config(config)
    return [*_through_serve(args, requests, warmup, limits_storage), *_guard_in_process(requests * 10, warmup * 10)]


def format_auth_table(samples: list[Sample]) -> str:
    """p50/p95 per path; each keyed row is compared with the row before it (its no-keys twin)."""
    lines = [f"{'GET /v1/jobs/{id}':<44}{'n':>6}{'p50 ms':>9}{'p95 ms':>9}{'p50 +ms':>9}{'p50 x':>8}"]
    for index, sample in enumerate(samples):
        baseline = samples[index - 1] if index % 2 else sample
        lines.append(f"{sample.name:<44}{len(sample.seconds):>6}{sample.p50 * 1000:>9.3f}"
                     f"{sample.percentile(95) * 1000:>9.3f}{(sample.p50 - baseline.p50) * 1000:>9.3f}"
                     f"{sample.p50 / baseline.p50:>8.3f}")
    return "\n".join(lines)

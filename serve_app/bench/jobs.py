"""`genserve bench-jobs`: what an async job costs over the same request made synchronously.

On one running app, each round sends the same image request twice, one after the other: once to
POST /v1/images, once as a job (POST /v1/jobs, then its event stream to the final state, which
carries the result JSON, then the PNG files it links). Alternating keeps both paths under the
same machine load. It reports:

- submit: POST /v1/jobs until the 202, i.e. validation plus the durable write;
- job, final event: from submit to the final `state` event (with the result JSON) on the stream;
- job + files: the same plus GET of every file, i.e. everything the sync call returns;
- the overhead: the median over rounds of (job + files) - (sync) of the same round.

Jobs go to a temporary data directory, so the numbers include SQLite's fsync on that disk.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time

from serve_app.bench.images import Sample, _request_body, serving
from serve_app.config import app_args_from_config


def _job_round(client, body: dict) -> tuple[float, float, float]:
    """Seconds to the 202, to the final event, and to the last file; for one job."""
    started = time.perf_counter()
    response = client.post("/v1/jobs", json={"kind": "image", "request": body})
    response.raise_for_status()
    submitted = time.perf_counter()
    job_id = response.json()["id"]
    final = None
    with client.stream("GET", f"/v1/jobs/{job_id}/events") as stream:
        event = None
        for line in stream.iter_lines():
            if line.startswith("event: "):
                event = line.removeprefix("event: ")
            elif line.startswith("data: ") and event == "state":
                data = json.loads(line.removeprefix("data: "))
                if data["state"] in ("succeeded", "failed", "cancelled"):
                    final = data
    finished = time.perf_counter()
    if final is None or final["state"] != "succeeded":
        raise RuntimeError(f"job {job_id} did not succeed: {final}")
    for image in final["result"]["images"]:
        client.get(image["url"]).raise_for_status()
    return submitted - started, finished - started, time.perf_counter() - started


def run_jobs_benchmark(config: str, requests: int, warmup: int, width: int, height: int,
                       steps: int) -> tuple[list[Sample], list[float]]:
    """The samples (sync, submit, job to final event, job with its files) and per-round overheads."""
    args = app_args_from_config(config)
    body = _request_body(width, height, steps)
    names = ("sync: POST /v1/images", "job: submit (202)", "job: to final event", "job: + files")
    samples = [Sample(name, [], []) for name in names]
    overheads = []
    with tempfile.TemporaryDirectory(prefix="genserve-bench-jobs-") as data_dir:
        args = args.model_copy(update={"jobs": args.jobs.model_copy(update={"data_dir": data_dir})})
        with serving(args) as client:
            for index in range(warmup + requests):
                started = time.perf_counter()
                client.post("/v1/images", json=body).raise_for_status()
                sync = time.perf_counter() - started
                submit, final, complete = _job_round(client, body)
                if index >= warmup:
                    for sample, seconds in zip(samples, (sync, submit, final, complete)):
                        sample.seconds.append(seconds)
                    overheads.append(complete - sync)
    return samples, overheads


def format_jobs_table(samples: list[Sample], overheads: list[float]) -> str:
    header = f"{'path':<24}{'n':>4}{'p50 ms':>9}{'p95 ms':>9}"
    lines = [header]
    for sample in samples:
        lines.append(f"{sample.name:<24}{len(sample.seconds):>4}{sample.p50 * 1000:>9.1f}"
                     f"{sample.percentile(95) * 1000:>9.1f}")
    lines.append(f"job overhead over sync (median of per-round differences): {statistics.median(overheads) * 1000:.1f} ms")
    return "\n".join(lines)

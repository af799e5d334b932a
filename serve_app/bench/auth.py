"""`genserve bench --auth-overhead`: what API keys and per-key limits add to a cheap request.

The same config is served twice, one after the other in one run: without keys (a loopback client,
so the Guard only checks the address) and with a keys file (the Guard hashes the bearer key,
compares it with every entry, checks the scope, and counts the request in the key's
requests-per-minute window in `auth.limits_storage`). Each time one image job is run to the end,
then its status is read `requests` times, one at a time: GET /v1/jobs/{id}, which also does the
ownership check. The difference of the p50s is the auth overhead on that read.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from serve_app.bench.images import Sample, serving
from serve_app.config import app_args_from_config


def _status_reads(client, headers: dict, warmup: int, requests: int, name: str) -> Sample:
    body = {"kind": "image", "request": {"prompt": "a lighthouse", "num_inference_steps": 1, "seed": 1}}
    accepted = client.post("/v1/jobs", json=body, headers=headers)
    accepted.raise_for_status()
    job_id = accepted.json()["id"]
    deadline = time.monotonic() + 300
    while client.get(f"/v1/jobs/{job_id}", headers=headers).json()["state"] not in ("succeeded", "failed", "cancelled"):
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} did not finish within 300 s")
        time.sleep(0.2)
    sample = Sample(name, [], [])
    for index in range(warmup + requests):
        started = time.perf_counter()
        response = client.get(f"/v1/jobs/{job_id}", headers=headers)
        elapsed = time.perf_counter() - started
        response.raise_for_status()
        if index >= warmup:
            sample.seconds.append(elapsed)
    return sample


def run_auth_benchmark(config: str, requests: int, warmup: int, limits_storage: str | None = None) -> list[Sample]:
    import yaml

    from serve_app.security.keys import key_entry_yaml, new_key

    args = app_args_from_config(config)
    plain = args.model_copy(update={"auth": args.auth.model_copy(update={"keys_file": None})})
    samples = []
    with serving(plain) as client:
        samples.append(_status_reads(client, {}, warmup, requests, "no keys (loopback)"))
    with tempfile.TemporaryDirectory(prefix="genserve-bench-keys-") as folder:
        key_id, key = new_key()
        # Limits high enough never to refuse, so every request pays for the counting.
        entry = key_entry_yaml(key_id, "bench", key, ["generate", "read"],
                               {"requests_per_minute": 10**9, "concurrent_requests": 10**6})
        keys_file = Path(folder) / "keys.yaml"
        keys_file.write_text(yaml.safe_dump({"url_signing_secret": "b" * 64, "keys": [entry]}))
        update = {"keys_file": str(keys_file)}
        if limits_storage is not None:
            update["limits_storage"] = limits_storage
        keyed = args.model_copy(update={"auth": args.auth.model_copy(update=update)})
        with serving(keyed) as client:
            label = f"keys, limits in {keyed.limits_storage().split('://')[0]}"
            samples.append(_status_reads(client, {"Authorization": f"Bearer {key}"}, warmup, requests, label))
    return samples


def format_auth_table(samples: list[Sample]) -> str:
    baseline = samples[0]
    lines = [f"{'GET /v1/jobs/{id}':<34}{'n':>5}{'p50 ms':>9}{'p95 ms':>9}{'p50 +ms':>9}{'p50 x':>8}"]
    for sample in samples:
        lines.append(f"{sample.name:<34}{len(sample.seconds):>5}{sample.p50 * 1000:>9.2f}"
                     f"{sample.percentile(95) * 1000:>9.2f}{(sample.p50 - baseline.p50) * 1000:>9.2f}"
                     f"{sample.p50 / baseline.p50:>8.3f}")
    return "\n".join(lines)

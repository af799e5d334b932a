"""Helpers for tests of /v1/jobs over HTTP: submit, poll a job's state, read its event stream."""

from __future__ import annotations

import json

import httpx

from tests.helpers import wait_until

FINISHED = ("succeeded", "failed", "cancelled")


def submit(client: httpx.Client, kind: str, request: dict, **headers) -> dict:
    response = client.post("/v1/jobs", json={"kind": kind, "request": request}, headers=headers)
    assert response.status_code == 202, response.text
    body = response.json()
    assert response.headers["location"] == f"/v1/jobs/{body['id']}"
    return body


def job(client: httpx.Client, job_id: str) -> dict:
    response = client.get(f"/v1/jobs/{job_id}")
    assert response.status_code == 200, response.text
    return response.json()


def wait_for(client: httpx.Client, job_id: str, condition, timeout_s: float = 120, what: str = "") -> dict:
    """Poll the job until `condition(status)` holds; returns that status."""
    return wait_until(lambda: (lambda status: status if condition(status) else None)(job(client, job_id)),
                      timeout_s=timeout_s, interval_s=0.1, what=what or f"job {job_id}")


def wait_finished(client: httpx.Client, job_id: str, timeout_s: float = 120) -> dict:
    return wait_for(client, job_id, lambda status: status["state"] in FINISHED, timeout_s, f"job {job_id} finishing")


def in_stage(stage: str, min_step: int = 1):
    """A condition: the job is running `stage` with at least `min_step` steps done."""
    def condition(status: dict) -> bool:
        progress = status["progress"] or {}
        return status["state"] == "running" and progress.get("stage") == stage and progress["step"] >= min_step
    return condition


def events(client: httpx.Client, job_id: str, limit: int | None = None) -> list[tuple[str, dict]]:
    """The job's SSE events as (event, data), to the end of the stream or the first `limit`."""
    received = []
    with client.stream("GET", f"/v1/jobs/{job_id}/events") as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        event = None
        for line in response.iter_lines():
            if line.startswith("event: "):
                event = line.removeprefix("event: ")
            elif line.startswith("data: "):
                received.append((event, json.loads(line.removeprefix("data: "))))
                if limit is not None and len(received) >= limit:
                    break  # closes the stream
    return received

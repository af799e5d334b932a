"""The JobRunner replica killed (ray.kill) while a stream of jobs runs on the shared dev app: the
Ray half of the fault injection in tests/chaos.py (the in-process runs cover store errors and the
Redis pause on both stores; a rolling redeploy on real Serve is in test_jobs_restart.py). The
invariant is checked over the jobs' histories, as tests/chaos.py checks it."""

import time

import httpx
import pytest

from serve_app.jobs.dispatch import RESTART_REASON
from tests.chaos import unearned_attempts
from tests.helpers import wait_until
from tests.integration.jobs import FINISHED, in_stage, submit, wait_for

pytestmark = pytest.mark.integration


def _status(client: httpx.Client, job_id: str) -> dict | None:
    """The job's status; None while the JobRunner is down (the ingress answers 5xx then)."""
    try:
        response = client.get(f"/v1/jobs/{job_id}")
    except httpx.HTTPError:
        return None
    return response.json() if response.status_code == 200 else None


def _kill_the_job_runner() -> float:
    import ray

    [name] = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "#JobRunner#" in a["name"]]
    killed_at = time.time()
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    return killed_at


def test_killing_the_job_runner_mid_stream_ends_every_job_once_spending_only_the_interrupted_attempt(dev_app):
    client, data_dir = dev_app["client"], dev_app["data_dir"]
    # One long job (8 slow steps of 0.5 s) that the kill interrupts, and a stream behind it.
    long = submit(client, "image", {"model": "slow", "prompt": "chaos long", "num_inference_steps": 8, "seed": 1})
    stream = [submit(client, "image", {"prompt": f"chaos {i}", "seed": i})["id"] for i in range(5)]
    wait_for(client, long["id"], in_stage("generate", min_step=1), what="the slow job denoising")
    killed_at = _kill_the_job_runner()
    ids = [long["id"], *stream]

    def all_finished():
        statuses = {job_id: _status(client, job_id) for job_id in ids}
        return statuses if all(s is not None and s["state"] in FINISHED for s in statuses.values()) else None

    statuses = wait_until(all_finished, timeout_s=240, interval_s=0.5, what="every job finishing after the kill")
    print(f"\njob runner killed mid-stream: every job finished {time.time() - killed_at:.1f}s after the kill")
    for job_id, status in statuses.items():
        states = [entry["state"] for entry in status["history"]]
        assert status["state"] == "succeeded" and states.count("succeeded") == 1 and states[-1] == "succeeded", status
        assert [f["name"] for f in status["files"]] == ["image-0.png"]
        assert sorted(p.name for p in (data_dir / "files" / job_id).iterdir()) == ["image-0.png"], "one result"
        # An attempt counted as interrupted is earned only by a run the killed runner began: before
        # the kill, or as it died (ray.kill returns at once); its successor claims nothing until
        # the lease (6 s, renewed every 2 s) lapses, 4 s after the kill at the earliest.
        assert unearned_attempts(status["history"], lambda run: run["at"] <= killed_at + 3) == [], status["history"]
    interrupted = statuses[long["id"]]
    assert interrupted["attempts"] == 2 and any((entry["reason"] or "").startswith(RESTART_REASON)
                                                for entry in interrupted["history"]), interrupted["history"]
    wait_until(lambda: client.get("/healthz").status_code == 200, timeout_s=60, what="all deployments healthy")

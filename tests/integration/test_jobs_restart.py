"""Shut the whole app down with jobs running and queued, start it again on the same store: every
job finishes, once, and the shutdown spent no attempt. Then the TTL: finished jobs and their files
are deleted. Last, a rolling redeploy (serve.run of the app with a changed jobs section) during a
running job: Serve starts a new JobRunner while the old one drains; the job succeeds once and its
attempt count is unchanged.

The app shut down is the shared dev app (last of its tests: it does not come back), on the Ray and
Serve it ran on; the one started again is the dev profile on its store, with the models its jobs need."""

import time

import pytest

from serve_app import APP_NAME
from serve_app.jobs.dispatch import SHUTDOWN_REASON
from serve_app.jobs.sqlite_store import SqliteJobStore
from tests.helpers import image_b64, wait_until
from tests.integration.apps import POOL, dev_args
from tests.integration.conftest import EXTRA_MODELS
from tests.integration.jobs import FINISHED, in_stage, job, submit, wait_for

pytestmark = pytest.mark.integration
DEV_APP_TURN = "last"
TTL_S = 8.0


def _shut_down_and_read(data_dir, ids: list[str]) -> dict:
    """Delete the app (each replica drains within its graceful_shutdown_timeout_s; the job runner
    puts its running jobs back), then read the jobs from its store."""
    from ray import serve

    POOL.retire()  # whatever happens next, the shared app is gone
    serve.delete(APP_NAME)
    store = SqliteJobStore(data_dir)
    at_shutdown = {job_id: store.get(job_id) for job_id in ids}
    store.close()
    return at_shutdown


def _restart_args(data_dir) -> dict:
    """The dev profile on the shared app's store, trimmed to the models its jobs need: the default
    video model, and the slow image model the redeploy's job runs on (the one image model the Ingress
    needs). Each replica is seconds of imports, again at the redeploy."""
    args = dev_args()
    # The redeploy's job: slow steps, so that it still runs when the old JobRunner stops.
    args["image_models"] = [model for model in EXTRA_MODELS if model["id"] == "slow"]
    args["video_models"] = [model for model in args["video_models"] if model["id"] == "svd"]
    args["jobs"]["data_dir"] = str(data_dir)
    args["jobs"]["max_concurrent_jobs"] = {"image": 1, "video": 1}
    args["jobs"]["progress_interval_s"] = 0
    # A shutdown (the session's end) that does not wait for a video to end; the runner has the time
    # to put it back.
    args["deployments"].setdefault("JobRunner", {})["graceful_shutdown_timeout_s"] = 30
    for model in args["video_models"]:
        model["deployment"]["graceful_shutdown_timeout_s"] = 1
    args["jobs"]["ttl_s"] = TTL_S
    args["jobs"]["sweep_interval_s"] = 0.5
    return args


def _results_once_finished(client, ids: list[str]) -> dict:
    """job id -> (status, result status code, file response), each read as its job finishes."""
    results = {}

    def all_finished_with_results():
        for job_id in ids:
            if job_id not in results:
                status = job(client, job_id)
                if status["state"] in FINISHED:  # read the result at once: it expires TTL_S later
                    result = client.get(f"/v1/jobs/{job_id}/result")
                    file = client.get(result.json()["url"]) if result.status_code == 200 else None
                    results[job_id] = (status, result.status_code, file)
        return len(results) == len(ids)

    wait_until(all_finished_with_results, timeout_s=240, interval_s=0.1, what="every job finishing")
    return results


@pytest.fixture(scope="module")
def restart(dev_app):
    from ray import serve

    from serve_app.builder import build_app

    client, data_dir = dev_app["client"], dev_app["data_dir"]
    # The shared app runs two videos at once (jobs.max_concurrent_jobs): the long one runs, a second
    # as long takes the other slot (or waits ahead of the others), two wait.
    long, _second = (submit(client, "video", {"image": image_b64(), "num_frames": 3, "num_inference_steps": 40,
                                              "seed": seed}) for seed in (1, 4))
    waiting = [submit(client, "video", {"image": image_b64(color=(20, 20, 200)), "num_frames": 2,
                                        "num_inference_steps": 3, "seed": seed}) for seed in (2, 3)]
    wait_for(client, long["id"], in_stage("video", min_step=1), what="the long video denoising")
    ids = [long["id"]] + [j["id"] for j in waiting]
    stopping = time.monotonic()
    at_shutdown = _shut_down_and_read(data_dir, ids)

    started = time.monotonic()
    serve.run(build_app(_restart_args(data_dir)), name=APP_NAME, route_prefix="/")
    ready = time.monotonic()
    results = _results_once_finished(client, ids)
    print(f"\nrestart: shut down in {started - stopping:.1f}s, app ready {ready - started:.1f}s later, every job "
          f"finished {time.monotonic() - ready:.1f}s after that")
    yield {"client": client, "data_dir": data_dir, "ids": ids, "at_shutdown": at_shutdown, "results": results}


def test_every_job_accepted_before_a_shutdown_finishes_after_a_restart(restart):
    at_shutdown = restart["at_shutdown"]
    long, *waiting = restart["ids"]
    assert (at_shutdown[long].state, at_shutdown[long].attempts) == ("queued", 0), \
        "the stopping runner put the running job back without spending its attempt"
    assert at_shutdown[long].history[-1]["reason"] == ("interrupted: the job runner stopped (shutdown or redeploy); "
                                                       "back in the queue (the attempt is not counted)")
    assert [at_shutdown[job_id].state for job_id in waiting] == ["queued", "queued"]
    for job_id in restart["ids"]:
        status, result_code, file = restart["results"][job_id]
        assert status["state"] == "succeeded", status
        assert result_code == 200 and file.status_code == 200 and file.headers["content-type"] == "video/mp4"
        assert [f["name"] for f in status["files"]] == ["video.mp4"]
    long_status = restart["results"][long][0]
    assert long_status["attempts"] == 1, "the interrupted run is not counted"
    assert [h["state"] for h in long_status["history"]] == ["queued", "running", "queued", "running", "succeeded"]
    assert all(restart["results"][job_id][0]["attempts"] == 1 for job_id in waiting), "queued jobs ran once"


def test_finished_jobs_and_their_files_expire_after_the_ttl(restart):
    client, files = restart["client"], restart["data_dir"] / "files"
    for job_id in restart["ids"]:
        status = restart["results"][job_id][0]
        assert status["expires_at"] == pytest.approx(status["finished_at"] + TTL_S)
    wait_until(lambda: all(client.get(f"/v1/jobs/{job_id}").status_code == 404 for job_id in restart["ids"]),
               timeout_s=60, what="the jobs expiring")
    assert not any((files / job_id).exists() for job_id in restart["ids"])
    for job_id in restart["ids"]:
        assert client.get(f"/v1/jobs/{job_id}/files/video.mp4").status_code == 404


def _status(client, job_id: str) -> dict | None:
    """The job's status; None while the redeploy swaps the ingress or the runner (a 5xx)."""
    import httpx

    try:
        response = client.get(f"/v1/jobs/{job_id}")
    except httpx.HTTPError:
        return None
    return response.json() if response.status_code == 200 else None


def test_a_rolling_redeploy_of_the_job_runner_spends_no_attempt_and_the_job_succeeds_once(restart):
    """serve.run with a changed jobs section (and no video model): Serve rolls every deployment (a new code version),
    starting the new JobRunner while the old drains. The old one puts its running job back
    without spending the attempt and releases the lease; the new one runs it."""
    from ray import serve

    from serve_app.builder import build_app

    client, data_dir = restart["client"], restart["data_dir"]
    accepted = submit(client, "image", {"model": "slow", "prompt": "redeployed", "num_inference_steps": 16,
                                        "seed": 9})
    wait_for(client, accepted["id"], in_stage("generate", min_step=1), what="the slow job denoising")
    args = _restart_args(data_dir)
    args["jobs"]["sweep_interval_s"] = 1.0  # the change that makes it a new version
    args["video_models"] = []  # deleted, not rolled: a replica fewer to load (the expired jobs' videos are done)
    redeployed_at = time.monotonic()
    serve.run(build_app(args), name=APP_NAME, route_prefix="/")

    def finished():
        status = _status(client, accepted["id"])
        return status if status is not None and status["state"] in FINISHED else None

    status = wait_until(finished, timeout_s=240, interval_s=0.2, what="the job finishing after the redeploy")
    print(f"\nrolling redeploy: the job succeeded {time.monotonic() - redeployed_at:.1f}s after serve.run began")
    states = [entry["state"] for entry in status["history"]]
    assert status["state"] == "succeeded" and states.count("succeeded") == 1, status
    assert status["attempts"] == 1, status["history"]
    assert states == ["queued", "running", "queued", "running", "succeeded"], status["history"]
    assert status["history"][2]["reason"].startswith(SHUTDOWN_REASON), "the old runner put it back as it stopped"
    assert sorted(p.name for p in (data_dir / "files" / accepted["id"]).iterdir()) == ["image-0.png"]

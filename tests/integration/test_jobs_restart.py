"""Shut the whole app down with jobs running and queued, start it again on the same store: every
job finishes, once, and the shutdown spent no attempt. Then the TTL: finished jobs and their files
are deleted."""

import time

import pytest

from serve_app.jobs.sqlite_store import SqliteJobStore
from tests.helpers import image_b64, wait_until
from tests.integration.apps import dev_args, running_app
from tests.integration.jobs import FINISHED, in_stage, job, submit, wait_for

pytestmark = pytest.mark.integration
TTL_S = 8.0


@pytest.fixture(scope="module")
def restart(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("jobs")
    args = dev_args()
    args["jobs"]["data_dir"] = str(data_dir)
    args["jobs"]["max_concurrent_jobs"] = {"image": 1, "video": 1}
    args["jobs"]["progress_interval_s"] = 0
    # A shutdown that does not wait for the video to end; the runner has the time to put it back.
    args["deployments"].setdefault("JobRunner", {})["graceful_shutdown_timeout_s"] = 30
    for model in args["video_models"]:
        model["deployment"]["graceful_shutdown_timeout_s"] = 1
    with running_app(args) as client:
        # One video slot: the long one runs, two wait.
        long = submit(client, "video", {"image": image_b64(), "num_frames": 3, "num_inference_steps": 40, "seed": 1})
        waiting = [submit(client, "video", {"image": image_b64(color=(20, 20, 200)), "num_frames": 2,
                                            "num_inference_steps": 3, "seed": seed}) for seed in (2, 3)]
        wait_for(client, long["id"], in_stage("video", min_step=1), what="the long video denoising")
    ids = [long["id"]] + [j["id"] for j in waiting]

    store = SqliteJobStore(data_dir)
    at_shutdown = {job_id: store.get(job_id) for job_id in ids}
    store.close()

    args["jobs"]["ttl_s"] = TTL_S
    args["jobs"]["sweep_interval_s"] = 0.5
    started = time.monotonic()
    with running_app(args) as client:
        ready = time.monotonic()
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
        print(f"\nrestart: app ready in {ready - started:.1f}s, every job finished {time.monotonic() - ready:.1f}s later")
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

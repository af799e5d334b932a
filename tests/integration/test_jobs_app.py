"""Async jobs on real Ray Serve with the dev profile (tiny FLUX, CLIP and SVD), SQLite store."""

import base64
import re
import shutil
import subprocess
import time

import imageio_ffmpeg
import pytest
from PIL import Image

from serve_app.services.media import read_png_meta
from tests.helpers import image_b64, wait_until
from tests.integration.apps import ROOT
from tests.integration.conftest import SHARED_MAX_BODY
from tests.integration.jobs import events, in_stage, job, submit, wait_finished, wait_for

pytestmark = pytest.mark.integration
MAX_BODY = SHARED_MAX_BODY


@pytest.fixture
def app(dev_app):
    """The shared dev app: jobs report every denoising step; bodies over 1 MiB get 413."""
    return dev_app


@pytest.fixture
def client(app):
    return app["client"]


def test_image_job_submit_events_result_matches_the_sync_endpoint(client):
    request = {"prompt": "a lighthouse at dusk", "seed": 42, "num_images": 2}
    accepted = submit(client, "image", request)
    assert accepted["state"] in ("queued", "running") and accepted["kind"] == "image"

    stream = events(client, accepted["id"])
    states = [data["state"] for event, data in stream if event == "state"]
    assert states == ["queued", "running", "succeeded"]
    steps = [(data["stage"], data["step"], data["steps"]) for event, data in stream if event == "progress"]
    assert steps and all(stage == "generate" and total == 4 for stage, _, total in steps)
    assert steps[-1][1] == 4 and [step for _, step, _ in steps] == sorted({step for _, step, _ in steps})
    final_event, final = stream[-1]
    assert final_event == "state" and final["job"]["links"]["result"] == f"/v1/jobs/{accepted['id']}/result"
    assert final["result"]["images"][0]["url"] == f"/v1/jobs/{accepted['id']}/files/image-0.png"

    status = job(client, accepted["id"])
    assert status["state"] == "succeeded" and status["attempts"] == 1 and status["expires_at"] > time.time()
    assert set(status["timings"]) == {"queued", "running", "total"}
    result = client.get(status["links"]["result"]).json()
    assert result == final["result"], "the final event carries the result"
    assert result["id"] == accepted["id"] and [image["seed"] for image in result["images"]] == [42, 43]
    assert all("b64_png" not in image for image in result["images"])
    sync = client.post("/v1/images", json=request).json()
    for linked, inline in zip(result["images"], sync["images"]):
        file = client.get(linked["url"])
        assert file.status_code == 200 and file.headers["content-type"] == "image/png"
        assert file.content == base64.b64decode(inline["b64_png"]), "the same code path makes the same PNG"
        assert read_png_meta(file.content)["seed"] == linked["seed"]
    assert [f["name"] for f in status["files"]] == ["image-0.png", "image-1.png"]


def test_a_job_without_a_seed_gets_one_that_reruns_reproduce(client):
    accepted = submit(client, "image", {"prompt": "a fox"})
    assert wait_finished(client, accepted["id"])["state"] == "succeeded"
    result = client.get(f"/v1/jobs/{accepted['id']}/result").json()
    seed = result["images"][0]["seed"]
    again = client.post("/v1/images", json={"prompt": "a fox", "seed": seed}).json()
    png = client.get(result["images"][0]["url"]).content
    assert png == base64.b64decode(again["images"][0]["b64_png"])


def test_video_job_reports_keyframe_then_video_steps_and_closing_the_stream_does_not_cancel(client, tmp_path):
    accepted = submit(client, "video", {"prompt": "a paper boat", "num_frames": 3, "num_inference_steps": 8,
                                        "seed": 5})
    first = events(client, accepted["id"], limit=1)  # read one event, then hang up
    assert first[0][0] == "state" and first[0][1]["state"] == "queued"
    stages = []

    def finished_noting_stages(status):
        stages.append((status["progress"] or {}).get("stage"))
        return status["state"] in ("succeeded", "failed", "cancelled")

    status = wait_for(client, accepted["id"], finished_noting_stages)
    assert status["state"] == "succeeded", status
    seen = [stage for stage in dict.fromkeys(stages) if stage]
    assert seen in (["keyframe", "video"], ["video"]), "the keyframe's steps (if polled in time), then the video's"
    result = client.get(status["links"]["result"]).json()
    assert result["mode"] == "text-to-video" and result["file"] == "video.mp4" and "b64_video" not in result
    assert result["keyframe"]["seed"] == 5 and result["num_frames"] == 3
    video = client.get(result["url"])
    assert video.status_code == 200 and video.headers["content-type"] == "video/mp4"
    path = tmp_path / "job.mp4"
    path.write_bytes(video.content)
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    assert meta["size"] == (256, 256) and sum(1 for _ in reader) == 3


def test_video_job_on_a_named_native_text_to_video_model(client, tmp_path):
    accepted = submit(client, "video", {"model": "ltx-video", "prompt": "a paper boat", "num_frames": 9,
                                        "interpolate": 2, "seed": 5})
    status = wait_finished(client, accepted["id"])
    assert status["state"] == "succeeded", status
    result = client.get(status["links"]["result"]).json()
    assert (result["model"], result["family"], result["mode"], result["keyframe"]) == ("ltx-video", "ltx",
                                                                                       "text-to-video", None)
    assert (result["source_frames"], result["num_frames"], result["fps"]) == (9, 17, 48)
    path = tmp_path / "ltx.mp4"
    path.write_bytes(client.get(result["url"]).content)
    reader = imageio_ffmpeg.read_frames(str(path))
    assert next(reader)["size"] == (96, 64) and sum(1 for _ in reader) == 17


def test_idempotency_key_returns_the_same_job(client):
    request = {"prompt": "an idempotent owl", "seed": 1}
    first = submit(client, "image", request, **{"Idempotency-Key": "owl-1"})
    response = client.post("/v1/jobs", json={"kind": "image", "request": request}, headers={"Idempotency-Key": "owl-1"})
    assert response.status_code == 202 and response.json()["id"] == first["id"]
    assert response.headers["idempotent-replayed"] == "true"
    other = client.post("/v1/jobs", json={"kind": "image", "request": {**request, "seed": 2}},
                        headers={"Idempotency-Key": "owl-1"})
    assert other.status_code == 409 and first["id"] in other.json()["detail"]
    assert submit(client, "image", request)["id"] != first["id"], "no key, a new job"
    wait_finished(client, first["id"])


@pytest.mark.parametrize(
    "kind, request_body, loc, words",
    [
        ("image", {"prompt": "a fox", "width": 100}, ["body", "request", "width"], "allowed: 256-2048, a multiple of 16"),
        ("image", {"prompt": "a fox", "num_inference_steps": 9}, ["body", "request", "num_inference_steps"],
         "flux-schnell takes 1-4 steps"),
        ("image", {"prompt": "a fox", "sampler": "euler"}, ["body", "request", "sampler"], "Extra inputs"),
        ("image", {}, ["body", "request", "prompt"], "request.prompt: Field required"),
        ("video", {}, ["body", "request"], "neither was given"),
        ("video", {"prompt": "a fox", "keyframe": {"num_inference_steps": 9}},
         ["body", "request", "keyframe", "num_inference_steps"], "1-4 steps"),
        ("video", {"image": base64.b64encode(b"not an image").decode()}, ["body", "request", "image"],
         "not a readable PNG or JPEG"),
        ("video", {"model": "ltx-video", "prompt": "a fox", "num_frames": 10}, ["body", "request", "num_frames"],
         "ltx-video (ltx) makes 8k+1 frames"),
        ("audio", {"prompt": "a fox"}, ["body", "kind"], "allowed: one of 'image', 'video'"),
    ],
)
def test_invalid_requests_are_422_at_submit_naming_the_field(client, kind, request_body, loc, words):
    before = len(client.get("/v1/jobs?limit=200").json()["jobs"])
    response = client.post("/v1/jobs", json={"kind": kind, "request": request_body})
    assert response.status_code == 422, response.text
    [error] = response.json()["detail"]
    assert error["loc"] == loc and words in error["msg"]
    assert len(client.get("/v1/jobs?limit=200").json()["jobs"]) == before, "no job was recorded"


def test_unknown_jobs_are_404_and_unfinished_results_409(client):
    for method, path in [("GET", "/v1/jobs/nope"), ("GET", "/v1/jobs/nope/events"), ("GET", "/v1/jobs/nope/result"),
                         ("POST", "/v1/jobs/nope/cancel"), ("GET", "/v1/jobs/nope/files/image-0.png")]:
        response = client.request(method, path)
        assert response.status_code == 404, (path, response.text)
    accepted = submit(client, "video", {"image": image_b64(), "num_frames": 2, "num_inference_steps": 12})
    early = client.get(f"/v1/jobs/{accepted['id']}/result")
    assert early.status_code == 409 and "a result exists once it has succeeded" in early.json()["detail"]
    assert client.get(f"/v1/jobs/{accepted['id']}/files/../../jobs.sqlite3").status_code == 404
    done = wait_finished(client, accepted["id"])
    assert client.get(f"/v1/jobs/{accepted['id']}/files/video.gif").status_code == 404
    cancel = client.post(f"/v1/jobs/{accepted['id']}/cancel")
    assert done["state"] == "succeeded" and cancel.status_code == 409 and "already succeeded" in cancel.json()["detail"]


def test_oversized_bodies_are_413(client):
    big = {"kind": "video", "request": {"image": "A" * (MAX_BODY + 10)}}
    assert client.post("/v1/jobs", json=big).status_code == 413
    assert client.post("/v1/videos", json=big["request"]).status_code == 413

    def chunked():  # no Content-Length: counted as it streams in
        yield b'{"kind": "video", "request": {"image": "'
        for _ in range(MAX_BODY // 65536 + 2):
            yield b"A" * 65536
        yield b'"}}'

    response = client.post("/v1/jobs", content=chunked(), headers={"content-type": "application/json"})
    assert response.status_code == 413 and "max_body_bytes" in response.json()["detail"]
    assert client.post("/v1/images", json={"prompt": "still fine", "seed": 1}).status_code == 200


def test_list_filters_by_state_and_pages(client):
    ids = [submit(client, "image", {"prompt": f"list {i}", "seed": i})["id"] for i in range(3)]
    for job_id in ids:
        wait_finished(client, job_id)
    succeeded = client.get("/v1/jobs", params={"state": "succeeded", "limit": 200}).json()["jobs"]
    assert {j["state"] for j in succeeded} == {"succeeded"} and set(ids) <= {j["id"] for j in succeeded}
    pages, cursor = [], None
    while True:
        page = client.get("/v1/jobs", params={"limit": 2, **({"cursor": cursor} if cursor else {})}).json()
        pages.append([j["id"] for j in page["jobs"]])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    listed = [job_id for page in pages for job_id in page]
    assert listed[:3] == ids[::-1] and len(listed) == len(set(listed)) and all(len(p) <= 2 for p in pages)
    assert client.get("/v1/jobs", params={"state": "exploded"}).status_code == 422


def test_cancel_queued_and_running_jobs_touches_no_other_job(client):
    """Video slots are 2 in the shared app (jobs.max_concurrent_jobs.video; SvdGenerator takes 2): a long
    video runs, a short one waits for the replica, a third waits in the job queue."""
    long = submit(client, "video", {"image": image_b64(), "num_frames": 3, "num_inference_steps": 100})["id"]
    wait_for(client, long, in_stage("video", min_step=2), what="the long video denoising")
    short = submit(client, "video", {"image": image_b64(color=(10, 120, 240)), "num_frames": 2,
                                     "num_inference_steps": 3})["id"]
    queued = submit(client, "video", {"image": image_b64(), "num_frames": 2, "num_inference_steps": 3})["id"]
    assert job(client, queued)["state"] == "queued" and job(client, queued)["queue_position"] == 1

    response = client.post(f"/v1/jobs/{queued}/cancel")
    assert response.status_code == 200 and response.json()["state"] == "cancelled"
    progress_at_cancel = job(client, long)["progress"]
    cancelled_at = time.monotonic()
    response = client.post(f"/v1/jobs/{long}/cancel")
    assert response.status_code == 202 and response.json()["cancel_requested"]

    stopped = wait_finished(client, long, timeout_s=30)
    assert stopped["state"] == "cancelled" and "cancelled while running" in stopped["history"][-1]["reason"]
    assert stopped["progress"]["step"] <= progress_at_cancel["step"] + 3, "stopped within a few denoising steps"
    other = wait_finished(client, short, timeout_s=60)
    assert other["state"] == "succeeded", "the job waiting on the same replica was not touched"
    assert time.monotonic() - cancelled_at < progress_at_cancel["eta_s"] / 2, (
        "the replica moved on to the next job instead of finishing the cancelled one's steps")
    never = job(client, queued)
    assert never["attempts"] == 0 and [h["state"] for h in never["history"]] == ["queued", "cancelled"]
    assert client.post(f"/v1/jobs/{queued}/cancel").status_code == 409


def test_killing_the_model_replica_mid_job_retries_it_with_exactly_one_result(app, client):
    import ray

    accepted = submit(client, "video", {"image": image_b64(), "num_frames": 3, "num_inference_steps": 30, "seed": 3})
    wait_for(client, accepted["id"], in_stage("video", min_step=1), what="the video denoising")
    [replica] = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "#SvdGenerator#" in a["name"]]
    killed_at = time.monotonic()
    ray.kill(ray.get_actor(replica, namespace="serve"), no_restart=True)

    resumed = []

    def finished_noting_the_retry_resume(status):
        if not resumed and status["attempts"] == 2 and status["progress"]:
            resumed.append(time.monotonic() - killed_at)  # the new replica is denoising
        return status["state"] in ("succeeded", "failed", "cancelled")

    status = wait_for(client, accepted["id"], finished_noting_the_retry_resume, timeout_s=180)
    recovery_s = time.monotonic() - killed_at
    assert status["state"] == "succeeded" and status["attempts"] == 2, status
    retry = [h for h in status["history"] if h["state"] == "queued" and h.get("reason")]
    assert len(retry) == 1 and "a model replica died while running the job" in retry[0]["reason"]
    assert [f["name"] for f in status["files"]] == ["video.mp4"]
    files = sorted(p.name for p in (app["data_dir"] / "files" / accepted["id"]).iterdir())
    assert files == ["video.mp4"], "one result, keyed by the job id"
    resumed_s = f"{resumed[0]:.1f}s" if resumed else "(not seen)"
    print(f"\nreplica killed mid-job: attempt 2 denoising on a new replica {resumed_s} after the kill, "
          f"succeeded {recovery_s:.1f}s after it")
    wait_until(lambda: client.get("/healthz").status_code == 200, timeout_s=60, what="all deployments healthy")


@pytest.mark.skipif(shutil.which("curl") is None, reason="the documented examples use curl, which is not installed")
@pytest.mark.parametrize("doc, heading", [("README.md", "## Async jobs"), ("docs/jobs.md", "# Async jobs: `/v1/jobs`")])
def test_documented_jobs_commands_run(client, tmp_path, doc, heading):
    text = (ROOT / doc).read_text()
    section = text[text.index(heading):]
    commands = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    script = commands.replace("127.0.0.1:8000", f"127.0.0.1:{client.base_url.port}")
    run = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    with Image.open(tmp_path / "fox.png") as png:
        assert png.format == "PNG" and png.size == (256, 256)

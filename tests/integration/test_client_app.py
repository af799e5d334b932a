"""The Python client, the CLI and the hybrid fallback against the shared dev app (real Serve, tiny
models, a stand-in remote images API on loopback)."""

import base64
import io
import json
import os
import re
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from PIL import Image

from serve_app.client import Client, JobFailed, RequestRejected
from tests.helpers import free_port, wait_until

pytestmark = pytest.mark.integration
GENSERVE = [sys.executable, "-c", "import sys; from serve_app.cli import main; sys.exit(main())"]


def _url(dev_app) -> str:
    return str(dev_app["client"].base_url).rstrip("/")


def _png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def test_the_client_calls_every_resource_with_the_servers_models(dev_app):
    with Client(_url(dev_app)) as client:
        models = client.models()
        assert models["default_model"] == "flux-schnell"
        assert "families" in client.loras() and client.controls()["controls"]
        assert client.health()["status"] == "ok"
        enhanced = client.enhance(prompt="a lighthouse at dusk", style="cinematic")
        assert enhanced.enhanced_prompt.startswith("a lighthouse at dusk")
        image = client.images(prompt="a lighthouse at dusk", seed=5, num_inference_steps=2)
        assert image.backend == "local" and image.images[0].seed == 5
        assert _png(base64.b64decode(image.images[0].b64_png)).size == (256, 256)
        scored = client.scores(prompt="a lighthouse", images=[image.images[0].b64_png])
        assert scored.images[0].scores.aesthetic == pytest.approx(image.images[0].scores.aesthetic, abs=1e-3)
        video = client.videos(image=image.images[0].b64_png, num_frames=3, num_inference_steps=1, seed=2)
        assert video.num_frames == 3 and base64.b64decode(video.b64_video)[4:8] == b"ftyp"
        with pytest.raises(RequestRejected) as caught:
            client.images(prompt="a fox", model="no-such-model", seed=1)
        assert caught.value.status == 422 and "model" in str(caught.value)


def test_a_job_is_submitted_and_waited_on_with_progress_then_its_result_and_files_read(dev_app):
    with Client(_url(dev_app)) as client:
        job = client.submit_image(prompt="a red kite", seed=9, num_inference_steps=3)
        events = []
        final = client.wait(job.id, on_event=events.append, timeout_s=120)
        assert final.state == "succeeded"
        steps = [event.progress.step for event in events if event.event == "progress"]
        assert steps and steps[-1] == 3
        assert [event.state for event in events if event.event == "state"][-1] == "succeeded"
        result = client.result(job.id)
        assert result.images[0].seed == 9
        assert _png(client.file(job.id, result.images[0].file)).size == (256, 256)
        assert job.id in [listed.id for listed in client.jobs(state="succeeded", limit=50).jobs]
        assert client.job(job.id).state == "succeeded"


def test_a_cancelled_job_ends_the_wait_with_job_failed(dev_app):
    with Client(_url(dev_app)) as client:
        job = client.submit_image(model="slow", prompt="a slow snail", num_inference_steps=16, enhance=False)
        cancelled = client.cancel(job.id)
        assert cancelled.state == "cancelled" or cancelled.cancel_requested
        with pytest.raises(JobFailed) as caught:
            client.wait(job.id, timeout_s=120)
        assert caught.value.job.state == "cancelled"


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*GENSERVE, *args], capture_output=True, text=True, timeout=180,
                          env={**os.environ, **(env or {})})


def test_cli_generate_writes_decodable_pngs_prints_json_and_draws_progress(dev_app, tmp_path):
    out = tmp_path / "fox.png"
    done = _cli("generate", "a red fox in snow", "-o", str(out), "--steps", "3", "--seed", "4", "--n", "2",
                "--url", _url(dev_app), "--json", "--progress", env={"TTY_COMPATIBLE": "1", "COLUMNS": "120"})
    assert done.returncode == 0, done.stderr
    body = json.loads(done.stdout)
    saved = [Path(path) for path in body["saved"]]
    assert saved == [tmp_path / "fox-1.png", tmp_path / "fox-2.png"]
    assert all(_png(path.read_bytes()).size == (256, 256) for path in saved)
    assert body["images"][0]["seed"] == 4 and body["job_id"]
    assert "generate" in done.stderr and "3/3" in done.stderr  # the bar, fed by the job's progress events


def test_cli_animate_and_jobs_commands(dev_app, tmp_path):
    still = tmp_path / "still.png"
    Image.new("RGB", (256, 256), (40, 90, 160)).save(still)
    clip = tmp_path / "clip.mp4"
    done = _cli("animate", str(still), "-o", str(clip), "--frames", "3", "--steps", "1", "--seed", "3",
                "--url", _url(dev_app), "--json")
    assert done.returncode == 0, done.stderr
    job_id = json.loads(done.stdout)["job_id"]
    assert clip.read_bytes()[4:8] == b"ftyp"
    listed = _cli("jobs", "list", "--url", _url(dev_app), "--json", "--limit", "200")
    assert job_id in [job["id"] for job in json.loads(listed.stdout)["jobs"]]
    shown = _cli("jobs", "show", job_id, "--url", _url(dev_app), "--json")
    assert json.loads(shown.stdout)["state"] == "succeeded"
    waited = _cli("jobs", "wait", job_id, "-o", str(tmp_path / "files"), "--url", _url(dev_app))
    assert waited.returncode == 0 and (tmp_path / "files" / f"{job_id}-video.mp4").is_file()
    again = _cli("jobs", "cancel", job_id, "--url", _url(dev_app))
    assert again.returncode == 1 and "409" in again.stderr  # finished jobs cannot be cancelled


def test_cli_animate_makes_text_to_video_with_a_named_model_and_interpolation(dev_app, tmp_path):
    clip = tmp_path / "waves.mp4"
    done = _cli("animate", "--model", "ltx-video", "--prompt", "waves on rocks", "-o", str(clip), "--seed", "2",
                "--interpolate", "2", "--url", _url(dev_app), "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert (result["model"], result["mode"], result["prompt"]) == ("ltx-video", "text-to-video", "waves on rocks")
    assert (result["source_frames"], result["num_frames"], result["fps"]) == (9, 17, 48)  # (9 - 1) * 2 + 1 at 2 x 24
    assert clip.read_bytes()[4:8] == b"ftyp"


def test_cli_exit_codes(dev_app):
    refused = _cli("generate", "a fox", "--model", "no-such-model", "--url", _url(dev_app))
    assert refused.returncode == 1 and "model" in refused.stderr
    usage = _cli("generate", "a fox", "--size", "100x100", "--url", _url(dev_app))
    assert usage.returncode == 2 and "width" in usage.stderr
    unreachable = _cli("jobs", "list", "--url", f"http://127.0.0.1:{free_port()}")
    assert unreachable.returncode == 3 and "unreachable" in unreachable.stderr


def test_with_the_local_queue_full_the_remote_serves_opted_in_requests_and_others_get_503(dev_app):
    url, remote = _url(dev_app), dev_app["remote"]
    busy_body = {"model": "slow", "prompt": "a slow heron", "num_inference_steps": 8, "enhance": False, "seed": 1}
    probe = {"model": "slow", "prompt": "a quick heron", "num_inference_steps": 1, "enhance": False, "seed": 2}
    sent_before = len(remote.requests)

    def post(body):
        return httpx.post(f"{url}/v1/images", json=body, timeout=120)

    stop = threading.Event()

    def occupy():
        # Sent again and again until the probes are done: three of these keep the slow model
        # (max_ongoing 1, max_queued 1, 4 s per request) generating one and holding one in its
        # queue however long the probes take on a loaded machine.
        taken = []
        while not stop.is_set():
            answer = post(busy_body)
            if answer.status_code == 200:
                taken.append(answer)
        return taken

    with ThreadPoolExecutor(3) as pool:
        busy = [pool.submit(occupy) for _ in range(3)]
        try:
            refused = wait_until(lambda: (answer := post(probe)).status_code == 503 and answer, timeout_s=60,
                                 what="a 503 from the full queue")
            served = wait_until(lambda: (answer := post({**probe, "fallback": True})).json().get("backend")
                                == "remote" and answer, timeout_s=60, what="the remote fallback to serve")
        finally:
            stop.set()
        taken = [answer for future in busy for answer in future.result()]
        assert taken and {answer.json()["backend"] for answer in taken} == {"local"}
    # The ingress's JSON answer to the full queue, with the entry's retry_after_s.
    assert refused.headers["Retry-After"] == "2" and refused.json()["reason"] == "overloaded"
    body = served.json()
    assert body["model"] == "remote-standin" and body["enhanced_prompt"] == "a quick heron, as drawn remotely"
    assert _png(base64.b64decode(body["images"][0]["b64_png"])).size == (256, 256)
    assert body["images"][0]["scores"]["aesthetic"] > 0  # scored by the local CLIP scorer
    assert len(remote.requests) > sent_before
    # Local requests never reached the remote: every prompt it saw asked for fallback.
    assert {request["body"]["prompt"] for request in remote.requests[sent_before:]} == {"a quick heron"}


def test_the_docs_pydantic_ai_tool_runs_against_the_service(dev_app, monkeypatch):
    from pydantic_ai.messages import ToolReturnPart

    docs = (Path(__file__).parents[2] / "docs" / "client.md").read_text()
    code = re.search(r"<!-- tested: pydantic-ai tool -->\s*```python\n(.*?)```", docs, re.S).group(1)
    monkeypatch.setenv("GENSERVE_URL", _url(dev_app))
    namespace: dict = {}
    exec(compile(code, "docs/client.md", "exec"), namespace)
    returns = [part.content for message in namespace["result"].all_messages() for part in message.parts
               if isinstance(part, ToolReturnPart)]
    assert len(returns) == 1 and returns[0]["backend"] == "local" and returns[0]["model"] == "flux-schnell"
    assert 0 <= returns[0]["aesthetic"] <= 1

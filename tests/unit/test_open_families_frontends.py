"""Qwen-Image, Qwen-Image-Edit, Z-Image and Wan served on their tiny models through the front ends, in
process without Ray (the Serve path is the same services; each replica in the shared dev app would cost
~6 s of suite time): POST /v1/images and /v1/videos, durable jobs (POST /v1/jobs over a real dispatcher
and SQLite store) and MCP's generate tools (stateless streamable HTTP, also jobs), all over HTTP."""

import json

import pytest
from fastapi.testclient import TestClient

from deployments.config import ImageModelConfig, VideoModelConfig
from deployments.image_generator import ImageGenerator
from deployments.video_generator import VideoGenerator
from serve_app.api.app import build_api
from serve_app.jobs import http as jobs_http
from serve_app.jobs.dispatch import JobDispatcher
from serve_app.jobs.sqlite_store import SqliteJobStore
from serve_app.services.local import LocalHandle
from tests.fakes import fake_services
from tests.helpers import LOOPBACK, app_settings, wait_until

TINY = {"source": "tiny", "default_width": 256, "default_height": 256, "default_steps": 2,
        "warmup": {"default_shape": False}}
IMAGE_MODELS = [
    {"id": "z-image-turbo", "family": "z-image", "limits": {"max_steps": 16, "max_guidance": 0},
     "options": {"max_sequence_length": 64}, **TINY},
    {"id": "qwen-image", "family": "qwen-image", **TINY},
    {"id": "qwen-image-edit", "family": "qwen-image-edit", **TINY},
]
WAN = {"id": "wan", "family": "wan", "source": "tiny", "default_width": 64, "default_height": 64,
       "default_num_frames": 5, "default_steps": 2, "warmup": {"default_shape": False}}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    settings = app_settings(*IMAGE_MODELS, video_models=[WAN])
    services = fake_services(
        settings, generators={entry["id"]: ImageGenerator.func_or_class(ImageModelConfig(**entry)) for entry in IMAGE_MODELS},
        video_generators={"wan": VideoGenerator.func_or_class(VideoModelConfig(**WAN))})
    store = SqliteJobStore(tmp_path_factory.mktemp("jobs"), ttl_s=3600)
    dispatcher = JobDispatcher(store, services.images, services.videos, {"image": 1, "video": 1}, 0,
                               sweep_interval_s=3600, poll_interval_s=0.02)
    services.jobs = jobs_http.JobsApi(LocalHandle(dispatcher), services.images, services.videos, 0)
    app = build_api()
    app.state.services = services
    with TestClient(app, client=LOOPBACK) as client:
        # The dispatcher runs on the app's event loop, as the JobRunner's does on its replica's.
        client.portal.call(_start, dispatcher)
        yield {"client": client, "store": store}
        client.portal.call(dispatcher.stop)


async def _start(dispatcher):
    dispatcher.start()


@pytest.mark.parametrize("model", [entry["id"] for entry in IMAGE_MODELS])
def test_each_image_family_generates_over_http(served, model):
    response = served["client"].post("/v1/images", json={"prompt": 'a sign that reads "OPEN"', "model": model,
                                                         "seed": 3, "enhance": False})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == model and (body["width"], body["height"]) == (256, 256) and body["images"][0]["b64_png"]


def test_wan_generates_over_http_and_refuses_a_frame_count_off_its_rule(served):
    client = served["client"]
    response = client.post("/v1/videos", json={"prompt": "a fox in snow", "model": "wan", "seed": 1})
    assert response.status_code == 200, response.text
    assert (response.json()["model"], response.json()["num_frames"]) == ("wan", 5)
    refused = client.post("/v1/videos", json={"prompt": "a fox", "model": "wan", "num_frames": 6})
    assert refused.status_code == 422 and "(nearest: 5 or 9)" in refused.json()["detail"][0]["msg"]


@pytest.mark.parametrize("kind, model", [*(("image", entry["id"]) for entry in IMAGE_MODELS), ("video", "wan")])
def test_every_family_runs_as_a_job_over_http(served, kind, model):
    client = served["client"]
    created = client.post("/v1/jobs", json={"kind": kind, "request": {"prompt": "a lantern", "model": model, "seed": 2}})
    assert created.status_code in (200, 201, 202), created.text
    job = wait_until(lambda: _finished(client, created.json()["id"]), 120, what=f"{model}'s job")
    assert job["state"] == "succeeded", job
    result = client.get(job["links"]["result"])
    assert result.status_code == 200 and result.json()["model"] == model and job["files"]


def _finished(client, job_id):
    job = client.get(f"/v1/jobs/{job_id}").json()
    return job if job["state"] in ("succeeded", "failed", "cancelled") else None


@pytest.mark.parametrize("tool, model", [*(("generate_image", entry["id"]) for entry in IMAGE_MODELS),
                                         ("generate_video", "wan")])
def test_every_family_generates_through_mcp(served, tool, model):
    call = {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
            "params": {"name": tool, "arguments": {"request": {"prompt": "a lantern", "model": model, "seed": 4},
                                                   "wait_s": 120}}}
    response = served["client"].post("/mcp", json=call, headers={"Accept": "application/json, text/event-stream"})
    assert response.status_code == 200, response.text
    answer = _rpc_result(response.text)
    assert not answer.get("isError"), answer
    assert answer["structuredContent"]["result"]["model"] == model
    kinds = {part["type"] for part in answer["content"]}
    assert ("image" if tool == "generate_image" else "resource_link") in kinds, kinds  # the PNGs, or the video's link


def _rpc_result(text: str) -> dict:
    """The JSON-RPC result of a streamable-HTTP answer (plain JSON, or the last SSE data line)."""
    lines = [line[len("data:"):] for line in text.splitlines() if line.startswith("data:")] or [text]
    return json.loads(lines[-1])["result"]

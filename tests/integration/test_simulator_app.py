"""A simulated accelerator on real Ray Serve (the shared dev app's `sim-flux`: FLUX.1-dev on a
simulated H100): the image comes back over HTTP marked simulated, a job reports every step, and a
cancelled job stops at a step."""

import base64

import pytest

from serve_app.services.media import read_png_meta
from tests.integration.jobs import in_stage, job, submit, wait_finished, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def client(dev_app):
    return dev_app["client"]


def test_a_simulated_image_comes_back_marked_simulated(client):
    response = client.post("/v1/images", json={"model": "sim-flux", "prompt": "a red cube", "seed": 7,
                                               "num_inference_steps": 2, "enhance": False})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["simulated"] == "h100-sxm" and body["model"] == "sim-flux"
    image = base64.b64decode(body["images"][0]["b64_png"])
    assert read_png_meta(image)["simulated"] == "h100-sxm" and read_png_meta(image)["seed"] == 7
    tiny = client.post("/v1/images", json={"prompt": "a red cube", "seed": 7, "enhance": False}).json()
    assert tiny["simulated"] is None and "simulated" not in read_png_meta(base64.b64decode(tiny["images"][0]["b64_png"]))


def test_a_simulated_job_reports_its_steps_and_a_cancel_stops_it_at_a_step(client):
    # 28 steps at 1024x1024: ~0.24 s a step on the simulated H100 (eager), long enough to cancel midway.
    accepted = submit(client, "image", {"model": "sim-flux", "prompt": "a red cube", "width": 1024, "height": 1024,
                                        "num_inference_steps": 28, "enhance": False})
    running = wait_for(client, accepted["id"], in_stage("generate", min_step=2), what="simulated denoising")
    assert running["progress"]["steps"] == 28
    assert client.post(f"/v1/jobs/{accepted['id']}/cancel").status_code == 202
    stopped = wait_finished(client, accepted["id"], timeout_s=30)
    assert stopped["state"] == "cancelled" and stopped["progress"]["step"] < 28, "stopped at a step, not at the end"
    assert job(client, accepted["id"])["attempts"] == 1

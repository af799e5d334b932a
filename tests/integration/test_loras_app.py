"""LoRA adapters over HTTP on real Ray Serve: the dev profile with `loras.dir` holding tiny FLUX LoRAs."""

import base64
import io

import numpy as np
import pytest
from PIL import Image

from serve_app.services.media import read_png_meta
from tests.control_images import edge_map
from tests.helpers import image_b64
from tests.integration.jobs import submit, wait_finished

pytestmark = pytest.mark.integration
REQUEST = {"prompt": "a lighthouse at dusk", "seed": 5, "enhance": False, "width": 256, "height": 256}


@pytest.fixture
def client(dev_app):
    """The shared dev app, whose LoRA directory holds `ink` (FLUX), `xl_style` (SDXL) and a .bin file."""
    return dev_app["client"]


def _image(response) -> tuple[np.ndarray, dict]:
    assert response.status_code == 200, response.text
    png = base64.b64decode(response.json()["images"][0]["b64_png"])
    with Image.open(io.BytesIO(png)) as image:
        return np.asarray(image.convert("RGB")), read_png_meta(png)


def test_loras_are_listed_by_family(client):
    listed = client.get("/v1/loras").json()
    assert {(entry["name"], entry["family"]) for entry in listed["loras"]} == {("ink", "flux"), ("xl_style", "sdxl")}
    assert listed["families"]["flux"] == {"models": ["flux-schnell", "flux-dev"], "loras": ["ink"]}
    assert listed["families"]["sdxl"]["loras"] == ["xl_style"] and listed["max_per_request"] == 4


def test_lora_changes_the_image_and_the_next_request_is_back_to_baseline(client):
    baseline, meta = _image(client.post("/v1/images", json=REQUEST))
    assert meta["loras"] == []
    response = client.post("/v1/images", json={**REQUEST, "loras": [{"name": "ink", "scale": 1.5}]})
    styled, styled_meta = _image(response)
    assert response.json()["loras"] == [{"name": "ink", "scale": 1.5}]
    assert styled_meta["loras"] == [{"name": "ink", "scale": 1.5}]
    assert np.abs(styled.astype(int) - baseline.astype(int)).mean() > 2
    again, _ = _image(client.post("/v1/images", json=REQUEST))
    assert np.array_equal(again, baseline), "the LoRA leaked into the next request"
    assert client.get("/v1/models").json()["models"][0]["deployment"]["loras_loaded"] == ["ink"]


@pytest.mark.parametrize("control", [None, {"type": "canny", "preprocess": False, "conditioning_scale": 1.0}])
def test_sdxl_lora_applies_on_the_plain_and_the_controlnet_path_and_does_not_leak(client, control):
    request = {**REQUEST, "model": "sdxl", "num_inference_steps": 4}
    if control is not None:
        request["control"] = {**control, "image": image_b64(edge_map())}
    baseline, _ = _image(client.post("/v1/images", json=request))
    styled, meta = _image(client.post("/v1/images", json={**request, "loras": [{"name": "xl_style"}]}))
    assert meta["loras"] == [{"name": "xl_style", "scale": 1.0}]
    assert np.abs(styled.astype(int) - baseline.astype(int)).mean() > 2
    again, _ = _image(client.post("/v1/images", json=request))
    assert np.array_equal(again, baseline), "the LoRA leaked into the next request"


def test_a_job_applies_its_lora_like_the_sync_endpoint(client):
    request = {**REQUEST, "loras": [{"name": "ink"}]}
    sync, _ = _image(client.post("/v1/images", json=request))
    accepted = submit(client, "image", request)
    status = wait_finished(client, accepted["id"])
    assert status["state"] == "succeeded", status
    file = client.get(f"/v1/jobs/{accepted['id']}/files/image-0.png")
    with Image.open(io.BytesIO(file.content)) as image:
        assert np.array_equal(np.asarray(image.convert("RGB")), sync)


@pytest.mark.parametrize(
    "loras, loc, words",
    [
        ([{"name": "../ink"}], ["body", "loras", 0, "name"], "not a path"),
        ([{"name": "..\\ink"}], ["body", "loras", 0, "name"], "not a path"),
        ([{"name": ".."}], ["body", "loras", 0, "name"], "not contain '..'"),
        ([{"name": "weights"}], ["body", "loras", 0, "name"], "unknown LoRA 'weights'"),
        ([{"name": "ink"}, {"name": "xl_style"}], ["body", "loras", 1, "name"], "is for sdxl models"),
        ([{"name": "ink", "scale": 3}], ["body", "loras", 0, "scale"], "less than or equal to 2"),
    ],
)
def test_bad_loras_get_422_naming_the_field(client, loras, loc, words):
    response = client.post("/v1/images", json={**REQUEST, "loras": loras})
    assert response.status_code == 422, response.text
    detail = response.json()["detail"][0]
    assert detail["loc"] == loc and words in detail["msg"]
    job = client.post("/v1/jobs", json={"kind": "image", "request": {**REQUEST, "loras": loras}})
    assert job.status_code == 422 and job.json()["detail"][0]["loc"] == ["body", "request", *loc[1:]]

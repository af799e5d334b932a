"""SDXL, SDXL-Turbo and ControlNet over HTTP on real Ray Serve, tiny models, one app for the module."""

import base64
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deployments.families.sdxl import canny_map
from serve_app.services.media import read_png_meta
from tests.control_images import BOTTOM, LEFT, RIGHT, TOP, on_border, rectangle
from tests.helpers import image_b64, wait_until

pytestmark = pytest.mark.integration
ROOT = Path(__file__).parents[2]


@pytest.fixture
def client(dev_app):
    """The shared dev app: dev.yaml's tiny SDXL (canny + depth) plus a tiny SDXL-Turbo without
    ControlNets; uploads limited to SHARED_PIXEL_LIMIT."""
    return dev_app["client"]


def _image(client, **body) -> dict:
    response = client.post("/v1/images", json={"prompt": "a red house", "model": "sdxl", "seed": 11,
                                               "num_inference_steps": 2, **body})
    assert response.status_code == 200, response.text[:500]
    return response.json()


def _pixels(b64_png: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64_png))))


def _control(kind: str, image: np.ndarray, **fields) -> dict:
    return {"type": kind, "image": image_b64(image), **fields}


def test_models_controls_and_health_list_the_sdxl_models(client):
    models = {model["id"]: model for model in client.get("/v1/models").json()["models"]}
    assert set(models) >= {"flux-schnell", "sdxl", "sdxl-turbo"}
    assert models["sdxl"]["control_types"] == ["canny", "depth"] and models["sdxl-turbo"]["control_types"] == []
    assert (models["sdxl"]["max_steps"], models["sdxl-turbo"]["max_steps"]) == (50, 4)
    assert models["sdxl"]["uses_negative_prompt"] and not models["sdxl-turbo"]["uses_negative_prompt"]
    assert models["sdxl"]["deployment"]["controlnets"] == {"canny": "tiny", "depth": "tiny"}
    assert models["sdxl"]["deployment"]["depth_estimator"] == "tiny"
    controls = {entry["type"]: entry for entry in client.get("/v1/controls").json()["controls"]}
    assert controls["canny"]["models"] == ["sdxl"] and controls["depth"]["models"] == ["sdxl"]
    assert [param["name"] for param in controls["canny"]["params"]] == [
        "conditioning_scale", "preprocess", "low_threshold", "high_threshold"]
    health = client.get("/healthz").json()
    assert health["deployments"]["generator:sdxl"]["ok"] and health["deployments"]["generator:sdxl-turbo"]["ok"]


def test_plain_sdxl_uses_the_negative_prompt_and_guidance(client):
    body = _image(client, negative_prompt="fog", guidance_scale=6.5)
    assert (body["model"], body["guidance_scale"], body["negative_prompt"], body["warnings"]) == (
        "sdxl", 6.5, "fog", [])
    other = _image(client, negative_prompt="rain", guidance_scale=6.5)
    assert body["images"][0]["b64_png"] != other["images"][0]["b64_png"]


def test_canny_preprocessed_equals_the_same_edges_given_as_a_map(client):
    reference = rectangle()
    computed = _image(client, control=_control("canny", reference, conditioning_scale=1.0))
    given = _image(client, control=_control("canny", canny_map(reference, 100, 200), preprocess=False,
                                            conditioning_scale=1.0))
    plain = _image(client)
    assert computed["images"][0]["width"] == 256 and "preprocess" in computed["timings"]
    assert "preprocess" not in given["timings"]
    assert np.array_equal(_pixels(computed["images"][0]["b64_png"]), _pixels(given["images"][0]["b64_png"]))
    assert not np.array_equal(_pixels(computed["images"][0]["b64_png"]), _pixels(plain["images"][0]["b64_png"]))
    meta = read_png_meta(base64.b64decode(computed["images"][0]["b64_png"]))
    assert meta["control"] == {"type": "canny", "conditioning_scale": 1.0, "preprocess": True,
                               "low_threshold": 100, "high_threshold": 200}


def test_depth_preprocessed_equals_its_previewed_map_given_back(client):
    reference = rectangle()
    preview = client.post("/v1/controls/preview", json=_control("depth", reference))
    assert preview.status_code == 200, preview.text
    depth = _pixels(preview.json()["b64_png"])
    assert depth.shape == (256, 256, 3) and depth.min() == 0 and depth.max() == 255
    computed = _image(client, control=_control("depth", reference))
    given = _image(client, control={"type": "depth", "image": preview.json()["b64_png"], "preprocess": False})
    assert np.array_equal(_pixels(computed["images"][0]["b64_png"]), _pixels(given["images"][0]["b64_png"]))


def test_jpeg_reference_of_another_shape_is_fitted_to_the_requested_size(client):
    body = _image(client, width=320, height=256, control=_control("depth", rectangle(200, 300), conditioning_scale=0.8)
                  | {"image": image_b64(rectangle(200, 300), "JPEG")})
    assert _pixels(body["images"][0]["b64_png"]).shape == (256, 320, 3)


def test_preview_returns_the_edge_map_of_a_drawn_rectangle(client):
    response = client.post("/v1/controls/preview", json=_control("canny", rectangle(), response_format="binary"))
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    edges = np.asarray(Image.open(io.BytesIO(response.content)))
    assert edges.shape == (256, 256, 3)
    precise, covered = on_border(edges[..., 0] > 0)
    assert precise == 1.0 and covered > 0.95, (precise, covered)
    assert edges[(TOP + BOTTOM) // 2, (LEFT + RIGHT) // 2].max() == 0  # nothing inside the rectangle
    unprocessed = client.post("/v1/controls/preview", json=_control("canny", rectangle(), preprocess=False)).json()
    assert unprocessed["preprocessed"] is False
    assert np.array_equal(_pixels(unprocessed["b64_png"]), rectangle())


def test_sdxl_turbo_runs_without_guidance_in_up_to_four_steps(client):
    body = _image(client, model="sdxl-turbo", num_inference_steps=2, negative_prompt="fog")
    assert (body["model"], body["guidance_scale"], body["negative_prompt"]) == ("sdxl-turbo", 0.0, None)
    assert any("negative_prompt is not used by sdxl-turbo" in warning for warning in body["warnings"])
    too_many = client.post("/v1/images", json={"prompt": "x", "model": "sdxl-turbo", "num_inference_steps": 5})
    assert too_many.status_code == 422 and too_many.json()["detail"][0]["loc"] == ["body", "num_inference_steps"]


def test_image_job_with_control_runs_through_the_job_runner(client):
    request = {"prompt": "a red house", "model": "sdxl", "seed": 11, "num_inference_steps": 2,
               "control": _control("canny", rectangle(), conditioning_scale=1.0)}
    accepted = client.post("/v1/jobs", json={"kind": "image", "request": request})
    assert accepted.status_code == 202, accepted.text
    job_id = accepted.json()["id"]
    wait_until(lambda: client.get(f"/v1/jobs/{job_id}").json()["state"] == "succeeded", timeout_s=120,
               what="the sdxl job succeeded")
    result = client.get(f"/v1/jobs/{job_id}/result").json()
    png = client.get(result["images"][0]["url"]).content
    sync = _image(client, control=request["control"])
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png))), _pixels(sync["images"][0]["b64_png"]))


def test_bad_control_in_a_job_is_422_at_submit(client):
    over = {"prompt": "x", "model": "sdxl", "control": {"type": "canny", "image": image_b64(rectangle(320, 320))}}
    response = client.post("/v1/jobs", json={"kind": "image", "request": over})
    assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["body", "request", "control", "image"]
    scale = {**over, "control": {"type": "canny", "image": image_b64(rectangle()), "conditioning_scale": 3}}
    [detail] = client.post("/v1/jobs", json={"kind": "image", "request": scale}).json()["detail"]
    assert detail["loc"] == ["body", "request", "control", "conditioning_scale"] and detail["allowed"] == "0-2"


@pytest.mark.parametrize(
    "path, body, loc, words",
    [
        ("/v1/images", {"control": {"type": "canny", "image": image_b64(rectangle(), "GIF")}},
         ["body", "control", "image"], "format GIF"),
        ("/v1/images", {"control": {"type": "canny", "image": image_b64(rectangle(320, 320))}},
         ["body", "control", "image"], "over the limit"),
        ("/v1/images", {"control": {"type": "canny", "image": image_b64(rectangle()), "conditioning_scale": 2.5}},
         ["body", "control", "conditioning_scale"], "allowed: 0-2"),
        ("/v1/images", {"control": {"type": "canny", "image": image_b64(rectangle()), "low_threshold": 220}},
         ["body", "control", "high_threshold"], "must be above low_threshold"),
        ("/v1/images", {"model": "flux-schnell", "control": {"type": "canny", "image": image_b64(rectangle())}},
         ["body", "control"], "flux-schnell has no ControlNet"),
        ("/v1/images", {"model": "sdxl-turbo", "control": {"type": "depth", "image": image_b64(rectangle())}},
         ["body", "control"], "sdxl-turbo has no ControlNet"),
        ("/v1/controls/preview", {"type": "canny", "image": image_b64(rectangle(320, 320))},
         ["body", "image"], "over the limit"),
        ("/v1/controls/preview", {"type": "depth", "image": image_b64(rectangle()), "conditioning_scale": -1},
         ["body", "conditioning_scale"], "allowed: 0-2"),
        ("/v1/controls/preview", {"type": "canny", "image": image_b64(rectangle()), "model": "flux-schnell"},
         ["body", "model"], "flux-schnell has no ControlNet"),
        ("/v1/controls/preview", {"type": "canny", "image": image_b64(rectangle()), "model": "sdxl-turbo"},
         ["body", "model"], "sdxl-turbo has no ControlNet"),
    ],
)
def test_bad_control_input_is_422_naming_the_field(client, path, body, loc, words):
    payload = {"prompt": "a red house", "model": "sdxl", **body} if path == "/v1/images" else body
    response = client.post(path, json=payload)
    assert response.status_code == 422, response.text[:500]
    [detail] = response.json()["detail"]
    assert detail["loc"] == loc and words in detail["msg"], detail


@pytest.mark.skipif(shutil.which("curl") is None, reason="the documented examples use curl, which is not installed")
def test_documented_control_commands_run(client, tmp_path):
    doc = (ROOT / "docs" / "api.md").read_text()
    blocks = []
    for heading in ("### ControlNet: `control`", "## `GET /v1/controls`, `POST /v1/controls/preview`"):
        section = doc[doc.index(heading):]
        blocks.append(re.search(r"```bash\n(.*?)```", section, re.S).group(1))
    Image.fromarray(rectangle()).save(tmp_path / "house.png")
    for block in blocks:
        script = block.replace("127.0.0.1:8000", f"127.0.0.1:{client.base_url.port}")
        run = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, capture_output=True,
                             text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        if block is blocks[0]:
            body = json.loads(run.stdout)
            assert body["model"] == "sdxl" and len(body["images"]) == 1, run.stdout[:300]
    with Image.open(tmp_path / "edges.png") as png:
        assert png.format == "PNG" and on_border(np.asarray(png)[..., 0] > 0)[0] == 1.0

"""Edits by instruction from reference images on the shared dev app's tiny FLUX.2 [klein]
(`flux2-klein`): through POST /v1/images, the Python handle, jobs (an earlier job's image as a
reference), MCP `edit_image`, and the unmodified `openai` SDK's `images.edit` with two images."""

import asyncio
import base64
import hashlib
import io

import numpy as np
import openai
import pytest
from mcp import Client as McpClient
from PIL import Image

from serve_app.services.media import read_png_meta
from tests.helpers import image_bytes
from tests.integration.jobs import submit, wait_finished

pytestmark = pytest.mark.integration
MODEL = "flux2-klein"
FAST = {"model": MODEL, "width": 256, "height": 256, "num_inference_steps": 2, "enhance": False}


def _photo(shift: int) -> bytes:
    ramp = np.arange(256, dtype=np.uint16)
    xx, yy = np.meshgrid(ramp, ramp)
    return image_bytes(Image.fromarray(np.stack([xx, yy, (xx + shift) % 256], -1).astype(np.uint8)))


MUG, LOGO = _photo(0), _photo(128)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _pixels(b64_png: str) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(b64_png))) as image:
        return np.asarray(image.convert("RGB"))


@pytest.fixture
def base(dev_app) -> str:
    return str(dev_app["client"].base_url).rstrip("/")


def test_http_generates_and_edits_by_instruction_and_other_families_name_the_one_that_can(dev_app):
    client = dev_app["client"]
    assert {model["id"]: model["instruction_edits"] for model in client.get("/v1/models").json()["models"]}[MODEL]
    plain = client.post("/v1/images", json={**FAST, "prompt": "a mug on a desk", "seed": 4})
    edited = client.post("/v1/images", json={**FAST, "prompt": "put this logo on that mug", "seed": 4,
                                             "reference_images": [_b64(MUG), _b64(LOGO)]})
    assert plain.status_code == edited.status_code == 200, edited.text
    assert plain.json()["mode"] == "text-to-image" and edited.json()["mode"] == "instruction-edit"
    image = edited.json()["images"][0]["b64_png"]
    meta = read_png_meta(base64.b64decode(image))
    assert meta["mode"] == "instruction-edit" and meta["reference_images_sha256"] == [_sha(MUG), _sha(LOGO)]
    assert not np.array_equal(_pixels(image), _pixels(plain.json()["images"][0]["b64_png"]))
    refused = client.post("/v1/images", json={"prompt": "make it night", "model": "flux-schnell",
                                              "reference_images": [_b64(MUG)]})
    assert refused.status_code == 422
    detail = refused.json()["detail"][0]
    assert detail["loc"][-1] == "reference_images" and "flux2-klein" in detail["msg"]


def test_the_handle_edits_with_reference_images(dev_app):
    from ray import serve

    from serve_app import APP_NAME
    from serve_app.types import ImageRequest

    handle = serve.get_app_handle(APP_NAME)
    request = ImageRequest(**FAST, prompt="make it night", seed=2, reference_images=[_b64(MUG)])
    response = handle.generate_images.remote(request).result(timeout_s=120)
    assert response.mode == "instruction-edit" and response.model == MODEL
    assert read_png_meta(base64.b64decode(response.images[0].b64_png))["reference_images_sha256"] == [_sha(MUG)]


def test_jobs_and_sync_requests_take_an_earlier_jobs_image_as_a_reference(dev_app):
    client = dev_app["client"]
    first = wait_finished(client, submit(client, "image", {**FAST, "prompt": "a red mug", "seed": 1})["id"])
    assert first["state"] == "succeeded", first
    source = client.get(first["files"][0]["url"]).content
    ref = {"job_id": first["id"], "index": 0}
    edit = wait_finished(client, submit(client, "image", {**FAST, "prompt": "make it night", "seed": 1,
                                                          "reference_images": [ref]})["id"])
    assert edit["state"] == "succeeded", edit
    edited = client.get(edit["files"][0]["url"]).content
    assert read_png_meta(edited)["reference_images_sha256"] == [_sha(source)]
    sync = client.post("/v1/images", json={**FAST, "prompt": "make it night", "reference_images": [ref]})
    assert sync.status_code == 200 and sync.json()["mode"] == "instruction-edit", sync.text
    missing = client.post("/v1/jobs", json={"kind": "image", "request": {
        **FAST, "prompt": "make it night", "reference_images": [{"job_id": "no-such-job", "index": 0}]}})
    assert missing.status_code == 422 and missing.json()["detail"][0]["loc"][-2:] == ["reference_images", 0]


def test_mcp_edit_image_edits_a_finished_jobs_image_by_instruction(base):
    async def run():
        async with McpClient(f"{base}/mcp") as client:
            first = await client.call_tool("generate_image", {"request": {**FAST, "prompt": "a mug", "seed": 3},
                                                              "wait_s": 120})
            edited = await client.call_tool("edit_image", {
                "request": {**FAST, "prompt": "make it night", "seed": 3},
                "source_job_id": first.structured_content["job_id"], "wait_s": 120})
            return first, edited

    first, edited = asyncio.run(run())
    assert not first.is_error and not edited.is_error, edited.content
    assert edited.structured_content["result"]["mode"] == "instruction-edit"
    assert any(block.type == "image" for block in edited.content)


def test_openai_sdk_images_edit_with_two_reference_images_is_an_instruction_edit(base):
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
    result = client.images.edit(
        image=[("mug.png", MUG, "image/png"), ("logo.png", LOGO, "image/png")], prompt="put this logo on that mug",
        model=MODEL, size="256x256", extra_body={"seed": 9, "num_inference_steps": 2, "enhance": False})
    meta = read_png_meta(base64.b64decode(result.data[0].b64_json))
    assert meta["model"] == MODEL and meta["mode"] == "instruction-edit"
    assert meta["reference_images_sha256"] == [_sha(MUG), _sha(LOGO)]
    generated = client.images.generate(prompt="a mug", model=MODEL, size="256x256",
                                       extra_body={"seed": 9, "num_inference_steps": 2, "enhance": False})
    generated_meta = read_png_meta(base64.b64decode(generated.data[0].b64_json))
    assert generated_meta["model"] == MODEL and "reference_images_sha256" not in generated_meta
    with pytest.raises(openai.BadRequestError) as caught:  # a model that edits one image: image-to-image
        client.images.edit(image=[("mug.png", MUG, "image/png"), ("logo.png", LOGO, "image/png")], prompt="x",
                           model="flux-schnell", size="256x256")
    assert caught.value.param == "image"


def test_the_editing_docs_instruction_edit_example_runs(dev_app, tmp_path):
    import re
    import subprocess
    import sys
    from pathlib import Path

    page = (Path(__file__).parents[2] / "docs" / "editing.md").read_text()
    section = page.split("## Edits by instruction", 1)[1]
    code = re.search(r"<!--.*?-->\n```python\n(.*?)```", section, re.S).group(1)
    code = code.replace("127.0.0.1:8000", f"127.0.0.1:{dev_app['client'].base_url.port}")
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["instruction-edit"]

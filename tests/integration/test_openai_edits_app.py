"""Editing through the protocols agents speak, on the shared dev app (tiny models, CPU): the
unmodified `openai` SDK's `images.edit` (sync and async) against POST /v1/images/edits, and the
MCP `edit_image` tool with the `mcp` SDK's client."""

import asyncio
import base64
import io

import httpx
import numpy as np
import openai
import pytest
from mcp import Client as McpClient
from PIL import Image

from tests.helpers import image_bytes

pytestmark = pytest.mark.integration
PNG = b"\x89PNG\r\n\x1a\n"


def pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as decoded:
        return np.asarray(decoded.convert("RGB"))


ramp = np.arange(256) * 255 // 255
xx, yy = np.meshgrid(ramp, ramp)
PHOTO_PIXELS = np.stack([xx, yy, 255 - xx], -1).astype(np.uint8)
PHOTO = image_bytes(Image.fromarray(PHOTO_PIXELS))
HOLE = (slice(64, 192), slice(64, 192))


def white_mask() -> bytes:
    mask = Image.new("L", (256, 256), 0)
    mask.paste(255, (64, 64, 192, 192))
    return image_bytes(mask)


def transparent_mask() -> bytes:
    mask = Image.new("RGBA", (256, 256), (255, 255, 255, 255))
    mask.paste((0, 0, 0, 0), (64, 64, 192, 192))
    return image_bytes(mask)


@pytest.fixture
def base(dev_app) -> str:
    return str(dev_app["client"].base_url).rstrip("/")


def test_openai_sdk_inpaints_as_post_v1_images_does_with_either_mask_convention(base, dev_app):
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
    fields = {"prompt": "a red balloon", "size": "256x256", "extra_body": {"seed": 11, "enhance": False}}
    genserve_mask = client.images.edit(image=("photo.png", PHOTO, "image/png"),
                                       mask=("mask.png", white_mask(), "image/png"), **fields)
    openai_mask = client.images.edit(image=("photo.png", PHOTO, "image/png"),
                                     mask=("mask.png", transparent_mask(), "image/png"), **fields)
    direct = dev_app["client"].post("/v1/images", json={
        "prompt": "a red balloon", "width": 256, "height": 256, "seed": 11, "enhance": False,
        "init_image": base64.b64encode(PHOTO).decode(), "mask": base64.b64encode(white_mask()).decode()}).json()
    edited = base64.b64decode(genserve_mask.data[0].b64_json)
    assert edited == base64.b64decode(direct["images"][0]["b64_png"]), "the same request on the same path"
    assert genserve_mask.model_extra["genserve"]["mode"] == "inpainting"
    same = pixels(base64.b64decode(openai_mask.data[0].b64_json))
    assert np.array_equal(same, pixels(edited)), "a transparent hole marks the same pixels as a white square"
    outside = np.ones((256, 256), dtype=bool)
    outside[HOLE] = False
    assert np.array_equal(same[outside], PHOTO_PIXELS[outside]), "unmasked pixels are the input's"
    assert not np.array_equal(same[HOLE], PHOTO_PIXELS[HOLE]), "the hole is repainted"


def test_async_openai_sdk_edits_image_to_image_and_links_url_results(base):
    async def run():
        client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        return await asyncio.gather(
            client.images.edit(image=PHOTO, prompt="a watercolour", n=2, extra_body={"seed": 3, "strength": 0.5}),
            client.images.edit(image=PHOTO, prompt="a watercolour", response_format="url", extra_body={"seed": 3}))

    inline, linked = asyncio.run(run())
    extra = inline.model_extra["genserve"]
    assert (extra["mode"], extra["strength"], len(inline.data)) == ("image-to-image", 0.5, 2)
    assert all(base64.b64decode(item.b64_json).startswith(PNG) for item in inline.data)
    url = linked.data[0].url
    assert url.startswith(f"{base}/v1/jobs/") and httpx.get(url).content.startswith(PNG)
    job = httpx.get(f"{base}/v1/jobs/{linked.model_extra['genserve']['id']}").json()
    assert job["state"] == "succeeded"
    assert linked.model_extra["genserve"]["mode"] == "image-to-image"


def test_openai_sdk_edit_errors_name_the_field(base):
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
    small = image_bytes(Image.new("L", (64, 64)))
    cases = [({"image": b"not an image"}, "image"), ({"image": PHOTO, "mask": small}, "mask"),
             ({"image": PHOTO, "n": 9}, "n"), ({"image": PHOTO, "extra_body": {"strength": 0.1}}, "strength"),
             ({"image": PHOTO, "background": "transparent"}, "background")]
    for fields, param in cases:
        with pytest.raises(openai.BadRequestError) as caught:
            client.images.edit(prompt="a fox", **fields)
        assert caught.value.param == param and caught.value.type == "invalid_request_error", caught.value.body


def test_mcp_edit_image_repaints_a_finished_jobs_image_or_a_sent_one(base):
    async def run():
        async with McpClient(f"{base}/mcp") as client:
            first = await client.call_tool("generate_image", {"request": {"prompt": "a castle", "seed": 5},
                                                              "wait_s": 120})
            job_id = first.structured_content["job_id"]
            from_job = await client.call_tool("edit_image", {
                "request": {"prompt": "a castle at night", "seed": 6, "mask": base64.b64encode(white_mask()).decode()},
                "source_job_id": job_id, "wait_s": 120})
            sent = await client.call_tool("edit_image", {
                "request": {"prompt": "a castle at night", "init_image": base64.b64encode(PHOTO).decode(),
                            "strength": 0.5}, "wait_s": 120})
            missing = await client.call_tool("edit_image", {"request": {"prompt": "a fox"}, "source_job_id": job_id,
                                                            "source_image": 2})
            return first, from_job, sent, missing

    first, from_job, sent, missing = asyncio.run(run())
    assert not from_job.is_error, from_job.content
    source = next(block for block in first.content if block.type == "image")
    edited = next(block for block in from_job.content if block.type == "image")
    assert from_job.structured_content["result"]["mode"] == "inpainting"
    before, after = pixels(base64.b64decode(source.data)), pixels(base64.b64decode(edited.data))
    outside = np.ones((256, 256), dtype=bool)
    outside[HOLE] = False
    assert np.array_equal(after[outside], before[outside]), "the job's image is what was edited"
    assert not np.array_equal(after[HOLE], before[HOLE])
    assert not sent.is_error and sent.structured_content["result"]["mode"] == "image-to-image"
    assert sent.structured_content["result"]["strength"] == 0.5
    assert missing.is_error and "source_image: job" in missing.content[0].text


def test_the_editing_docs_openai_example_runs(dev_app, tmp_path):
    import re
    import subprocess
    import sys
    from pathlib import Path

    page = (Path(__file__).parents[2] / "docs" / "editing.md").read_text()
    section = page.split("## From agents", 1)[1]
    code = re.search(r"<!--.*?-->\n```python\n(.*?)```", section, re.S).group(1)
    code = code.replace("127.0.0.1:8000", f"127.0.0.1:{dev_app['client'].base_url.port}")
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["inpainting", "0.9"]

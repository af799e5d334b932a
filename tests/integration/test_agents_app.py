"""The protocols agents speak, on the shared dev app, each with its own official client over HTTP:
the OpenAI Images API (the `openai` SDK, sync and async) and MCP tools (the `mcp` SDK's client)."""

import asyncio
import base64
import json
import re

import httpx
import openai
import pytest
from mcp import Client as McpClient
from PIL import Image

from serve_app.protocol.schemas import ImageRequest
from tests.integration.apps import ROOT

pytestmark = pytest.mark.integration
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def base(dev_app) -> str:
    return str(dev_app["client"].base_url).rstrip("/")


# OpenAI Images API


def test_openai_sdk_generates_the_same_images_as_v1_images(base, dev_app):
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
    answer = client.images.generate(prompt="a lighthouse at dusk", n=2, size="256x256", quality="hd",
                                    style="natural", extra_body={"seed": 42})
    assert len(answer.data) == 2 and answer.created > 0
    direct = dev_app["client"].post("/v1/images", json={
        "prompt": "a lighthouse at dusk", "num_images": 2, "width": 256, "height": 256, "quality": "high",
        "style": "photorealistic", "seed": 42}).json()
    assert [base64.b64decode(item.b64_json) for item in answer.data] == \
        [base64.b64decode(image["b64_png"]) for image in direct["images"]], "the same request on the same path"
    assert all(item.revised_prompt == direct["enhanced_prompt"] for item in answer.data)
    assert answer.model_extra["genserve"]["images"][1]["seed"] == 43


def test_openai_sdk_url_results_link_the_job_files(base):
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
    answer = client.images.generate(prompt="a red fox", response_format="url", extra_body={"seed": 3})
    url = answer.data[0].url
    assert url.startswith(f"{base}/v1/jobs/") and url.endswith("/files/image-0.png")
    assert httpx.get(url).content.startswith(PNG)
    job_id = answer.model_extra["genserve"]["id"]
    assert httpx.get(f"{base}/v1/jobs/{job_id}").json()["state"] == "succeeded"


def test_openai_sdk_errors_name_the_field_in_openai_shape(base):
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
    cases = [({"n": 9}, "n"), ({"size": "250x256"}, "size"), ({"model": "dall-e-3"}, "model"),
             ({"extra_body": {"num_inference_steps": 9}}, "num_inference_steps")]
    for fields, param in cases:
        with pytest.raises(openai.BadRequestError) as caught:
            client.images.generate(prompt="a fox", **fields)
        assert caught.value.status_code == 400 and caught.value.param == param, caught.value.body
        assert caught.value.type == "invalid_request_error"


def test_async_openai_sdk_generates_and_lists_models(base):
    async def run():
        client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        models = [model.id async for model in client.models.list()]
        one = await client.models.retrieve("flux-schnell")
        images = await asyncio.gather(*(client.images.generate(prompt=f"a boat {i}", model="flux-schnell")
                                        for i in range(3)))
        with pytest.raises(openai.NotFoundError):
            await client.models.retrieve("dall-e-3")
        return models, one, images

    models, one, images = asyncio.run(run())
    assert {"flux-schnell", "sdxl"} <= set(models) and one.id == "flux-schnell"
    assert all(base64.b64decode(answer.data[0].b64_json).startswith(PNG) for answer in images)


# MCP


def _mcp(base):
    return McpClient(f"{base}/mcp")


def test_mcp_lists_tools_with_the_request_models_schemas(base):
    async def run():
        async with _mcp(base) as client:
            return {tool.name: tool for tool in (await client.list_tools()).tools}

    tools = asyncio.run(run())
    assert set(tools) >= {"generate_image", "generate_video", "enhance_prompt", "score_images", "get_job",
                          "cancel_job", "list_models"}
    schema = tools["generate_image"].input_schema
    assert schema["$defs"]["ImageRequest"]["properties"] == ImageRequest.model_json_schema()["properties"]
    assert schema["$defs"]["ImageRequest"]["properties"]["num_images"]["maximum"] == 4


def test_mcp_generate_image_reports_progress_and_returns_pngs(base):
    progress = []

    async def on_progress(value, total, message):
        progress.append((value, total, message))

    async def run():
        async with _mcp(base) as client:
            return await client.call_tool("generate_image", {"request": {"prompt": "a castle", "seed": 5}, "wait_s": 120},
                                          progress_callback=on_progress)

    result = asyncio.run(run())
    assert not result.is_error, result.content
    images = [block for block in result.content if block.type == "image"]
    assert len(images) == 1 and images[0].mime_type == "image/png"
    assert base64.b64decode(images[0].data).startswith(PNG)
    assert result.structured_content["result"]["images"][0]["seed"] == 5
    # Progress reports the job's latest state, so a slow watcher skips steps and may miss the last one.
    reported = [(value, total, message) for value, total, message in progress if message and "step" in message]
    steps = [int(re.fullmatch(r"generate: step (\d)/4", message).group(1)) for _, _, message in reported]
    assert steps and steps == sorted(steps) and steps[-1] <= 4, progress
    assert [(value, total) for value, total, _ in reported] == [(step, 4) for step in steps], progress


def test_mcp_past_the_wait_bound_returns_a_job_to_poll(base):
    async def run():
        async with _mcp(base) as client:
            first = await client.call_tool("generate_image", {"request": {"prompt": "a tower"}, "wait_s": 0})
            pending = json.loads(first.content[0].text)
            polled = await client.call_tool("get_job", {"job_id": pending["job_id"], "wait_s": 120})
            cancel = await client.call_tool("cancel_job", {"job_id": pending["job_id"]})
            return pending, polled, cancel

    pending, polled, cancel = asyncio.run(run())
    assert pending["finished"] is False and pending["state"] in ("queued", "running")
    assert not polled.is_error and any(block.type == "image" for block in polled.content)
    assert cancel.is_error and "only queued or running jobs can be cancelled" in cancel.content[0].text


def test_mcp_generate_video_returns_a_link_to_the_file(base):
    async def run():
        async with _mcp(base) as client:
            return await client.call_tool("generate_video", {
                "request": {"prompt": "waves", "num_frames": 4, "width": 256, "height": 256, "seed": 1},
                "wait_s": 240})

    result = asyncio.run(run())
    assert not result.is_error, result.content
    link = next(block for block in result.content if block.type == "resource_link")
    assert link.mime_type == "video/mp4" and link.uri.startswith(f"{base}/v1/jobs/")
    assert httpx.get(link.uri).content[4:8] == b"ftyp"


@pytest.mark.parametrize("tool, arguments, words", [
    ("generate_image", {"request": {"prompt": "a fox", "num_images": 9}}, "num_images"),
    ("generate_image", {"request": {"prompt": "a fox", "num_inference_steps": 9}}, "num_inference_steps: "),
    ("generate_image", {"request": {"prompt": "a fox", "model": "dall-e-3"}}, "model: must be one of"),
    ("generate_video", {"request": {"prompt": "waves", "image": "aGk="}}, "not both"),
    ("enhance_prompt", {"request": {"prompt": " "}}, "prompt"),
    ("get_job", {"job_id": "nope"}, "no job 'nope'"),
])
def test_mcp_bad_arguments_are_tool_errors_naming_the_field_and_the_session_goes_on(base, tool, arguments, words):
    async def run():
        async with _mcp(base) as client:
            bad = await client.call_tool(tool, arguments)
            fine = await client.call_tool("enhance_prompt", {"request": {"prompt": "a fox"}})
            return bad, fine

    bad, fine = asyncio.run(run())
    assert bad.is_error and words in bad.content[0].text, bad.content
    assert not fine.is_error and "a fox" in fine.content[0].text


def test_mcp_list_models_and_enhance(base):
    async def run():
        async with _mcp(base) as client:
            return (await client.call_tool("list_models", {}),
                    await client.call_tool("enhance_prompt", {"request": {"prompt": "a fox", "style": "anime"}}))

    models, enhanced = asyncio.run(run())
    assert models.structured_content["default_model"] == "flux-schnell"
    videos = models.structured_content["video_models"]
    assert [video["id"] for video in videos] == ["svd", "ltx-video", "animatediff"]
    assert models.structured_content["default_video_model"] == "svd" and videos[1]["text_to_video"] == "native"
    assert enhanced.structured_content["style"] == "anime" and enhanced.structured_content["prompt"] == "a fox"


# The documented examples (docs/agents.md), run as written against the dev app.


def _documented(heading: str, base: str) -> str:
    text = (ROOT / "docs" / "agents.md").read_text()
    section = text[text.index(heading):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1).replace("http://127.0.0.1:8000", base)


def test_the_documented_openai_stream_sends_partial_images_then_the_image(base, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exec(compile(_documented("### Streaming: `stream` and `partial_images`", base), "docs/agents.md", "exec"),
         {"__name__": "docs_example"})
    printed = capsys.readouterr().out.splitlines()
    partials = [line.split() for line in printed if line.startswith("partial")]
    # The stream follows the job's latest step: a slow follower may see one preview where two were due.
    assert 1 <= len(partials) <= 2 and [int(index) for _, index, _ in partials] == list(range(len(partials)))
    assert all(size == "32x32" for _, _, size in partials), "a 256x256 SDXL image's latent-sized previews"
    assert printed[-1] == "image 256x256 7" and len(printed) == len(partials) + 1, printed
    with Image.open(tmp_path / "lighthouse.png") as png, Image.open(tmp_path / "partial-0.png") as preview:
        assert (png.format, png.size, preview.size) == ("PNG", (256, 256), (32, 32))


def test_the_documented_mcp_links_load_without_inline_pixels(base, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exec(compile(_documented("**Links instead of pixels.**", base), "docs/agents.md", "exec"),
         {"__name__": "docs_example"})
    printed = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert [(name, mime) for name, mime, _ in printed] == [("image-0.png", "image/png"), ("image-1.png", "image/png")]
    for name, _, size in printed:
        assert (tmp_path / name).read_bytes().startswith(PNG) and (tmp_path / name).stat().st_size == int(size)

"""The MCP tools over fake deployments, with the `mcp` SDK's own client in process: schemas come
from the request models, bad arguments are tool errors naming the field, and the session goes on."""

import asyncio

import pytest
from mcp import Client

from serve_app.api.mcp.tools import build_mcp
from serve_app.protocol.schemas import ImageRequest
from tests.fakes import fake_services
from tests.helpers import app_settings


@pytest.fixture
def server():
    services = fake_services()
    return build_mcp(lambda: services, lambda ctx: "")


def _calls(server, *calls):
    async def run():
        async with Client(server) as client:
            return [await client.call_tool(name, arguments) for name, arguments in calls]

    return asyncio.run(run())


def test_tool_schemas_are_the_request_models():
    tools = {tool.name: tool for tool in asyncio.run(build_mcp(lambda: None, lambda ctx: "").list_tools())}
    schema = tools["generate_image"].input_schema
    assert schema["$defs"]["ImageRequest"]["properties"] == ImageRequest.model_json_schema()["properties"]
    assert schema["properties"]["wait_s"]["maximum"] == 300
    edit = tools["edit_image"].input_schema
    assert edit["$defs"]["ImageRequest"] == schema["$defs"]["ImageRequest"], "edit_image takes POST /v1/images's body"
    assert edit["properties"]["source_image"]["maximum"] == 3 and "source_job_id" in edit["properties"]
    assert set(tools) == {"generate_image", "edit_image", "generate_video", "enhance_prompt", "score_images", "get_job",
                          "cancel_job", "list_models"}


def test_enhance_prompt_and_list_models_answer_structured(server):
    enhanced, models = _calls(server, ("enhance_prompt", {"request": {"prompt": "a fox"}}), ("list_models", {}))
    assert not enhanced.is_error and enhanced.structured_content["enhanced_prompt"] == "a fox, enhanced"
    assert models.structured_content["default_model"] == "flux-schnell"
    assert [model["id"] for model in models.structured_content["models"]] == ["flux-schnell"]


@pytest.mark.parametrize("name, arguments, words", [
    ("enhance_prompt", {"request": {"prompt": " "}}, "request.prompt"),
    ("enhance_prompt", {"request": {"prompt": "a fox", "model": "dall-e-3"}}, "model: must be one of ['flux-schnell']"),
    ("generate_image", {"request": {"prompt": "a fox", "num_images": 9}}, "request.num_images"),
    ("generate_image", {"request": {"prompt": "a fox"}, "wait_s": 9999}, "wait_s"),
    ("generate_image", {"request": {"prompt": "a fox"}}, "async jobs are not deployed"),
    ("get_job", {"job_id": ""}, "job_id"),
    ("edit_image", {"request": {"prompt": "a fox"}}, "request.init_image: give the image to edit"),
    ("edit_image", {"request": {"prompt": "a fox", "init_image": "aGk="}, "source_job_id": "j1"}, "not both"),
    ("edit_image", {"request": {"prompt": "a fox", "init_image": "aGk="}, "source_image": 4}, "source_image"),
    ("edit_image", {"request": {"prompt": "a fox", "init_image": "aGk="}}, "async jobs are not deployed"),
])
def test_bad_arguments_are_tool_errors_naming_the_field_and_the_session_goes_on(server, name, arguments, words):
    bad, fine = _calls(server, (name, arguments), ("enhance_prompt", {"request": {"prompt": "a fox"}}))
    assert bad.is_error and words in bad.content[0].text, bad.content[0].text
    assert not fine.is_error


def test_mcp_is_served_at_slash_mcp_of_the_api_app_once_its_lifespan_runs():
    """The route the Ingress serves: build_api mounts the server and its lifespan runs the session
    manager (Serve runs only the top-level app's lifespan); any Host header is answered."""
    import httpx2
    from mcp.client.streamable_http import streamable_http_client

    from serve_app.api.app import build_api

    app = build_api()
    app.state.services = fake_services()

    async def run():
        async with app.router.lifespan_context(app):
            http = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://genserve.example")
            async with Client(streamable_http_client("http://genserve.example/mcp", http_client=http)) as client:
                return await client.call_tool("enhance_prompt", {"request": {"prompt": "a fox"}})

    result = asyncio.run(run())
    assert not result.is_error and result.structured_content["enhanced_prompt"] == "a fox, enhanced"


def test_list_models_lists_the_video_models_with_their_rules_and_the_default():
    entries = [{"id": "svd", "family": "svd", "source": "tiny", "default_width": 256, "default_height": 256},
               {"id": "ltx-video", "family": "ltx", "source": "tiny"}]
    services = fake_services(app_settings(video_models=entries, default_video_model="ltx-video"))
    server = build_mcp(lambda: services, lambda ctx: "")
    [models] = _calls(server, ("list_models", {}))
    listed = {model["id"]: model for model in models.structured_content["video_models"]}
    assert list(listed) == ["svd", "ltx-video"] and models.structured_content["default_video_model"] == "ltx-video"
    assert (listed["ltx-video"]["text_to_video"], listed["ltx-video"]["frames"]) == ("native", "8k+1 frames between 9 and 257")
    assert listed["svd"]["params"] == ["motion_bucket_id", "noise_aug_strength", "decode_chunk_size"]


def test_edit_image_on_a_model_that_edits_by_instruction_needs_references_not_init_image():
    from tests.helpers import model_entry

    services = fake_services(app_settings(model_entry(), model_entry(
        "flux2-klein", "flux2", limits={"max_steps": 8, "max_guidance": 0}, default_steps=4)))
    server = build_mcp(lambda: services, lambda ctx: "")
    [bare, old_way] = _calls(server, ("edit_image", {"request": {"prompt": "make it night", "model": "flux2-klein"}}),
                             ("edit_image", {"request": {"prompt": "make it night"}}))
    assert bare.is_error and "request.reference_images" in bare.content[0].text
    assert old_way.is_error and "request.init_image" in old_way.content[0].text  # flux-schnell: image-to-image


def test_inline_false_returns_resource_links_to_signed_urls_that_load_without_a_key(tmp_path):
    """An agent's context keeps a link instead of megabytes of base64: `inline: false` gives a resource_link
    per image, its URL signed for the caller's key, which any HTTP client loads without the key."""
    import httpx2
    import yaml
    from mcp.client.streamable_http import streamable_http_client

    from serve_app.api.app import build_api
    from serve_app.jobs import http as jobs_http
    from serve_app.security.guard import Auth
    from serve_app.security.keys import key_entry_yaml, new_key
    from serve_app.services.health import Readiness
    from serve_app.services.local import LocalHandle
    from tests.job_stores import Backend
    from tests.unit.test_job_dispatch import ControlledGenerator, _dispatcher

    key_id, key = new_key()
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text(yaml.safe_dump({"url_signing_secret": "s" * 64,
                                         "keys": [key_entry_yaml(key_id, "agent", key, ["generate", "read"])]}))
    backend = Backend("sqlite", tmp_path)
    dispatcher = _dispatcher(backend.open(), ControlledGenerator())
    services = fake_services()
    services.jobs = jobs_http.JobsApi(LocalHandle(dispatcher), services.images, None, 2)
    services.readiness = Readiness(lambda: {})
    app = build_api()
    app.state.services = services
    app.state.auth = Auth(str(keys_file), metrics=False)

    async def run():
        dispatcher.start()
        transport = httpx2.ASGITransport(app=app)
        keyed = httpx2.AsyncClient(transport=transport, base_url="http://genserve.example",
                                   headers={"Authorization": f"Bearer {key}"})
        try:
            async with app.router.lifespan_context(app), \
                    Client(streamable_http_client("http://genserve.example/mcp", http_client=keyed)) as client:
                request = {"request": {"prompt": "a fox", "num_images": 2, "seed": 4}, "wait_s": 30}
                linked = await client.call_tool("generate_image", {**request, "inline": False})
                inline = await client.call_tool("get_job", {"job_id": linked.structured_content["job_id"]})
            keyless = httpx2.AsyncClient(transport=transport, base_url="http://genserve.example")
            links = [block for block in linked.content if block.type == "resource_link"]
            loaded = [await keyless.get(link.uri) for link in links]
            refused = await keyless.get(links[0].uri.split("?")[0])
            return linked, inline, links, loaded, refused
        finally:
            await dispatcher.stop()
            backend.close()

    linked, inline, links, loaded, refused = asyncio.run(run())
    assert not linked.is_error and [block.type for block in linked.content] == ["text", "resource_link", "resource_link"]
    assert [link.name for link in links] == ["image-0.png", "image-1.png"]
    assert all(link.mime_type == "image/png" and link.size > 0 for link in links)
    assert all(link.uri.startswith("http://genserve.example/v1/jobs/") and f"kid={key_id}" in link.uri for link in links)
    assert [(response.status_code, response.content[:4]) for response in loaded] == [(200, b"\x89PNG")] * 2
    assert refused.status_code == 401, "the link works because it is signed, not because files are public"
    assert [block.type for block in inline.content] == ["text", "image", "image"], "inline stays the default"

"""POST /v1/images/generations over fake deployments: OpenAI's fields mapped onto ImageRequest, the
same validation as POST /v1/images, and errors in OpenAI's envelope naming the field as sent."""

import base64

import pytest
from fastapi.testclient import TestClient

from serve_app.api.app import build_api
from serve_app.api.openai.protocol import OpenAIImageRequest, to_image_request
from tests.fakes import FakeGenerator, fake_services
from tests.helpers import LOOPBACK


class CountingGenerator(FakeGenerator):
    calls = 0

    def generate(self, *args, **kwargs):
        CountingGenerator.calls += 1
        return super().generate(*args, **kwargs)


@pytest.fixture
def client():
    app = build_api()
    app.state.services = fake_services(generator=CountingGenerator())
    CountingGenerator.calls = 0
    return TestClient(app, client=LOOPBACK)


@pytest.mark.parametrize("quality, expected", [("hd", "high"), ("standard", "standard"), ("low", "none"),
                                                ("medium", "standard"), ("auto", "high"), ("none", "none")])
def test_openai_quality_maps_onto_genserve_quality(quality, expected):
    assert to_image_request(OpenAIImageRequest(prompt="a fox", quality=quality)).quality == expected


@pytest.mark.parametrize("style, expected", [("vivid", "cinematic"), ("natural", "photorealistic"),
                                              ("anime", "anime"), (None, None)])
def test_openai_style_maps_onto_genserve_style(style, expected):
    assert to_image_request(OpenAIImageRequest(prompt="a fox", style=style)).style == expected


def test_size_n_and_genserve_fields_become_one_image_request():
    request = to_image_request(OpenAIImageRequest(prompt="a fox", n=2, size="512x272", seed=7,
                                                  num_inference_steps=3, negative_prompt="dogs"))
    assert (request.width, request.height, request.num_images, request.seed) == (512, 272, 2, 7)
    assert (request.num_inference_steps, request.negative_prompt) == (3, "dogs")
    assert to_image_request(OpenAIImageRequest(prompt="a fox", size="auto")).width is None


def test_generation_answers_in_openai_shape_with_the_enhanced_prompt(client):
    answer = client.post("/v1/images/generations", json={"prompt": "a fox", "n": 2, "seed": 7, "size": "256x272"})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert isinstance(body["created"], int) and body["size"] == "256x272" and body["output_format"] == "png"
    assert [item["revised_prompt"] for item in body["data"]] == ["a fox, enhanced"] * 2
    assert all(base64.b64decode(item["b64_json"]).startswith(b"\x89PNG") for item in body["data"])
    assert [image["seed"] for image in body["genserve"]["images"]] == [7, 8]
    assert "b64_png" not in body["genserve"]["images"][0]
    assert CountingGenerator.calls > 0, "the counter the bad-input test relies on counts"


@pytest.mark.parametrize("body, param, words", [
    ({"prompt": "a fox", "n": 9}, "n", "allowed: 1-4"),
    ({"prompt": "a fox", "size": "1024"}, "size", "'WxH' or 'auto'"),
    ({"prompt": "a fox", "size": "250x256"}, "size", "multiple of 16"),
    ({"prompt": "a fox", "size": "4096x256"}, "size", "256-2048"),
    ({"prompt": "a fox", "quality": "ultra"}, "quality", "'hd'"),
    ({"prompt": "a fox", "style": "moody"}, "style", "'vivid'"),
    ({"prompt": "a fox", "response_format": "webp"}, "response_format", "b64_json"),
    ({"prompt": "  "}, "prompt", "non-whitespace"),
    ({"n": 1}, "prompt", "required"),
    ({"prompt": "a fox", "model": "dall-e-3"}, "model", "flux-schnell"),
    ({"prompt": "a fox", "num_inference_steps": 9}, "num_inference_steps", "got 9 (allowed: 1-4)"),
    ({"prompt": "a fox", "sampler": "euler"}, "sampler", "Extra inputs are not permitted"),
    ({"prompt": "a fox", "n": 2, "num_images": 2}, "n", "not both"),
])
def test_bad_fields_get_openai_errors_naming_the_field_and_reach_no_model(client, body, param, words):
    answer = client.post("/v1/images/generations", json=body)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert words in error["message"]
    assert CountingGenerator.calls == 0


def test_other_routes_keep_genserve_422_shape(client):
    answer = client.post("/v1/images", json={"prompt": "a fox", "num_images": 9})
    assert answer.status_code == 422 and "detail" in answer.json()


def test_models_route_in_openai_shape(client):
    answer = client.get("/v1/models/flux-schnell")
    assert answer.json() == {"id": "flux-schnell", "object": "model", "created": 0, "owned_by": "genserve"}
    missing = client.get("/v1/models/dall-e-3")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_a_lost_replica_is_a_retryable_503_in_openai_shape():
    from ray.exceptions import RayActorError

    class LostGenerator(FakeGenerator):
        async def generate(self, *args, **kwargs):
            raise RayActorError()

    app = build_api()
    app.state.services = fake_services(generator=LostGenerator())
    answer = TestClient(app, client=LOOPBACK).post("/v1/images/generations", json={"prompt": "a fox"})
    assert answer.status_code == 503 and answer.headers["retry-after"] == "5"
    assert answer.json()["error"]["type"] == "server_error" and answer.json()["error"]["code"] == "replica_lost"


@pytest.mark.parametrize("field, value", [("stream", 0), ("n", "2"), ("partial_images", True)])
def test_a_json_body_is_strict_as_genserves_own_a_number_is_not_a_bool(client, field, value):
    """Found by the conformance fuzz: `"stream": 0` was read as false and answered 200."""
    response = client.post("/v1/images/generations", json={"prompt": "a fox", field: value})
    assert response.status_code == 400 and response.json()["error"]["param"] == field, response.text
    assert CountingGenerator.calls == 0

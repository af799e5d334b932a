"""POST /v1/images/edits over fake deployments: OpenAI's multipart form (as the `openai` SDK writes
it) becomes one ImageRequest with init_image/mask, OpenAI's transparent-mask convention becomes
genserve's white-means-repaint mask, and bad input gets OpenAI's envelope naming the field."""

import base64
import io

import httpx2
import numpy as np
import openai
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from serve_app.api.app import build_api
from serve_app.api.openai.protocol import edit_files, form_fields
from tests.fakes import FakeGenerator, fake_services
from tests.helpers import LOOPBACK, image_bytes

PHOTO = image_bytes(Image.linear_gradient("L").convert("RGB"))  # 256x256


def centre_mask(mode: str) -> bytes:
    """The centre square marked for repainting: OpenAI's way (transparent hole) or genserve's (white)."""
    if mode == "openai":
        mask = Image.new("RGBA", (256, 256), (0, 0, 0, 255))
        mask.paste((0, 0, 0, 0), (64, 64, 192, 192))
    else:
        mask = Image.new("L", (256, 256), 0)
        mask.paste(255, (64, 64, 192, 192))
    return image_bytes(mask)


@pytest.fixture
def app():
    generator = FakeGenerator()
    api = build_api()
    api.state.services = fake_services(generator=generator)
    api.state.generator = generator
    return api


@pytest.fixture
def sdk(app):
    """The unmodified openai SDK, its HTTP going to the app in process (the integration test goes over the wire)."""
    transport = httpx2.MockTransport(lambda request: _forward(TestClient(app, client=LOOPBACK), request))
    return openai.OpenAI(base_url="http://testserver/v1", api_key="unused", max_retries=0,
                         http_client=httpx2.Client(transport=transport))


def _forward(client: TestClient, request) -> httpx2.Response:
    answer = client.request(request.method, str(request.url), content=request.read(),
                            headers={key: value for key, value in request.headers.items() if key != "host"})
    return httpx2.Response(answer.status_code, headers=answer.headers, content=answer.content)


def test_the_sdks_multipart_edit_becomes_an_inpainting_request_with_the_same_graph(app, sdk):
    answer = sdk.images.edit(image=("photo.png", PHOTO, "image/png"), mask=("mask.png", centre_mask("openai"),
                             "image/png"), prompt="a red balloon", n=2, size="256x256",
                             extra_body={"seed": 7, "strength": 0.5, "mask_blur": 0, "hires": None})
    assert [item.revised_prompt for item in answer.data] == ["a red balloon, enhanced"] * 2
    extra = answer.model_extra["genserve"]
    assert (extra["mode"], extra["strength"], [image["seed"] for image in extra["images"]]) == \
        ("inpainting", 0.5, [7, 8])
    params, _ = app.state.generator.calls[0]
    assert params.edit.strength == 0.5 and params.edit.mask_blur == 0
    hole = np.zeros((256, 256), dtype=bool)
    hole[64:192, 64:192] = True
    assert np.array_equal(np.asarray(params.edit.mask) > 0, hole), "the transparent hole is what gets repainted"
    assert np.array_equal(params.edit.image[..., 0], np.asarray(Image.open(io.BytesIO(PHOTO)).convert("L")))


def test_without_a_mask_the_edit_is_image_to_image(app, sdk):
    answer = sdk.images.edit(image=PHOTO, prompt="a watercolour", extra_body={"seed": 1})
    assert answer.model_extra["genserve"]["mode"] == "image-to-image"
    assert app.state.generator.calls[0][0].edit.mask is None


@pytest.mark.parametrize("mode", ["openai", "genserve"])
def test_both_mask_conventions_mark_the_same_pixels(mode):
    files = edit_files(PHOTO, centre_mask(mode), 4096 * 4096)
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(files["mask"]))).convert("L"))
    assert (mask[128, 128], mask[0, 0], mask[63, 63], mask[64, 64]) == (255, 0, 0, 255)
    assert base64.b64decode(files["init_image"]) == PHOTO


def test_an_image_with_a_transparent_hole_and_no_mask_is_its_own_mask():
    image = Image.new("RGBA", (256, 256), (10, 20, 30, 255))
    image.paste((0, 0, 0, 0), (0, 0, 32, 32))
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(edit_files(image_bytes(image), None, 10**8)["mask"]))))
    assert mask[:32, :32].min() == 255 and mask[32:, :].max() == 0
    opaque = image_bytes(Image.new("RGBA", (256, 256), (10, 20, 30, 255)))
    assert "mask" not in edit_files(opaque, None, 10**8), "an opaque image edits the whole picture"


def test_the_sdks_bracket_notation_and_json_text_become_genserve_objects():
    fields = form_fields([("prompt", "p"), ("loras[][name]", "a"), ("loras[][scale]", "0.5"),
                          ("loras[][name]", "b"), ("hires[scale]", "2"), ("quality_weights", '{"aesthetic": 1}')])
    assert fields == {"prompt": "p", "loras": [{"name": "a", "scale": "0.5"}, {"name": "b"}],
                      "hires": {"scale": "2"}, "quality_weights": {"aesthetic": 1}}
    assert form_fields([("prompt", "[not json]")]) == {"prompt": "[not json]"}, "text fields stay text"


def _edit(client, files=None, **data):
    files = {"image": ("photo.png", PHOTO, "image/png")} if files is None else files
    return client.post("/v1/images/edits", data={"prompt": "a red balloon", **data}, files=files)


@pytest.mark.parametrize("files, data, param, words", [
    ({}, {}, "image", "Field required"),
    ({"image": ("a.txt", b"not an image", "text/plain")}, {}, "image", "not a readable PNG"),
    ({"image": ("photo.png", PHOTO, "image/png"),
      "mask": ("m.png", image_bytes(Image.new("L", (64, 64))), "image/png")},
     {}, "mask", "is 64x64 but init_image is 256x256"),
    (None, {"n": "9"}, "n", "allowed: 1-4"),
    (None, {"size": "250x256"}, "size", "multiple of 16"),
    (None, {"strength": "0.1"}, "strength", "num_inference_steps"),
    (None, {"mask_blur": "4"}, "mask_blur", "mask"),
    (None, {"init_image": "aGk="}, "image", "not both"),
    (None, {"background": "transparent"}, "background", "Extra inputs are not permitted"),
    (None, {"hires[scale]": "3"}, "hires.scale", "1-2"),
    (None, {"loras": "[oops"}, "loras", "not valid JSON"),
    (None, {"prompt": " "}, "prompt", "non-whitespace"),
    ({"image": ("photo.png", PHOTO, "image/png"), "markup": ("m.png", PHOTO, "image/png")}, {}, "markup",
     "Extra inputs are not permitted"),
    (None, {"loras[name]": "x"}, "loras", "valid list"),
])
def test_bad_edits_get_openai_errors_naming_the_field_and_reach_no_model(app, files, data, param, words):
    answer = _edit(TestClient(app, client=LOOPBACK), files, **data)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error", error
    assert words in error["message"], error
    assert app.state.generator.calls == []


def test_two_images_or_an_image_sent_as_text_are_refused_naming_image(app):
    client = TestClient(app, client=LOOPBACK)
    two = client.post("/v1/images/edits", data={"prompt": "p"},
                      files=[("image[]", ("a.png", PHOTO, "image/png")), ("image[]", ("b.png", PHOTO, "image/png"))])
    assert two.status_code == 400 and two.json()["error"]["param"] == "image"
    assert "one image" in two.json()["error"]["message"]
    text = client.post("/v1/images/edits", data={"prompt": "p", "image": base64.b64encode(PHOTO).decode()},
                       files={"unused": ("x", b"", "text/plain")})
    assert text.status_code == 400 and "file part" in text.json()["error"]["message"]
    as_json = client.post("/v1/images/edits", json={"prompt": "p"})
    assert as_json.status_code == 400 and as_json.json()["error"]["code"] == "invalid_content_type"
    assert app.state.generator.calls == []


def test_the_edits_route_is_documented_as_multipart_in_openapi(app):
    body = TestClient(app, client=LOOPBACK).get("/openapi.json").json()["paths"]["/v1/images/edits"]["post"]["requestBody"]
    schema = body["content"]["multipart/form-data"]["schema"]
    assert schema["required"] == ["image", "prompt"] and schema["properties"]["image"]["format"] == "binary"


def test_inline_openai_images_are_charged_to_the_keys_daily_budget(tmp_path, app):
    """As POST /v1/images: a key's daily_images covers generations and edits answered inline."""
    import yaml

    from serve_app.security.guard import Auth
    from serve_app.security.keys import key_entry_yaml, new_key

    key_id, key = new_key()
    entry = key_entry_yaml(key_id, "agent", key, ["generate", "read"])
    entry["limits"] = {"daily_images": 3}
    path = tmp_path / "keys.yaml"
    path.write_text(yaml.safe_dump({"url_signing_secret": "s" * 64, "keys": [entry]}))
    app.state.auth = Auth(str(path), metrics=False)
    client = TestClient(app, client=("203.0.113.5", 40000), headers={"Authorization": f"Bearer {key}"})
    assert client.post("/v1/images/generations", json={"prompt": "a fox", "n": 2}).status_code == 200
    over = _edit(client, n="2")
    assert over.status_code == 429 and "daily_images" in over.text, over.text
    assert _edit(client, n="1").status_code == 200, "the refusal cost nothing; one image is left"
    assert _edit(client, n="1").status_code == 429


def test_several_images_without_a_mask_are_an_instruction_edit_on_a_model_that_edits_by_instruction():
    from tests.helpers import app_settings, model_entry

    klein = FakeGenerator()
    api = build_api()
    api.state.services = fake_services(app_settings(model_entry(), model_entry(
        "flux2-klein", "flux2", limits={"max_steps": 8, "max_guidance": 0}, default_steps=4)),
        generators={"flux2-klein": klein})
    transport = httpx2.MockTransport(lambda request: _forward(TestClient(api, client=LOOPBACK), request))
    sdk = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", max_retries=0,
                        http_client=httpx2.Client(transport=transport))
    logo = image_bytes(Image.radial_gradient("L").convert("RGB"))
    answer = sdk.images.edit(image=[("mug.png", PHOTO, "image/png"), ("logo.png", logo, "image/png")],
                             prompt="put this logo on that mug", model="flux2-klein", size="256x256",
                             extra_body={"enhance": False})
    params, prompt = klein.calls[0]
    assert len(params.references) == 2 and prompt.prompt == "put this logo on that mug"
    assert answer.model_extra["genserve"]["mode"] == "instruction-edit"
    with pytest.raises(openai.BadRequestError) as caught:  # flux-schnell edits one image, image-to-image
        sdk.images.edit(image=[("mug.png", PHOTO, "image/png"), ("logo.png", logo, "image/png")], prompt="x")
    assert caught.value.param == "image" and "instruction_edits" in caught.value.message

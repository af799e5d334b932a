"""Reference images and edits by instruction in the services, over fake generators: decided by the
model's family capabilities in services/validation.py, 422s naming the field (and the families that
can), the references reaching the generator, and their hashes in the PNG metadata."""

import asyncio
import base64
import hashlib
import io

import numpy as np
import pytest
from PIL import Image

from serve_app.protocol.errors import RequestError
from serve_app.protocol.schemas import ImageRequest
from serve_app.services.media import read_png_meta
from tests.fakes import FakeGenerator, fake_services
from tests.helpers import app_settings, model_entry

KLEIN = model_entry("flux2-klein", "flux2", limits={"max_steps": 8, "max_guidance": 0}, default_steps=4)


def _png(width: int = 64, height: int = 64, seed: int = 0) -> str:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture()
def klein_generator():
    return FakeGenerator()


@pytest.fixture()
def services(klein_generator):
    return fake_services(app_settings(model_entry(), KLEIN), generators={"flux2-klein": klein_generator})


def _refused(services, **fields) -> RequestError:
    with pytest.raises(RequestError) as caught:
        services.images.plan(ImageRequest(prompt="make it night", **fields))
    return caught.value


def test_a_model_without_the_capability_names_the_field_and_the_families_that_have_it(services):
    error = _refused(services, reference_images=[_png()])
    assert error.field == "reference_images"
    assert "flux-schnell (family flux) takes no reference images" in error.message
    assert "family flux2 (models flux2-klein)" in error.message and "flux2-klein" in error.allowed


@pytest.mark.parametrize("fields, field, words", [
    ({"reference_images": [_png(seed=i) for i in range(5)]}, "reference_images", "at most 4"),
    ({"reference_images": [_png()], "init_image": _png()}, "init_image", "does not combine"),
    ({"reference_images": [_png(32, 64)]}, "reference_images.0", "at least 64 pixels"),
    ({"reference_images": [_png(), _png(576, 64)]}, "reference_images.1", "aspect ratio up to 8:1"),
    ({"reference_images": [{"job_id": "j1", "index": 0}]}, "reference_images.0", "through the Python handle"),
])
def test_bad_references_are_refused_naming_the_field(services, fields, field, words):
    error = _refused(services, model="flux2-klein", **fields)
    assert error.field == field and words in f"{error.message} {error.allowed}"


def test_the_references_reach_the_generator_and_their_hashes_the_png(services, klein_generator):
    references = [_png(seed=1), _png(96, 64, seed=2)]
    request = ImageRequest(prompt="make it night", model="flux2-klein", reference_images=references, seed=3,
                           enhance=False)
    response = asyncio.run(services.generate_images(request))
    params, prompt = klein_generator.calls[0]
    assert [image.shape for image in params.references] == [(64, 64, 3), (64, 96, 3)]
    assert prompt.prompt == "make it night" and response.mode == "instruction-edit"
    meta = read_png_meta(base64.b64decode(response.images[0].b64_png))
    assert meta["mode"] == "instruction-edit"
    assert meta["reference_images_sha256"] == [hashlib.sha256(base64.b64decode(data)).hexdigest()
                                               for data in references]


def test_the_models_listing_shows_what_each_model_takes(services):
    models = {model["id"]: model for model in services.images.models()}
    assert (models["flux2-klein"]["reference_images"], models["flux2-klein"]["instruction_edits"]) == (4, True)
    assert (models["flux-schnell"]["reference_images"], models["flux-schnell"]["instruction_edits"]) == (0, False)

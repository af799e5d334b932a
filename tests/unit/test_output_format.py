"""output_format: PNG by default, JPEG or WebP on request, the generation parameters inside each."""

import base64
import io

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from serve_app.api.openai.protocol import OpenAIError, OpenAIImageRequest, to_image_request
from serve_app.protocol.schemas import GeneratedImage, ImageRequest
from serve_app.services.media import encode_image_b64, encoding_of, read_image_meta

META = {"prompt": "a fox", "seed": 7, "steps": 2, "guidance_scale": 0.0, "width": 64, "height": 48, "model": "m"}
IMAGE = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
INFO = {"seed": 7, "width": 64, "height": 48, "attempt": 1, "scores": {"aesthetic": 0.5, "alignment": 20.0},
        "passed": True}


@pytest.mark.parametrize("output_format", ["png", "jpeg", "webp"])
def test_each_format_is_that_file_with_the_parameters_inside(output_format):
    fields = encode_image_b64(IMAGE, META, **encoding_of(ImageRequest(prompt="a fox", output_format=output_format)))
    image = GeneratedImage(**INFO, **fields)
    data = image.image_bytes()
    with Image.open(io.BytesIO(data)) as opened:
        assert opened.format == output_format.upper() and opened.size == (64, 48)
    assert read_image_meta(data) == META and image.media_type == f"image/{output_format}"
    assert (image.b64_png is None) == (output_format != "png") and (image.b64_image is None) == (output_format == "png")


def test_output_compression_is_the_lossy_quality():
    low = encode_image_b64(IMAGE, META, **encoding_of(ImageRequest(prompt="a", output_format="jpeg",
                                                                    output_compression=10)))
    high = encode_image_b64(IMAGE, META, **encoding_of(ImageRequest(prompt="a", output_format="jpeg")))
    assert len(base64.b64decode(low["b64_image"])) < len(base64.b64decode(high["b64_image"]))


@pytest.mark.parametrize("body, field", [({"output_format": "gif"}, "output_format"),
                                         ({"output_compression": 50}, "output_compression"),
                                         ({"output_format": "webp", "output_compression": 101}, "output_compression")])
def test_a_bad_format_or_a_quality_for_png_names_the_field(body, field):
    with pytest.raises(ValidationError) as raised:
        ImageRequest(prompt="a fox", **body)
    assert raised.value.errors()[0]["loc"] == (field,)


def test_the_openai_route_takes_output_format_and_output_compression():
    request = to_image_request(OpenAIImageRequest(prompt="a fox", output_format="webp", output_compression=80))
    assert request.output_format == "webp" and request.output_compression == 80
    with pytest.raises(OpenAIError) as raised:
        to_image_request(OpenAIImageRequest(prompt="a fox", output_format="tiff"))
    assert raised.value.param == "output_format" and "'webp'" in str(raised.value)

import base64
import io

import numpy as np
from PIL import Image

from serve_app.services.media import encode_png_b64, read_png_meta

META = {
    "prompt": "a fox, detailed", "original_prompt": "a fox", "negative_prompt": "blurry", "seed": 42,
    "steps": 4, "guidance_scale": 0.0, "width": 32, "height": 16, "model": "flux-schnell",
}


def test_png_keeps_pixels_and_carries_parameters():
    pixels = np.random.default_rng(0).integers(0, 256, size=(16, 32, 3), dtype=np.uint8)
    data = base64.b64decode(encode_png_b64(pixels, META))
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG" and image.size == (32, 16)
        assert np.array_equal(np.asarray(image.convert("RGB")), pixels)
        parameters = image.text["parameters"]
    assert parameters.splitlines() == [
        "a fox, detailed",
        "Negative prompt: blurry",
        "Steps: 4, CFG scale: 0, Seed: 42, Size: 32x16, Model: flux-schnell",
    ]
    assert read_png_meta(data) == META


def test_no_negative_prompt_line_when_unused():
    data = base64.b64decode(encode_png_b64(np.zeros((8, 8, 3), np.uint8), {**META, "negative_prompt": None}))
    with Image.open(io.BytesIO(data)) as image:
        assert "Negative prompt" not in image.text["parameters"]

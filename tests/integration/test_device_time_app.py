"""Device busy time and output formats through real Serve, on the shared dev app: each model call of
a replica is busy time that `genserve bench` reads through a handle as utilization, and a request's
output_format (REST and OpenAI routes) is the file it gets back, its parameters inside."""

import base64
import io
import time

import pytest
from PIL import Image

from serve_app.services.media import read_image_meta

pytestmark = pytest.mark.integration


def _opened(b64: str) -> tuple[str, dict]:
    data = base64.b64decode(b64)
    with Image.open(io.BytesIO(data)) as image:
        return image.format, read_image_meta(data)


def test_model_calls_are_busy_time_and_each_output_format_is_that_file(dev_app):
    from serve_app import APP_NAME
    from serve_app.bench.device import read_device_times, utilization

    client = dev_app["client"]
    before = read_device_times(APP_NAME, "ToyGenerator")
    started = time.perf_counter()
    webp = client.post("/v1/images", json={"prompt": "a paper boat", "model": "toy", "seed": 1, "output_format": "webp",
                                           "output_compression": 70})
    jpeg = client.post("/v1/images/generations", json={"prompt": "a paper boat", "model": "toy", "seed": 2,
                                                       "output_format": "jpeg"})
    wall_s = time.perf_counter() - started
    after = read_device_times(APP_NAME, "ToyGenerator")
    assert webp.status_code == 200, webp.text
    assert jpeg.status_code == 200, jpeg.text

    (replica,) = after
    assert after[replica]["calls"] - before.get(replica, {}).get("calls", 0) == 2
    mean, each = utilization(before, after, wall_s)
    assert 0 < mean < 1 and each == {replica: mean}

    image = webp.json()["images"][0]
    assert image["output_format"] == "webp" and image["b64_png"] is None
    file_format, meta = _opened(image["b64_image"])
    assert file_format == "WEBP" and meta["seed"] == 1 and meta["model"] == "toy"
    body = jpeg.json()
    assert body["output_format"] == "jpeg"
    file_format, meta = _opened(body["data"][0]["b64_json"])
    assert file_format == "JPEG" and meta["seed"] == 2

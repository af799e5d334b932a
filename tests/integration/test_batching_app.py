"""Acceleration, warm-up and request batching through real Serve, on the shared dev app: what
GET /v1/models reports of each model's tier, batching and cold start, and concurrent requests to
the batching model (sdxl-turbo) that each get the image their seed gives alone."""

import base64
import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.integration

# tests/unit/test_batching.py: batched images are within 1 level of 255 of the same seed alone.
TOLERANCE = 1


def _models(client) -> dict:
    response = client.get("/v1/models")
    assert response.status_code == 200, response.text
    return {model["id"]: model for model in response.json()["models"]}


def _pixels(body: dict) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(body["images"][0]["b64_png"]))) as image:
        return np.asarray(image.convert("RGB")).astype(int)


def test_the_models_list_reports_each_models_tier_batching_warm_up_and_cold_start(dev_app):
    models = _models(dev_app["client"])
    schnell, turbo = models["flux-schnell"]["deployment"], models["sdxl-turbo"]["deployment"]
    assert schnell["acceleration"] == turbo["acceleration"] == {} and schnell["batching"] is None
    assert turbo["batching"] == {"enabled": True, "max_batch_images": 4, "wait_ms": 100.0}
    # sdxl-turbo generated its default shape once before the replica reported healthy; the dev
    # profile's own models start without a warm-up call.
    assert turbo["warmup_shapes"] == [{"width": 256, "height": 256, "steps": 2, "images": 1}]
    assert turbo["cold_start"]["load_s"] > 0 and turbo["cold_start"]["warmup_s"] > 0
    assert schnell["warmup_shapes"] == []


def test_concurrent_requests_to_a_batching_model_each_get_their_seeds_image(dev_app):
    client = dev_app["client"]
    bodies = [{"prompt": prompt, "model": "sdxl-turbo", "seed": seed, "num_inference_steps": 2}
              for prompt, seed in (("a lighthouse", 61), ("a red fox", 62), ("a bowl of ramen", 63), ("a kite", 64))]
    with ThreadPoolExecutor(len(bodies)) as pool:
        together = list(pool.map(lambda body: client.post("/v1/images", json=body), bodies))
    assert [response.status_code for response in together] == [200] * 4, [response.text for response in together]
    for body, response in zip(bodies, together):
        result = response.json()
        assert (result["model"], result["images"][0]["seed"]) == ("sdxl-turbo", body["seed"])
        alone = client.post("/v1/images", json=body)
        assert alone.status_code == 200, alone.text
        assert np.abs(_pixels(result) - _pixels(alone.json())).max() <= TOLERANCE

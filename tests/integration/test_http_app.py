"""The whole graph on real Ray Serve with tiny models loaded from saved folders (the real path)."""

import base64
import io
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from serve_app import APP_NAME
from serve_app.protocol.schemas import ImageRequest, ImageResponse
from serve_app.services.media import read_png_meta

pytestmark = pytest.mark.integration
ROOT = Path(__file__).parents[2]


@pytest.fixture
def app(folders_app):
    """Images only (no video models), models loaded from saved folders: the path a hub id or folder
    takes (the shared app of tests/integration/conftest.py, whose enhancer is the tiny LLM)."""
    return folders_app


def _post(app, **body):
    return app["client"].post("/v1/images", json={"prompt": "a lighthouse at dusk", **body})


def _png(b64: str) -> bytes:
    return base64.b64decode(b64)


def test_http_round_trip(app):
    response = _post(app, seed=42)
    assert response.status_code == 200, response.text
    body = ImageResponse.model_validate(response.json())
    assert body.model == "flux-schnell" and body.prompt == "a lighthouse at dusk"
    assert body.enhanced_prompt.startswith("a lighthouse at dusk, ") and body.enhancer == "template"
    assert (body.width, body.height, body.num_inference_steps) == (256, 256, 4)
    assert body.passed and len(body.images) == 1 and len(body.attempts) == 1
    image = body.images[0]
    assert image.seed == 42 and 0 <= image.scores.aesthetic <= 1 and 0 <= image.scores.alignment <= 100
    with Image.open(io.BytesIO(_png(image.b64_png))) as png:
        assert png.format == "PNG" and png.size == (256, 256)
        assert "Seed: 42, Size: 256x256, Model: flux-schnell" in png.text["parameters"]
    assert read_png_meta(_png(image.b64_png))["prompt"] == body.enhanced_prompt
    # turn: the wait for its turn in the fair queue, which the app's jobs config applies to sync requests.
    assert set(body.timings) == {"enhance", "turn", "generate", "score", "encode", "total", "device"}


def test_same_seed_gives_identical_png_bytes(app):
    first, second = _post(app, seed=7).json(), _post(app, seed=7).json()
    assert first["images"][0]["b64_png"] == second["images"][0]["b64_png"]
    other = _post(app, seed=8).json()
    assert other["images"][0]["b64_png"] != first["images"][0]["b64_png"]


def test_no_seed_means_a_random_one_returned(app):
    seeds = {_post(app).json()["images"][0]["seed"] for _ in range(3)}
    assert len(seeds) == 3


def test_several_images_get_consecutive_seeds(app):
    body = _post(app, seed=100, num_images=3, width=320, height=256).json()
    assert [image["seed"] for image in body["images"]] == [100, 101, 102]
    assert {(image["width"], image["height"]) for image in body["images"]} == {(320, 256)}
    pixels = [np.asarray(Image.open(io.BytesIO(_png(image["b64_png"])))) for image in body["images"]]
    assert pixels[0].shape == (256, 320, 3) and not np.array_equal(pixels[0], pixels[1])


def test_unreachable_threshold_runs_every_attempt_and_returns_the_best(app):
    # CLIPScore reaches 100 only for identical embeddings: no image can.
    body = _post(app, seed=5, quality_metric="alignment", quality_threshold=100, max_attempts=3).json()
    assert body["passed"] is False
    assert [a["attempt"] for a in body["attempts"]] == [1, 2, 3]
    assert [a["seed"] for a in body["attempts"]] == [5, 6, 7]
    best = max(body["attempts"], key=lambda a: a["scores"]["alignment"])
    assert body["images"][0]["seed"] == best["seed"]
    assert body["images"][0]["scores"] == best["scores"]


@pytest.mark.parametrize(
    "body, field, allowed",
    [
        ({"width": 100}, "width", "256-2048, a multiple of 16"),
        ({"num_inference_steps": 9}, "num_inference_steps", "1-4"),
        ({"prompt": ""}, "prompt", "1-2000 characters"),
        ({"num_images": 50}, "num_images", "1-4"),
        ({"style": "vaporwave"}, "style", "one of 'photorealistic'"),
        ({"model": "midjourney"}, "model", "one of 'flux-schnell'"),
        ({"guidance_scale": 3.5}, "guidance_scale", "0"),
        ({"quality_threshold": 3}, "quality_threshold", "0-1"),
        ({"sampler": "euler"}, "sampler", None),
    ],
)
def test_bad_input_is_422_naming_the_field(app, body, field, allowed):
    response = app["client"].post("/v1/images", json={"prompt": "a fox", **body})
    assert response.status_code == 422, response.text
    [error] = response.json()["detail"]
    assert error["loc"] == ["body", field]
    if allowed:
        assert error["allowed"].startswith(allowed)
    assert field in error["msg"]


def test_python_handle_round_trip_matches_http(app):
    from ray import serve

    handle = serve.get_app_handle(APP_NAME)
    response = handle.generate_images.remote(ImageRequest(prompt="a lighthouse at dusk", seed=42)).result()
    assert isinstance(response, ImageResponse)
    assert response.images[0].b64_png == _post(app, seed=42).json()["images"][0]["b64_png"]
    with pytest.raises(ValueError, match="num_inference_steps: flux-schnell takes 1-4 steps"):
        handle.generate_images.remote({"prompt": "a fox", "num_inference_steps": 9}).result()


def test_concurrent_requests_all_succeed_and_stay_reproducible(app):
    with ThreadPoolExecutor(max_workers=8) as pool:
        responses = list(pool.map(lambda seed: _post(app, seed=seed % 2), range(8)))
    assert [r.status_code for r in responses] == [200] * 8
    by_seed = {}
    for response in responses:
        image = response.json()["images"][0]
        by_seed.setdefault(image["seed"], set()).add(image["b64_png"])
    assert {seed: len(pngs) for seed, pngs in by_seed.items()} == {0: 1, 1: 1}


def test_videos_answer_501_when_no_video_model_is_configured(app):
    response = app["client"].post("/v1/videos", json={"prompt": "a fox"})
    assert response.status_code == 501 and "add a video_models entry" in response.json()["detail"]


def test_models_health_and_docs(app):
    client = app["client"]
    models = client.get("/v1/models").json()
    # dev.yaml serves a tiny SDXL and a tiny FLUX.2 [klein] too.
    assert [model["id"] for model in models["models"]] == ["flux-schnell", "sdxl", "flux2-klein"]
    flux = models["models"][0]
    assert flux["id"] == "flux-schnell" and (flux["min_steps"], flux["max_steps"]) == (1, 4)
    assert flux["deployment"]["source"] == app["sources"][0] and flux["deployment"]["device"] == "cpu"
    # The scorers' metrics, with their ranges, and each scorer's family and licence (dev.yaml: all three tiny).
    assert models["scores"] == {"alignment": [0, 100], "aesthetic": [0, 1], "laion": [1, 10], "hps": [0, 1],
                                "pickscore": [0, 100], "combined": [0, 1]}
    assert [(scorer["family"], scorer["metrics"]) for scorer in models["scorers"]] == [
        ("clip", ["alignment", "aesthetic", "laion"]), ("hps", ["hps"]), ("pickscore", ["pickscore"])]
    health = client.get("/healthz")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert health.json()["deployments"]["scorer"]["source"] == app["sources"][1]
    assert client.get("/docs").status_code == 200
    assert "/v1/images" in client.get("/openapi.json").json()["paths"]


def test_readme_python_example_runs(app):
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- tested: handle example -->\s*```python\n(.*?)```", readme, re.S)
    assert match, "README lost its tested handle example"
    namespace: dict = {}
    exec(compile(match.group(1), "README.md", "exec"), namespace)
    assert isinstance(namespace["response"], ImageResponse)
    assert namespace["response"].images[0].seed == 42

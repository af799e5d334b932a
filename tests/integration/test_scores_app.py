"""POST /v1/scores and the laion/combined quality gates on real Ray Serve with the dev profile's tiny models."""

import base64

import numpy as np
import pytest
from PIL import Image, ImageFilter

from serve_app import APP_NAME
from serve_app.protocol.schemas import MAX_SCORE_IMAGES, ImageResponse, ScoreRequest, ScoreResponse
from tests.helpers import flat_scores, image_b64

pytestmark = pytest.mark.integration


@pytest.fixture
def client(dev_app):
    """The shared dev app (uploads limited to 300x300 pixels)."""
    return dev_app["client"]


def _checkerboard(side: int = 96, cell: int = 6) -> np.ndarray:
    tiles = (np.indices((side, side)) // cell).sum(axis=0) % 2
    return np.repeat((tiles * 255).astype(np.uint8)[..., None], 3, axis=-1)


def _detail(response) -> dict:
    assert response.status_code == 422, response.text
    return response.json()["detail"][0]


def test_scores_every_image_with_every_score(client):
    board = _checkerboard()
    blurred = np.asarray(Image.fromarray(board).filter(ImageFilter.GaussianBlur(3)))
    dark = np.full((64, 120, 3), 15, np.uint8)
    grey, red = np.full((80, 80, 3), 128, np.uint8), np.full((80, 80, 3), (220, 30, 30), np.uint8)
    images = [image_b64(board), image_b64(blurred, "JPEG"), "data:image/png;base64," + image_b64(dark), image_b64(grey),
              image_b64(red)]
    response = client.post("/v1/scores", json={"prompt": "a chessboard", "images": images,
                                               "quality_metric": "laion", "quality_threshold": 1})
    assert response.status_code == 200, response.text
    body = ScoreResponse.model_validate(response.json())
    assert [(image.index, image.width, image.height) for image in body.images] == [
        (0, 96, 96), (1, 96, 96), (2, 120, 64), (3, 80, 80), (4, 80, 80)]
    assert all((image.scored_width, image.scored_height) == (image.width, image.height) for image in body.images), \
        "within the pixel budget, every image is scored as sent"
    assert body.quality_metric == "laion" and all(image.passed for image in body.images)
    # dev.yaml's scorers: clip (alignment, aesthetic, laion), hps and pickscore.
    assert body.ranges == {"alignment": (0, 100), "aesthetic": (0, 1), "laion": (1, 10), "hps": (0, 1),
                           "pickscore": (0, 100), "combined": (0, 1)}
    # dev.yaml's; hps and pickscore are not in combined unless weighted.
    assert body.quality_weights.model_dump() == {"aesthetic": 1, "alignment": 1, "laion": 1, "hps": 0, "pickscore": 0}
    laion = [image.scores.laion for image in body.images]
    assert body.best == laion.index(max(laion))
    for image in body.images:
        scores = image.scores
        assert 0 <= scores.aesthetic <= 1 and 0 <= scores.alignment <= 100 and 1 <= scores.laion <= 10
        assert 0 <= scores.combined <= 1 and 0 <= scores.aspects.composition <= 1
        assert 0 <= scores.hps <= 1 and 0 <= scores.pickscore <= 100
    perceptual = [image.scores.perceptual for image in body.images]
    assert perceptual[0].sharpness > perceptual[1].sharpness
    assert perceptual[2].brightness < perceptual[3].brightness
    assert perceptual[3].saturation < perceptual[4].saturation
    assert perceptual[3].contrast < perceptual[0].contrast
    assert set(body.timings) == {"decode", "score", "total"}


@pytest.mark.parametrize(
    "body, field, words",
    [
        ({"prompt": "", "images": ["x"]}, "prompt", "at least 1 character"),
        ({"prompt": "   ", "images": ["x"]}, "prompt", "non-whitespace"),
        ({"prompt": "x" * 2001, "images": ["x"]}, "prompt", "at most 2000 characters"),
        ({"prompt": "a fox", "images": []}, "images", "at least 1 item"),
        ({"prompt": "a fox", "images": ["x"] * (MAX_SCORE_IMAGES + 1)}, "images", "at most 16 items"),
        ({"prompt": "a fox", "images": ["x"], "quality_metric": "vibes"}, "quality_metric", "'laion'"),
        ({"prompt": "a fox", "images": ["x"], "quality_weights": {"sharpness": 1}}, "quality_weights.sharpness", "Extra"),
        ({"prompt": "a fox", "images": ["x"], "scorer": "pickscore"}, "scorer", "Extra"),
    ],
)
def test_schema_rejections_name_the_field(client, body, field, words):
    detail = _detail(client.post("/v1/scores", json=body))
    assert detail["msg"].startswith(f"{field}: ") and words in detail["msg"], detail


def test_bad_images_and_gates_name_the_field(client):
    good = image_b64(_checkerboard())
    cases = [
        ({"images": [good, "not base64!"]}, "images.1", "not valid base64"),
        ({"images": [good, base64.b64encode(b"GIF89a....").decode()]}, "images.1", "not a readable PNG or JPEG"),
        ({"images": [image_b64(np.zeros((400, 400, 3), np.uint8))]}, "images.0", "over the limit"),
        ({"images": [good], "quality_metric": "laion", "quality_threshold": 0.5}, "quality_threshold", "between 1 and 10"),
    ]
    for extra, field, words in cases:
        detail = _detail(client.post("/v1/scores", json={"prompt": "a fox", **extra}))
        # pydantic's loc form: "images.1" is ["body", "images", 1]
        loc = ["body", *(int(part) if part.isdigit() else part for part in field.split("."))]
        assert detail["loc"] == loc and detail["msg"].startswith(f"{field}: ") and words in detail["msg"], detail


def test_image_requests_gate_on_laion_and_combined(client):
    for metric, threshold in (("laion", 1.0), ("combined", 0.0)):
        response = client.post("/v1/images", json={"prompt": "a fox", "seed": 3, "quality_metric": metric,
                                                   "quality_threshold": threshold, "quality_weights": {"laion": 2, "aesthetic": 1}})
        assert response.status_code == 200, response.text
        body = ImageResponse.model_validate(response.json())
        scores = body.images[0].scores
        assert body.quality_metric == metric and body.passed and 1 <= scores.laion <= 10
        assert scores.combined == pytest.approx((2 * (scores.laion - 1) / 9 + scores.aesthetic) / 3, abs=1e-5)
        assert set(scores.aspects.model_dump()) == {"composition", "lighting", "colors", "sharpness", "style"}


def test_handle_api_scores_too(client):
    from ray import serve

    handle = serve.get_app_handle(APP_NAME)
    request = ScoreRequest(prompt="a fox", images=[image_b64(_checkerboard())] * 2)
    response = handle.score_images.remote(request).result()
    assert isinstance(response, ScoreResponse) and len(response.images) == 2
    first, second = (flat_scores(image.scores.model_dump()) for image in response.images)
    assert first == pytest.approx(second, abs=1e-5)


def test_over_the_pixel_budget_scaled_copies_are_scored_and_past_the_cap_it_is_a_422(client):
    """The shared app's scores budget: 65536 pixels scored, 360000 declared at most."""
    board = image_b64(_checkerboard(256, 8))
    response = client.post("/v1/scores", json={"prompt": "a chessboard", "images": [board, board]})
    assert response.status_code == 200, response.text
    body = ScoreResponse.model_validate(response.json())
    # One common factor, sqrt(65536 / 131072): 181 px a side (the tiny CLIP's input side is 32).
    assert [(image.width, image.scored_width, image.scored_height) for image in body.images] == [(256, 181, 181)] * 2
    first, second = (flat_scores(image.scores.model_dump()) for image in body.images)
    assert first == pytest.approx(second, abs=1e-4)
    big = image_b64(_checkerboard(300, 10))
    detail = _detail(client.post("/v1/scores", json={"prompt": "a chessboard", "images": [big] * 5}))
    assert detail["loc"] == ["body", "images"] and "450000 pixels in all" in detail["msg"]
    assert detail["allowed"] == "at most 360000 pixels in all"

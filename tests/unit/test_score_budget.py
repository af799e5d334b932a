"""POST /v1/scores pixel budgets: a hard cap on what a request's uploads declare (422 naming
`images`), and scoring a copy scaled down by one common factor past the soft budget, never
below the CLIP input size, decoding one upload at a time."""

import asyncio

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from pydantic import ValidationError

from deployments.config import ScorerConfig
from deployments.scoring.clip_scorer import ClipScorer
from serve_app.api.app import build_api
from serve_app.bench.score_budget import natural_image
from serve_app.config import AppArgs, ScoresConfig
from serve_app.protocol.errors import RequestError
from serve_app.services.inputs import load_image, open_image
from serve_app.services.scores import ScoreService, scales
from tests.fakes import fake_services
from tests.helpers import LOOPBACK, app_settings, image_b64


def _upload(width: int, height: int, fmt: str = "PNG", orientation: int | None = None, seed: int = 0) -> str:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    if orientation is None:
        return image_b64(pixels, fmt)
    exif = Image.Exif()
    exif[0x0112] = orientation
    return image_b64(pixels, fmt, exif=exif)


class SizeRecordingScorer:
    """Scores like the tiny CLIP would be asked to, recording the array sizes it gets; CLIP input 224."""

    def __init__(self):
        self.shapes: list[tuple[int, ...]] = []
        self.info_calls = 0

    def info(self):
        self.info_calls += 1
        return {"input_size": 224}

    def score(self, images, prompt, weights=None):
        self.shapes = [image.shape for image in images]
        return [{"aesthetic": 0.5, "alignment": 20.0, "combined": 0.4} for _ in images]


# The scorer computes aesthetic, alignment and combined (no LAION head), as SizeRecordingScorer answers.
NO_LAION = {"laion": {"enabled": False}}


def _service(scorer, **budget) -> ScoreService:
    return fake_services(app_settings(scorer=NO_LAION, scores=budget), scorer=scorer).scores


def _score(service, images):
    return asyncio.run(service.score({"prompt": "a lighthouse", "images": images}))


def test_one_common_factor_to_the_budget_never_below_the_clip_side_nor_up():
    assert scales([(1000, 1000), (500, 500)], budget=2_000_000, floor=224) == [1.0, 1.0]
    common = scales([(2000, 2000), (2000, 2000)], budget=2_000_000, floor=224)
    assert common[0] == common[1] == pytest.approx(0.5)
    small_kept = scales([(4000, 4000), (300, 300)], budget=1_000_000, floor=224)
    assert small_kept[0] == pytest.approx((1_000_000 / (16_000_000 + 90_000)) ** 0.5)
    assert small_kept[1] == pytest.approx(224 / 300), "never below CLIP's input side"
    assert scales([(4000, 200), (4000, 4000)], budget=100_000, floor=224)[0] == 1.0, "never scaled up"


def test_within_the_budget_every_image_is_scored_as_sent():
    scorer = SizeRecordingScorer()
    response = _score(_service(scorer, pixel_budget=65536 * 4), [_upload(256, 256), _upload(320, 192)])
    assert [(image.width, image.height, image.scored_width, image.scored_height) for image in response.images] == \
        [(256, 256, 256, 256), (320, 192, 320, 192)]
    assert scorer.shapes == [(256, 256, 3), (192, 320, 3)]
    assert scorer.info_calls == 0, "the CLIP side is asked only when something is scaled"


def test_over_the_budget_a_scaled_copy_is_scored_and_the_response_says_so():
    scorer = SizeRecordingScorer()
    service = _service(scorer, pixel_budget=65536 * 4)
    response = _score(service, [_upload(1024, 1024), _upload(1024, 512, fmt="JPEG"), _upload(400, 300),
                                _upload(2048, 1024, fmt="JPEG")])
    sizes = [(image.width, image.height, image.scored_width, image.scored_height) for image in response.images]
    factor = (65536 * 4 / (1024 * 1024 + 1024 * 512 + 400 * 300 + 2048 * 1024)) ** 0.5  # 0.26
    assert sizes[0] == (1024, 1024, round(1024 * factor), round(1024 * factor))
    assert sizes[1] == (1024, 512, 448, 224), "a JPEG (decoded at a DCT scale first) stops at CLIP's input side"
    assert sizes[2] == (400, 300, round(400 * 224 / 300), 224), "the small one stops at CLIP's input side"
    assert sizes[3] == (2048, 1024, round(2048 * factor), round(1024 * factor)), \
        "a JPEG decoded at a DCT scale, then brought to the common factor"
    assert scorer.shapes == [(height, width, 3) for _, _, width, height in sizes]
    _score(service, [_upload(1024, 1024)] * 2)
    assert scorer.info_calls == 1, "the scorer's input side is asked once per replica"


def test_a_quarter_turned_upload_is_reported_upright_and_scaled_upright():
    scorer = SizeRecordingScorer()
    response = _score(_service(scorer, pixel_budget=65536), [_upload(600, 400, fmt="JPEG", orientation=6)])
    image = response.images[0]
    assert (image.width, image.height) == (400, 600)
    assert (image.scored_width, image.scored_height) == (224, 336)
    assert scorer.shapes == [(336, 224, 3)]


def test_past_the_cap_is_a_422_naming_images_before_any_pixel_is_decoded(monkeypatch):
    import serve_app.services.scores as scores

    scorer = SizeRecordingScorer()
    decoded = []
    monkeypatch.setattr(scores, "load_image", lambda *args: decoded.append(args))
    service = _service(scorer, pixel_budget=65536, max_total_pixels=600 * 600)
    with pytest.raises(RequestError) as refused:
        _score(service, [_upload(500, 500), _upload(400, 400)])
    assert refused.value.field == "images"
    assert "410000 pixels in all" in refused.value.message and "scores.max_total_pixels" in refused.value.message
    assert refused.value.allowed == "at most 360000 pixels in all"
    assert decoded == [] and scorer.shapes == []


def test_the_cap_over_http_is_a_422_with_the_usual_body():
    settings = app_settings(scorer=NO_LAION, scores={"pixel_budget": 65536, "max_total_pixels": 65536 * 2})
    app = build_api()
    app.state.services = fake_services(settings, scorer=SizeRecordingScorer())
    client = TestClient(app, client=LOOPBACK)
    response = client.post("/v1/scores", json={"prompt": "a fox", "images": [_upload(300, 300), _upload(300, 300)]})
    assert response.status_code == 422, response.text
    detail = response.json()["detail"][0]
    assert detail["loc"] == ["body", "images"] and "scores.max_total_pixels" in detail["msg"]
    assert detail["allowed"] == "at most 131072 pixels in all"
    ok = client.post("/v1/scores", json={"prompt": "a fox", "images": [_upload(300, 300)]})
    assert ok.status_code == 200 and ok.json()["images"][0]["scored_width"] == 256


def test_the_budget_must_lie_within_the_cap():
    with pytest.raises(ValidationError, match="pixel_budget .* must not exceed max_total_pixels"):
        AppArgs.model_validate({"scores": {"pixel_budget": 2_000_000, "max_total_pixels": 1_000_000}})
    assert AppArgs().scores == ScoresConfig(pixel_budget=16 * 1024 * 1024, max_total_pixels=64 * 1024 * 1024)


def test_the_scorer_reports_its_clip_input_side():
    scorer = ClipScorer.func_or_class(ScorerConfig(source="tiny"), metrics=False)
    assert scorer.info()["input_size"] == scorer.input_size == 32  # the tiny CLIP; ViT-L/14 says 224


def test_what_a_scaled_copy_changes_is_what_the_docs_say():
    """docs/operations.md: CLIP's input moves by well under one 0-255 level on average, brightness
    not at all, contrast and saturation by a few hundredths, sharpness by a factor."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from deployments.scoring.perceptual import perceptual_scores

    processor = CLIPImageProcessorPil()  # ViT-L/14's: 224, bicubic, centre crop
    upload = image_b64(natural_image(896, seed=3))
    full = np.asarray(load_image(open_image(upload, "image", 2**24), "image", 2**24))
    copy = np.asarray(load_image(open_image(upload, "image", 2**24), "image", 2**24, 0.25))
    assert copy.shape == (224, 224, 3)
    inputs = [processor(images=[image], return_tensors="np").pixel_values[0] for image in (full, copy)]
    levels = np.abs(inputs[0] - inputs[1]) * np.asarray(processor.image_std)[:, None, None] * 255
    assert levels.mean() < 1.0
    before, after = perceptual_scores(full), perceptual_scores(copy)
    assert after["brightness"] == pytest.approx(before["brightness"], abs=0.002)
    assert after["contrast"] == pytest.approx(before["contrast"], abs=0.05)
    assert after["saturation"] == pytest.approx(before["saturation"], abs=0.05)
    assert not 0.9 < after["sharpness"] / before["sharpness"] < 1.1, "sharpness is the scored copy's"

"""ImageService: defaults, model-dependent checks and the response, over fake deployments."""

import asyncio
import base64
import contextlib

import pytest

from deployments.families import get_family
from serve_app.config import QualityPolicy
from serve_app.protocol.errors import RequestError
from serve_app.protocol.schemas import ImageRequest
from serve_app.services.images import ImageService
from serve_app.services.media import read_png_meta
from tests.fakes import FakeGenerator, FakeScorer, fake_services
from tests.helpers import app_settings, wait_until_async


def _service(policy: QualityPolicy | None = None) -> ImageService:
    return fake_services(app_settings(policy=policy or QualityPolicy())).images


@pytest.mark.parametrize(
    "fields, field, words",
    [
        ({"model": "sdxl"}, "model", "must be one of ['flux-schnell']"),
        ({"num_inference_steps": 9}, "num_inference_steps", "1-4 steps; got 9"),
        ({"guidance_scale": 3.5}, "guidance_scale", "must be 0; got 3.5"),
        ({"quality_threshold": 50}, "quality_threshold", "between 0 and 1"),
        ({"quality_metric": "aesthetic", "quality_threshold": 1.5}, "quality_threshold", "between 0 and 1; got 1.5"),
    ],
)
def test_model_dependent_checks_name_the_field(fields, field, words):
    with pytest.raises(RequestError) as caught:
        _service().plan(ImageRequest(prompt="a fox", **fields))
    assert caught.value.field == field and words in caught.value.message
    assert caught.value.detail()[0]["loc"] == ["body", field]


def test_plan_fills_defaults_from_model_and_policy():
    plan, spec, warnings = _service(QualityPolicy(metric="alignment", threshold=20, max_attempts=3)).plan(
        ImageRequest(prompt="a fox")
    )
    assert (plan.width, plan.height, plan.num_inference_steps, plan.guidance_scale) == (256, 256, 4, 0.0)
    assert (plan.metric, plan.threshold, plan.max_attempts) == ("alignment", 20, 3)
    assert 0 <= plan.base_seed <= 2**32 - 1
    assert warnings == []


def test_negative_prompt_on_flux_is_reported_unused():
    response = asyncio.run(_service().generate_images(ImageRequest(prompt="a fox", negative_prompt="dogs", seed=7)))
    assert response.negative_prompt is None
    assert any("negative_prompt is not used by flux-schnell" in warning for warning in response.warnings)


def test_response_carries_everything_needed_to_reproduce():
    request = {"prompt": "a fox", "seed": 7, "num_images": 2, "style": "anime", "width": 272, "height": 256}
    response = asyncio.run(_service().generate_images(request))
    assert response.model == "flux-schnell" and response.prompt == "a fox"
    assert response.enhanced_prompt == "a fox, enhanced" and response.style == "anime"
    assert [image.seed for image in response.images] == [7, 8]
    assert [attempt.seed for attempt in response.attempts] == [7, 8]
    assert set(response.timings) == {"enhance", "generate", "score", "encode", "total", "device"}
    meta = read_png_meta(base64.b64decode(response.images[1].b64_png))
    assert meta == {
        "prompt": "a fox, enhanced", "original_prompt": "a fox", "negative_prompt": None, "seed": 8, "generator": "cpu", "steps": 4,
        "guidance_scale": 0.0, "width": 272, "height": 256, "model": "flux-schnell", "loras": [],
    }


def test_images_start_encoding_while_scored_and_best_of_encodes_only_what_it_returns(monkeypatch):
    from serve_app.services import images as module

    encoded, scored = [], []

    class Scorer(FakeScorer):
        async def score(self, images, prompt, weights=None):
            # Stands for the scorer's device time, which the encoding overlaps: it answers once every
            # image has started encoding (or after 5 s, when none would without it).
            with contextlib.suppress(TimeoutError):
                await wait_until_async(lambda: len(encoded) >= len(images.images), timeout_s=5.0)
            scored.append(len(encoded))
            return await super().score(images, prompt, weights)

    def counting(image, meta, **encoding):
        encoded.append(meta["seed"])
        return module.encode_image_b64.__wrapped__(image, meta, **encoding)

    counting.__wrapped__ = module.encode_image_b64
    monkeypatch.setattr(module, "encode_image_b64", counting)
    service = fake_services(app_settings(policy=QualityPolicy()), scorer=Scorer()).images
    response = asyncio.run(service.generate_images({"prompt": "a fox", "seed": 7, "num_images": 2}))
    assert scored == [2] and sorted(encoded) == [7, 8]  # both were encoded before the scores came back
    assert read_png_meta(base64.b64decode(response.images[1].b64_png))["seed"] == 8
    encoded.clear()
    service = fake_services(app_settings(policy=QualityPolicy())).images
    response = asyncio.run(service.generate_images({"prompt": "a fox", "seed": 7, "candidates": 3}))
    assert encoded == [response.images[0].seed] and len(response.candidates) == 3  # after scoring, the chosen one


def test_blocklisted_prompt_is_refused_with_400_before_anything_runs():
    from serve_app.protocol.errors import PromptBlocked

    generator = FakeGenerator()
    service = fake_services(app_settings(enhancer={"blocklist": ["gore"]}), generator=generator).images
    with pytest.raises(PromptBlocked) as caught:
        asyncio.run(service.generate_images(ImageRequest(prompt="a battlefield full of Gore")))
    assert caught.value.status == 400 and caught.value.field == "prompt" and "gore" in caught.value.message
    assert caught.value.detail()[0]["type"] == "blocked"
    assert generator.calls == []
    with pytest.raises(PromptBlocked):
        asyncio.run(service.enhance_prompt({"prompt": "gore"}))


def test_every_response_carries_prompt_advice():
    response = asyncio.run(_service().generate_images(ImageRequest(prompt="nice thing", seed=1)))
    assert [issue.code for issue in response.prompt_advice.issues] == ["too_short", "vague_words"]
    assert response.prompt_advice.score == 50 and response.enhancer_fallback is None


def test_enhance_prompt_alone():
    from serve_app.protocol.schemas import EnhanceRequest

    response = asyncio.run(_service().enhance_prompt(EnhanceRequest(prompt="a fox in the snow", style="anime")))
    assert response.enhanced_prompt == "a fox in the snow, enhanced" and response.enhancer == "template"
    assert response.negative_prompt is None  # FLUX uses none
    assert response.model == "flux-schnell" and response.prompt_advice.score == 100
    with pytest.raises(RequestError, match="model"):
        asyncio.run(_service().enhance_prompt({"prompt": "a fox", "model": "nope"}))


def test_revise_prompt_comes_from_config_unless_the_request_says():
    assert _service().plan(ImageRequest(prompt="a fox"))[0].revise_prompt is False
    assert _service(QualityPolicy(revise_prompt=True)).plan(ImageRequest(prompt="a fox"))[0].revise_prompt is True
    plan = _service(QualityPolicy(revise_prompt=True)).plan(ImageRequest(prompt="a fox", revise_prompt=False))[0]
    flux = get_family("flux")
    assert plan.revise_prompt is False and plan.target.instructions == flux.prompt_form.instructions
    assert [tokenizer.max_tokens for tokenizer in plan.target.tokenizers] == [77]  # CLIP's, which the enhancer fits


def test_combined_gate_passes_its_weights_to_the_scorer_and_the_response():
    scorer = FakeScorer()
    service = fake_services(scorer=scorer).images
    # Seed 200 paints grey 200/255: laion = 1 + 9 * 200/255, so laion-only combined = 200/255.
    request = {"prompt": "a fox", "seed": 200, "quality_metric": "combined", "quality_threshold": 0.7,
               "quality_weights": {"laion": 1}}
    response = asyncio.run(service.generate_images(request))
    assert scorer.weights[0].model_dump() == {"aesthetic": 0, "alignment": 0, "laion": 1, "hps": 0, "pickscore": 0}
    assert response.quality_metric == "combined" and response.quality_weights.laion == 1
    scores = response.images[0].scores
    assert scores.combined == pytest.approx(200 / 255) and response.passed
    assert scores.laion == pytest.approx(1 + 9 * 200 / 255) and scores.aspects.lighting == pytest.approx(200 / 255)


def test_laion_gate_regenerates_until_the_threshold():
    # Seeds 10, 11 paint greys 10, 11: laion 1.35 and 1.39; threshold 1.37 passes the second only.
    response = asyncio.run(_service().generate_images(
        {"prompt": "a fox", "seed": 10, "quality_metric": "laion", "quality_threshold": 1.37, "max_attempts": 2}))
    assert [a.passed for a in response.attempts] == [False, True] and response.images[0].seed == 11
    # Without an explicit choice the weights are equal over aesthetic, alignment and laion (where computed).
    assert response.quality_weights.model_dump() == {"aesthetic": 1, "alignment": 1, "laion": 1, "hps": 0,
                                                     "pickscore": 0}


def test_laion_gate_is_refused_when_the_head_is_off():
    # The LAION head off: the scorer computes alignment, aesthetic and combined only.
    service = fake_services(app_settings(scorer={"laion": {"enabled": False}})).images
    with pytest.raises(RequestError) as caught:
        service.plan(ImageRequest(prompt="a fox", quality_metric="laion"))
    assert caught.value.field == "quality_metric" and "'laion' is not computed" in caught.value.message

"""The enhanced prompt fits the target's text encoders (deployments/enhancer/fit.py): the enhancer
counts with the model's own tokenizers, keeps the user's words first and whole, leaves out its own
additions that CLIP would cut, and says what it left out."""

import asyncio
import logging

import pytest

from deployments.enhancer.fit import TokenBudget, fit_terms, trim_clauses
from deployments.enhancer.prompt_enhancer import PromptEnhancer, template_enhance, template_revise
from deployments.families import get_family
from deployments.runtime.tiny import tiny_clip_tokenizer
from serve_app.config import app_args_from_config

TRUNCATED = "truncated because CLIP can only handle sequences up to 77 tokens"


def _tokens(text: str) -> int:
    return len(tiny_clip_tokenizer()(text)["input_ids"])


def _dev():
    return app_args_from_config("configs/dev.yaml")


def _fits(model_id: str = "flux-schnell"):
    entry = _dev().image_model(model_id)
    return TokenBudget().fits_for(get_family(entry.family).prompt_form_of(entry))


def test_template_keeps_the_users_words_and_drops_what_would_be_cut():
    fits = _fits()
    result = template_enhance("a lighthouse at dusk", "cinematic", "high", fits=fits)
    assert result.prompt.startswith("a lighthouse at dusk, cinematic lighting")
    assert _tokens(result.prompt) <= 77 and _tokens(result.negative_prompt) <= 77
    assert "best quality" in result.dropped and "negative: watermark" in result.dropped
    # Unbounded (a target with no tokenizers), nothing is dropped: the old behaviour.
    assert template_enhance("a lighthouse at dusk", "cinematic", "high").dropped == ()
    # The user's own words are never cut, even when they alone are too long: only additions go.
    long = "a " + "very " * 30 + "long prompt"
    result = template_enhance(long, "anime", "high", negative_prompt="dogs", fits=fits)
    assert result.prompt == long and result.negative_prompt == "dogs"
    assert result.dropped == ("anime style", "manga illustration", "cel shading", "detailed anime art",
                              "highly detailed", "best quality")


def test_revision_and_llm_answers_fit_too():
    fits = _fits()
    first = template_enhance("a red fox", "photorealistic", "high", fits=fits)
    revised = template_revise(first, ["lighting", "alignment"], "a red fox", fits)
    assert revised.prompt.startswith("a red fox") or revised.prompt.startswith("clearly showing a red fox")
    assert _tokens(revised.prompt) <= 77 and revised.dropped
    answer = "A red fox in fresh snow, low winter sun behind it, breath steaming, shallow depth of field, " \
             "photographed on a long lens at golden hour."
    head, cut = trim_clauses(answer, fits)
    assert answer.startswith(head) and _tokens(head) <= 77 and cut == ["photographed on a long lens at golden hour."]
    assert trim_clauses("x" * 200, fits) is None  # not even a first clause fits: the template answers
    assert fit_terms(["a"], ["b", "c"], None) == ("a, b, c", [])


def test_the_enhancer_deployment_counts_with_the_targets_tokenizers():
    args = _dev()
    enhancer = PromptEnhancer.func_or_class(args.enhancer, metrics=False)
    entry = args.image_model("sdxl")
    target = get_family("sdxl").prompt_form_of(entry)
    assert [(t.subfolder, t.max_tokens, t.source) for t in target.tokenizers] == [
        ("tokenizer", 77, "tiny"), ("tokenizer_2", 77, "tiny")]
    result = asyncio.run(enhancer.enhance("a lighthouse at dusk", "cinematic", "high", target=target))
    assert _tokens(result.prompt) <= 77 and result.dropped


@pytest.fixture
def diffusers_log():
    """diffusers' own log records (its library logger does not propagate to the root)."""
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("diffusers")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


def test_a_dev_profile_request_logs_no_clip_truncation(diffusers_log):
    from deployments.image_generator import ImageGenerator
    from deployments.scoring.clip_scorer import ClipScorer
    from serve_app.services.facade import Services
    from serve_app.services.settings import Handles, Settings

    args = _dev()
    # No ControlNets: what is checked is the text encoders' input (they are tiny SDXL's own CLIPs).
    models = [args.image_model("flux-schnell"), args.image_model("sdxl").model_copy(update={"options": {}})]
    settings = Settings.from_args(args.model_copy(update={"image_models": models}))
    generators = {model.id: ImageGenerator.func_or_class(model, metrics=False) for model in models}
    handles = Handles.local(PromptEnhancer.func_or_class(args.enhancer, metrics=False), generators,
                            ClipScorer.func_or_class(args.scoring_config(), metrics=False))
    service = Services.build(settings, handles, ingress=False).images
    body = {"prompt": "a lighthouse at dusk", "style": "cinematic", "width": 256, "height": 256,
            "num_inference_steps": 1}
    # The unfitted template prompt does get cut: the log capture sees it.
    raw = template_enhance(body["prompt"], "cinematic", "high")
    asyncio.run(generators["sdxl"].generate(_params(), raw))
    assert any(TRUNCATED in record.getMessage() for record in diffusers_log)
    diffusers_log.clear()
    for model in ("flux-schnell", "sdxl"):
        response = asyncio.run(service.generate_images({**body, "model": model}))
        assert response.enhanced_prompt.startswith("a lighthouse at dusk, ") and "best quality" in response.enhancer_dropped
        assert any(term.startswith("negative: ") for term in response.enhancer_dropped) == (model == "sdxl")
    assert not [record.getMessage() for record in diffusers_log if TRUNCATED in record.getMessage()]


def _params():
    from deployments.runtime.types import GenerationParams

    return GenerationParams(seeds=[1], width=256, height=256, num_inference_steps=1, guidance_scale=5.0)


def test_a_simulated_entry_has_no_tokenizers_to_load_so_its_prompt_is_not_fitted():
    # configs/sim-h200.yaml's FLUX entry names a hub source whose files a simulated model never has:
    # loading its tokenizer failed every enhanced request with a 500 (found by genserve bench on it).
    args = app_args_from_config("configs/sim-h200.yaml")
    entry = args.image_model("flux-schnell")
    target = get_family(entry.family).prompt_form_of(entry)
    assert target is not None and target.tokenizers == () and target.instructions
    assert TokenBudget().fits_for(target) is None

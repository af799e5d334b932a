"""The generate -> score -> regenerate policy over fake deployments, without Ray."""

import asyncio

import pytest

from serve_app.protocol.schemas import MAX_SEED
from serve_app.services.graph import ImagePlan, StageTimeout, run_image_graph
from serve_app.services.local import LocalHandle
from tests.fakes import FakeEnhancer, FakeGenerator, FakeScorer


def _plan(**overrides) -> ImagePlan:
    fields = dict(
        prompt="a fox", negative_prompt=None, style=None, quality="high", enhance=True, use_negative_prompt=False,
        width=16, height=16, num_inference_steps=4, guidance_scale=0.0, base_seed=100, num_images=1,
        metric="aesthetic", threshold=0.0, max_attempts=1,
    )
    fields.update(overrides)
    return ImagePlan(**fields)


def _run(plan, enhancer=None, generator=None, scorer=None, timeout_s=10.0):
    enhancer, generator, scorer = enhancer or FakeEnhancer(), generator or FakeGenerator(), scorer or FakeScorer()
    result = asyncio.run(
        run_image_graph(plan, LocalHandle(enhancer), LocalHandle(generator), LocalHandle(scorer), timeout_s)
    )
    return result, enhancer, generator, scorer


def test_first_attempt_passing_stops():
    result, _, generator, scorer = _run(_plan(threshold=0.1, max_attempts=5))  # seed 100 -> 100/255
    assert len(generator.calls) == 1 and result.passed
    assert [c.seed for c in result.chosen] == [100]
    assert scorer.received == ["GenerationOutput"]  # the generator's response went straight on


def test_unreachable_threshold_runs_every_attempt_and_returns_the_best():
    # seeds 100, 101, 102: greys rise, so the last attempt scores best.
    result, _, generator, _ = _run(_plan(threshold=0.99, max_attempts=3))
    assert len(generator.calls) == 3 and not result.passed
    assert [c.seed for c in result.candidates] == [100, 101, 102]
    assert [c.attempt for c in result.candidates] == [1, 2, 3]
    assert [c.seed for c in result.chosen] == [102]
    assert not any(c.passed for c in result.candidates)


def test_later_attempts_only_regenerate_the_missing_images():
    # Seeds 254 and 255 pass (grey >= 254), 0 and 1 do not (grey wraps at 256).
    plan = _plan(base_seed=254, num_images=4, threshold=254 / 255, max_attempts=3)
    result, _, generator, _ = _run(plan)
    assert [len(params.seeds) for params, _ in generator.calls] == [4, 2, 2]
    assert [c.seed for c in result.candidates] == [254, 255, 256, 257, 258, 259, 260, 261]
    assert [c.seed for c in result.chosen] == [254, 255, 261, 260]  # passing first, then best failing
    assert not result.passed


def test_seeds_wrap_at_the_top_of_the_range():
    result, _, generator, _ = _run(_plan(base_seed=MAX_SEED, num_images=2))
    assert generator.calls[0][0].seeds == [MAX_SEED, 0]


def test_same_plan_replays_the_same_seeds():
    plan = _plan(threshold=0.99, max_attempts=3, num_images=2)
    first, *_ = _run(plan)
    second, *_ = _run(plan)
    assert [c.seed for c in first.candidates] == [c.seed for c in second.candidates]


def test_enhanced_prompt_reaches_the_generator_and_the_scorer_gets_the_original():
    result, enhancer, generator, _ = _run(_plan(style="anime", negative_prompt="dogs", use_negative_prompt=True))
    assert enhancer.calls == [("a fox", "anime", "high", "dogs")]
    assert generator.calls[0][1].prompt == "a fox, enhanced"
    assert result.candidates[0].prompt == "a fox, enhanced"
    assert result.negative_prompt == "dogs"


def test_enhance_off_sends_the_prompt_as_given():
    result, enhancer, generator, _ = _run(_plan(enhance=False, negative_prompt="dogs"))
    assert enhancer.calls == []
    assert generator.calls[0][1].prompt == "a fox"
    assert result.enhanced.enhancer == "none"
    assert result.negative_prompt is None  # the plan's model uses no negative prompt


def test_a_stage_past_its_timeout_raises_naming_the_stage():
    class SlowGenerator(FakeGenerator):
        async def generate(self, params, prompt):
            await asyncio.Event().wait()

    with pytest.raises(StageTimeout, match="generate stage"):
        _run(_plan(), generator=SlowGenerator(), timeout_s=0.2)


def test_revise_prompt_rewrites_for_the_weakest_aspects_before_each_later_round():
    # Seeds 100, 101, 102 all fail a 0.99 threshold; lighting (grey / 255) and composition (0.5) score lowest.
    plan = _plan(threshold=0.99, max_attempts=3, revise_prompt=True)
    fixed = {"composition": 0.5, "colors": 0.6, "sharpness": 0.7, "style": 0.9}  # lighting stays grey / 255
    result, enhancer, generator, _ = _run(plan, scorer=FakeScorer(fixed_aspects=fixed))
    prompts = [prompt.prompt for _, prompt in generator.calls]
    assert prompts == [
        "a fox, enhanced",
        "a fox, enhanced, fixing lighting+composition",
        "a fox, enhanced, fixing lighting+composition, fixing lighting+composition",
    ]
    assert [c.prompt for c in result.candidates] == prompts
    assert [call[0] for call in enhancer.calls] == ["a fox", "revise", "revise"]


def test_revise_without_aspect_scores_names_the_gate_metric():
    _, enhancer, _, _ = _run(_plan(threshold=99, max_attempts=2, revise_prompt=True, metric="alignment"),
                             scorer=FakeScorer(aspects=False))
    assert enhancer.calls[-1] == ("revise", "a fox", "a fox, enhanced", ("alignment",))


def test_without_revise_prompt_every_round_uses_the_same_prompt():
    result, enhancer, generator, _ = _run(_plan(threshold=0.99, max_attempts=3))
    assert {prompt.prompt for _, prompt in generator.calls} == {"a fox, enhanced"}
    assert len(enhancer.calls) == 1


def test_a_passing_first_round_is_never_revised():
    _, enhancer, generator, _ = _run(_plan(threshold=0.1, max_attempts=3, revise_prompt=True))
    assert len(generator.calls) == 1 and len(enhancer.calls) == 1


def test_enhancer_is_told_the_target_model_familys_prompt_form():
    from deployments.families import get_family

    form = get_family("sdxl").prompt_form
    _, enhancer, _, _ = _run(_plan(target=form))
    assert enhancer.calls == [("a fox", None, "high", None)] and enhancer.targets == [form]

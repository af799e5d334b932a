"""Admission control: past what a model's deployment holds for one caller, a request is turned away
before any work is done (no plan, no enhancer, no model call)."""

import asyncio

import pytest

from serve_app.protocol.schemas import ImageRequest
from serve_app.services.admission import Admission
from serve_app.services.graph import Overloaded
from serve_app.services.settings import admission_limits
from tests.fakes import FakeEnhancer, FakeGenerator, fake_services
from tests.helpers import app_settings, model_entry


def test_the_limit_is_what_the_deployment_holds_for_one_caller_and_only_where_its_queue_is_bounded():
    from serve_app.config import AppArgs

    bounded = model_entry(deployment={"num_replicas": 2, "max_ongoing_requests": 3, "max_queued_requests": 5,
                                      "retry_after_s": 2})
    unbounded = model_entry("sdxl", "sdxl")
    limits = admission_limits(AppArgs.model_validate({"image_models": [bounded, unbounded], "metrics": False}))
    assert limits == {"flux-schnell": (2 * 3 + 5, 2.0)}


def test_a_request_past_the_limit_is_turned_away_and_its_place_comes_back():
    admission = Admission({"m": (1, 3.0)})
    with admission.admitted("m"):
        with pytest.raises(Overloaded) as turned_away, admission.admitted("m"):
            pass
        with admission.admitted("other"):  # no limit: never checked
            pass
    assert turned_away.value.status == 503 and turned_away.value.retry_after_s == 3.0
    with admission.admitted("m"):
        assert admission.in_flight("m") == 1
    assert admission.in_flight("m") == 0


def test_a_full_model_turns_the_request_away_before_the_enhancer_or_the_model():
    entry = model_entry(deployment={"max_ongoing_requests": 1, "max_queued_requests": 0})
    enhancer, generator = FakeEnhancer(), FakeGenerator()
    images = fake_services(app_settings(entry), enhancer=enhancer, generator=generator).images

    async def two_at_once():
        with images.admission.admitted("flux-schnell"):  # the one place, taken
            with pytest.raises(Overloaded):
                await images.generate_images(ImageRequest(prompt="a fox", seed=1))
        return await images.generate_images(ImageRequest(prompt="a fox", seed=1))

    response = asyncio.run(two_at_once())
    assert len(enhancer.calls) == 1 and len(generator.calls) == 1 and response.images[0].seed == 1

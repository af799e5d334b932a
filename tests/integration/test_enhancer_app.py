"""The LLM enhancer on real Ray Serve: the tiny random LLM (loaded from a saved folder, the real
path) runs for every request; its gibberish falls back to the template, and responses say so."""

import pytest

from serve_app import APP_NAME
from serve_app.protocol.schemas import EnhanceRequest, EnhanceResponse, ImageResponse

pytestmark = pytest.mark.integration
FALLBACK_REASONS = {"empty", "not_text", "off_topic"}


@pytest.fixture
def client(folders_app):
    """The shared app of models from folders, with the LLM enhancer (tests/integration/conftest.py)."""
    return folders_app["client"]


def test_enhance_endpoint_runs_the_llm_and_reports_the_fallback(client):
    response = client.post("/v1/prompts/enhance", json={"prompt": "a nice lighthouse at dusk", "style": "cinematic"})
    assert response.status_code == 200, response.text
    body = EnhanceResponse.model_validate(response.json())
    assert body.enhancer == "template" and body.enhancer_fallback.split(":")[0] in FALLBACK_REASONS
    assert body.enhanced_prompt.startswith("a nice lighthouse at dusk, cinematic lighting")
    assert body.negative_prompt is None and body.model == "flux-schnell"  # FLUX uses no negative prompt
    assert [issue.code for issue in body.prompt_advice.issues] == ["vague_words"]
    assert body.seconds > 0


def test_image_request_survives_the_failing_llm(client):
    response = client.post("/v1/images", json={"prompt": "a lighthouse at dusk", "seed": 5})
    assert response.status_code == 200, response.text
    body = ImageResponse.model_validate(response.json())
    assert body.enhancer == "template" and body.enhancer_fallback.split(":")[0] in FALLBACK_REASONS
    assert body.prompt_advice.score == 100 and body.images


def test_regenerate_with_feedback_revises_the_prompt(client):
    # No tiny image reaches aesthetic 1.0, so both rounds run; the second uses a revised prompt.
    # Style none: a style's terms take 72 of the tiny CLIP tokenizer's 77 tokens, and what does not fit
    # is left out (tests/unit/test_prompt_fit.py), so the revision's fixes need the room.
    response = client.post("/v1/images", json={
        "prompt": "a lighthouse at dusk", "seed": 5, "max_attempts": 2, "quality_threshold": 1.0,
        "revise_prompt": True, "style": "none",
    })
    assert response.status_code == 200, response.text
    first, second = ImageResponse.model_validate(response.json()).attempts
    assert second.prompt.startswith(first.prompt) and len(second.prompt) > len(first.prompt)


@pytest.mark.parametrize("body, field", [
    ({"prompt": "   "}, "prompt"),
    ({"prompt": "x" * 2001}, "prompt"),
    ({"prompt": "a fox", "style": "baroque"}, "style"),
    ({"prompt": "a fox", "model": "nope"}, "model"),
    ({"prompt": "a fox", "temperature": 1}, "temperature"),
])
def test_enhance_endpoint_422_names_the_field(client, body, field):
    response = client.post("/v1/prompts/enhance", json=body)
    assert response.status_code == 422, response.text
    assert [item["loc"][-1] for item in response.json()["detail"]] == [field]


@pytest.mark.parametrize("path", ["/v1/prompts/enhance", "/v1/images"])
def test_blocklisted_prompt_gets_400_naming_the_field(client, path):
    response = client.post(path, json={"prompt": "a Nude  Figure study in charcoal"})
    assert response.status_code == 400, response.text
    [detail] = response.json()["detail"]
    assert detail["loc"] == ["body", "prompt"] and detail["type"] == "blocked" and "nude figure" in detail["msg"]


def test_handle_api_and_health(client):
    from ray import serve

    handle = serve.get_app_handle(APP_NAME)
    result = handle.enhance_prompt.remote(EnhanceRequest(prompt="a paper boat on a pond")).result(timeout_s=120)
    assert result.enhancer == "template" and result.enhancer_fallback
    health = client.get("/healthz").json()
    assert health["deployments"]["enhancer"]["llm"]["backend"] == "transformers"

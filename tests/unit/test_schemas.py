import pytest
from pydantic import ValidationError

from serve_app.protocol.errors import allowed_values, explain_errors
from serve_app.protocol.schemas import ImageRequest


def _error(**fields) -> dict:
    with pytest.raises(ValidationError) as caught:
        ImageRequest(**{"prompt": "a fox", **fields})
    errors = caught.value.errors()
    assert len(errors) == 1, errors
    return errors[0]


def test_defaults_leave_model_dependent_fields_unset():
    request = ImageRequest(prompt="a fox")
    assert request.model is None  # the config's default model, resolved by the service
    assert request.enhance is True
    assert request.num_images == 1
    assert request.width is None and request.num_inference_steps is None and request.seed is None


@pytest.mark.parametrize(
    "fields, field, words",
    [
        ({"width": 100}, "width", "multiple of 16"),
        ({"width": 128}, "width", "greater than or equal to 256"),
        ({"width": 4096}, "width", "less than or equal to 2048"),
        ({"height": 500}, "height", "multiple of 16"),
        ({"num_inference_steps": 0}, "num_inference_steps", "greater than or equal to 1"),
        ({"num_images": 50}, "num_images", "less than or equal to 4"),
        ({"seed": -1}, "seed", "greater than or equal to 0"),
        ({"seed": 2**32}, "seed", "less than or equal to 4294967295"),
        ({"style": "vaporwave"}, "style", "'photorealistic'"),
        ({"max_attempts": 6}, "max_attempts", "less than or equal to 5"),
        ({"quality_metric": "vibes"}, "quality_metric", "'aesthetic'"),
        ({"prompt": ""}, "prompt", "at least 1 character"),
        ({"prompt": "   "}, "prompt", "non-whitespace"),
        ({"prompt": "x" * 2001}, "prompt", "at most 2000 characters"),
        ({"sampler": "euler"}, "sampler", "Extra inputs are not permitted"),
    ],
)
def test_bad_fields_are_named_with_their_bounds(fields, field, words):
    error = _error(**fields)
    assert error["loc"][0] == field
    assert words in error["msg"]


@pytest.mark.parametrize(
    "field, allowed",
    [
        ("width", "256-2048, a multiple of 16"),
        ("num_images", "1-4"),
        ("seed", "0-4294967295"),
        ("prompt", "1-2000 characters"),
        ("style", "one of 'photorealistic', 'artistic', 'cinematic', 'anime', 'none'"),
        ("enhance", None),
    ],
)
def test_allowed_values_come_from_the_schema(field, allowed):
    assert allowed_values(ImageRequest, field) == allowed


def test_explained_errors_name_field_and_range():
    with pytest.raises(ValidationError) as caught:
        ImageRequest(prompt="a fox", width=100)
    errors = [{**error, "loc": ("body", *error["loc"])} for error in caught.value.errors()]
    [explained] = explain_errors(errors, ImageRequest)
    assert explained["allowed"] == "256-2048, a multiple of 16"
    assert explained["msg"] == "width: Input should be a multiple of 16 (allowed: 256-2048, a multiple of 16)"

import pytest

from deployments.enhancer.prompt_enhancer import NEGATIVE_PRESETS, STYLES, template_enhance


@pytest.mark.parametrize("style", sorted(STYLES))
def test_subject_first_then_style_terms(style):
    result = template_enhance("a red fox in snow", style, "high")
    assert result.prompt.startswith("a red fox in snow")
    for term in STYLES[style]:
        assert term in result.prompt
    assert result.negative_prompt == NEGATIVE_PRESETS[style]
    assert result.enhancer == "template" and result.style == style


def test_terms_already_in_the_prompt_are_not_repeated():
    result = template_enhance("Cinematic Lighting on a rainy street", "cinematic", "none")
    assert result.prompt.lower().count("cinematic lighting") == 1


def test_user_negative_prompt_wins_over_the_preset():
    assert template_enhance("a fox", "anime", "high", negative_prompt="dogs").negative_prompt == "dogs"


def test_style_none_and_quality_none_keep_the_prompt():
    assert template_enhance("  a fox,  ", "none", "none").prompt == "a fox"


def test_unknown_style_or_quality_is_an_error():
    with pytest.raises(ValueError, match="style must be one of"):
        template_enhance("a fox", "vaporwave", "high")
    with pytest.raises(ValueError, match="quality must be one of"):
        template_enhance("a fox", "anime", "ultra")

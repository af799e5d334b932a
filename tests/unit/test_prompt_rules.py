"""Prompt validation advice, the blocklist, and the guardrails on LLM answers."""

import pytest

from deployments.enhancer.prompt_rules import (
    blocked_terms,
    check_llm_prompt,
    clean_llm_output,
    subject_words,
    validate_prompt,
)


def _codes(prompt: str) -> list[str]:
    return [issue.code for issue in validate_prompt(prompt).issues]


def test_a_specific_prompt_has_no_issues():
    advice = validate_prompt("a red fox sitting in fresh snow under pine trees, soft morning light")
    assert advice.issues == [] and advice.score == 100


def test_too_short():
    assert _codes("fox") == ["too_short"]
    assert validate_prompt("fox").score == 70


def test_too_long():
    prompt = "a fox in " + " ".join(f"place{chr(97 + index % 26)}{chr(97 + index // 26)}" for index in range(70))
    assert _codes(prompt) == ["too_long"]


def test_vague_words_are_named():
    advice = validate_prompt("a nice picture of a beautiful thing in the forest")
    issue = next(issue for issue in advice.issues if issue.code == "vague_words")
    assert "beautiful" in issue.message and "nice" in issue.message and "thing" in issue.message
    assert advice.score == 70


@pytest.mark.parametrize("prompt, words", [
    ("a city street at night on a sunny day", ("sunny", "night")),
    ("an indoor garden, outdoors under the sky", ("indoor", "outdoors")),
    ("a black and white photo, vibrant and colorful", ("black-and-white", "colorful")),
    ("a snowy winter beach in summer", ("summer", "winter")),
])
def test_contradictions(prompt, words):
    advice = validate_prompt(prompt)
    issue = next(issue for issue in advice.issues if issue.code == "contradiction")
    assert all(word in issue.message for word in words)
    assert advice.score <= 75


def test_repeated_words():
    assert "repeated_words" in _codes("a very detailed, detailed, detailed portrait of an old sailor")


def test_score_never_goes_below_zero():
    prompt = "nice good cool awesome thing day night indoor outdoor summer winter"
    advice = validate_prompt(prompt)
    # 30 points off for the vague words and 25 for each of three contradictions: 105 in all.
    assert sorted(issue.code for issue in advice.issues) == ["contradiction"] * 3 + ["vague_words"]
    assert advice.score == 0


def test_blocklist_matches_whole_words_and_phrases_only():
    blocklist = ["gore", "nude figure"]
    assert blocked_terms("A GORE-soaked battlefield", blocklist) == ["gore"]
    assert blocked_terms("a gorey story about Algore", blocklist) == []
    assert blocked_terms("a Nude   Figure study", blocklist) == ["nude figure"]
    assert blocked_terms("anything", []) == []


@pytest.mark.parametrize("raw, cleaned", [
    ('Here is your prompt: "A red fox in snow, golden light."', "A red fox in snow, golden light."),
    ("Sure! Enhanced prompt: a red fox in snow", "a red fox in snow"),
    ("Prompt: 'a red fox'\n\nThis prompt adds lighting details.", "a red fox"),
    ("  a red fox\nin snow,\n  soft light  ", "a red fox in snow, soft light"),
    ("“a red fox”", "a red fox"),
])
def test_clean_llm_output(raw, cleaned):
    assert clean_llm_output(raw) == cleaned


def test_subject_words_skip_stopwords_and_vague_words():
    assert subject_words("a nice red fox in the snow") == ["red", "fox", "snow"]


@pytest.mark.parametrize("candidate, reason", [
    ("", "empty"),
    ("a red fox in snow " * 50, "too_long"),
    ("@@## $$ %% ^^ && ** ((", "not_text"),
    ("a quiet harbour with fishing boats at sunrise", "off_topic"),
    ("a red fox in snow, gore everywhere", "blocked"),
    ("red foxes playing in deep snow at dawn", None),
])
def test_check_llm_prompt(candidate, reason):
    assert check_llm_prompt(candidate, "a red fox in the snow", 300, 0.5, ["gore"]) == reason


def test_subject_overlap_threshold():
    # Two of three subject words kept: fine at 0.5, off-topic at 1.0.
    assert check_llm_prompt("a red fox on a hill", "red fox snow", 300, 0.5) is None
    assert check_llm_prompt("a red fox on a hill", "red fox snow", 300, 1.0) == "off_topic"

"""Rules over prompt text, without a model: validation advice, the blocklist, and LLM guardrails.

- `validate_prompt`: the advice every response carries (the research guide's section 4.2): too
  short or long, vague words, contradictions, repeated words. Advice only; it never rejects.
- `blocked_terms`: the configurable blocklist (off when empty). A prompt that hits it is refused.
- `clean_llm_output` and `check_llm_prompt`: what an LLM's answer must pass before it replaces the
  template enhancer's prompt (cleaned of chat chatter, length-capped, keeps the user's subject).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_WORD = re.compile(r"[a-z][a-z'-]*")

# Words that say little about what to draw; "beautiful landscape" gives the model nothing to aim at.
VAGUE_WORDS = frozenset({
    "nice", "good", "great", "cool", "awesome", "amazing", "beautiful", "pretty", "interesting",
    "stuff", "thing", "things", "something", "somewhere", "whatever", "kind", "sort", "random", "some",
})

# Pairs that cannot both hold for one scene (either side may be several words).
CONTRADICTIONS: tuple[tuple[frozenset[str], frozenset[str]], ...] = tuple(
    (frozenset(left), frozenset(right))
    for left, right in (
        ({"day", "daytime", "sunny", "noon", "midday"}, {"night", "nighttime", "midnight"}),
        ({"indoor", "indoors", "inside", "interior"}, {"outdoor", "outdoors", "outside", "exterior"}),
        ({"summer"}, {"winter"}),
        ({"sunrise", "dawn"}, {"sunset", "dusk"}),
        ({"black-and-white", "monochrome", "grayscale", "greyscale"}, {"colorful", "colourful", "vibrant"}),
        ({"empty", "deserted"}, {"crowded", "busy"}),
        ({"minimalist", "minimal"}, {"cluttered", "ornate"}),
        ({"photorealistic", "photograph", "photo"}, {"cartoon", "anime", "drawing"}),
    )
)

# Words that carry no subject: left out when checking an LLM kept the user's subject.
STOPWORDS = frozenset({
    "a", "an", "the", "and", "or", "but", "of", "in", "on", "at", "to", "for", "with", "without", "by", "from",
    "into", "onto", "over", "under", "is", "are", "was", "be", "it", "its", "this", "that", "these", "those",
    "very", "some", "as", "like", "my", "your", "his", "her", "their", "our", "no", "not", "up", "down",
})

MIN_WORDS = 3
# CLIP text encoders (SDXL's, the scorer's) read 77 tokens, about 60 words; FLUX's T5 reads more.
MAX_WORDS = 60

# Lead-ins LLMs put before the answer ("Here is your prompt:", "Enhanced prompt:", "Sure! ...").
_PREAMBLE = re.compile(
    r"^\s*(?:(?:sure|okay|ok|certainly|of course)[!,.]?\s*)?"
    r"(?:(?:here(?:'s| is)|this is)\s+(?:an?|the|your)?\s*(?:enhanced|improved|detailed|revised|new)?\s*"
    r"(?:image\s+)?prompt\s*(?:for[^:\n]*)?[:\-]|(?:enhanced|improved|detailed|revised|final)?\s*prompt\s*:)\s*",
    re.IGNORECASE,
)
_QUOTES = "\"'`“”‘’«»"


@dataclass(frozen=True)
class PromptIssue:
    code: str
    message: str


@dataclass(frozen=True)
class PromptAdvice:
    """`score` 0-100 (100: nothing to improve) and what lowered it."""

    score: int
    issues: list[PromptIssue] = field(default_factory=list)


def words_of(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def validate_prompt(prompt: str) -> PromptAdvice:
    """Advice on a prompt: each issue costs points; the prompt is never changed or refused here."""
    words = words_of(prompt)
    issues: list[PromptIssue] = []
    penalty = 0
    if len(words) < MIN_WORDS:
        issues.append(PromptIssue("too_short", f"only {len(words)} word(s): add a subject, setting, lighting or style"))
        penalty += 30
    if len(words) > MAX_WORDS:
        issues.append(PromptIssue(
            "too_long", f"{len(words)} words: CLIP-based encoders read about {MAX_WORDS}; the rest is cut off"
        ))
        penalty += 15
    vague = sorted({word for word in words if word in VAGUE_WORDS})
    if vague:
        issues.append(PromptIssue("vague_words", f"vague word(s) {', '.join(vague)}: say what makes it so"))
        penalty += 10 * min(len(vague), 3)
    said = _terms(prompt)
    for left, right in CONTRADICTIONS:
        hit_left, hit_right = sorted(left & said), sorted(right & said)
        if hit_left and hit_right:
            issues.append(PromptIssue(
                "contradiction", f"'{'/'.join(hit_left)}' contradicts '{'/'.join(hit_right)}': pick one for the scene"
            ))
            penalty += 25
    content = [word for word in words if word not in STOPWORDS]
    repeated = sorted({word for word in content if content.count(word) > 2})
    if repeated:
        issues.append(PromptIssue("repeated_words", f"repeated {', '.join(repeated)}: repetition rarely adds weight"))
        penalty += 5
    return PromptAdvice(score=max(0, 100 - penalty), issues=issues)


def _terms(text: str) -> set[str]:
    """Words of `text`, plus hyphenated forms of two-word phrases ('black and white' -> 'black-and-white')."""
    lowered = re.sub(r"\bblack\s+and\s+white\b", "black-and-white", text.lower())
    return set(_WORD.findall(lowered))


def blocked_terms(text: str, blocklist: list[str] | tuple[str, ...]) -> list[str]:
    """Blocklist entries found in `text` as whole words or phrases, case-insensitively."""
    lowered = " ".join(words_of(text))
    return [term for term in blocklist if re.search(rf"(?<![a-z]){re.escape(' '.join(words_of(term)))}(?![a-z])", lowered)]


def clean_llm_output(text: str) -> str:
    """An LLM's answer reduced to the prompt: no lead-in, quotes, labels or line breaks."""
    text = text.strip()
    text = _PREAMBLE.sub("", text, count=1)
    # A model that explains after the prompt usually does so after a blank line.
    text = re.split(r"\n\s*\n", text, maxsplit=1)[0]
    text = re.sub(r"\s+", " ", text).strip()
    if len(text) >= 2 and text[0] in _QUOTES and text[-1] in _QUOTES:
        text = text[1:-1].strip()
    return text.strip(_QUOTES + " ")


def subject_words(prompt: str) -> list[str]:
    """The words carrying the user's subject: everything but stopwords, vague words and one-letter words."""
    return list(dict.fromkeys(
        word for word in words_of(prompt) if len(word) > 1 and word not in STOPWORDS and word not in VAGUE_WORDS
    ))


def _stem(word: str) -> str:
    for suffix in ("ies", "es", "s", "ing", "ed"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            return word[: -len(suffix)]
    return word


def check_llm_prompt(candidate: str, user_prompt: str, max_chars: int, min_subject_overlap: float,
                     blocklist: list[str] | tuple[str, ...] = ()) -> str | None:
    """Why an (already cleaned) LLM prompt must not be used, or None when it may.

    Reasons: `empty`, `too_long` (over max_chars), `not_text` (mostly symbols: a broken model),
    `off_topic` (keeps less than `min_subject_overlap` of the user's subject words), `blocked`.
    """
    if not candidate:
        return "empty"
    if len(candidate) > max_chars:
        return "too_long"
    letters = sum(char.isalpha() for char in candidate)
    if letters < 0.6 * len(candidate.replace(" ", "")):
        return "not_text"
    subject = subject_words(user_prompt)
    if subject:
        said = {_stem(word) for word in words_of(candidate)}
        kept = sum(_stem(word) in said for word in subject)
        if kept / len(subject) < min_subject_overlap:
            return "off_topic"
    if blocklist and blocked_terms(candidate, blocklist):
        return "blocked"
    return None

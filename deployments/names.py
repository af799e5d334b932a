"""Names the whole service shares, defined once: styles, quality levels, gate scores, aspects and
control types. Request schemas, configs, the enhancer, the scorer and the catalogues derive from
these (`typing.get_args`), so a new name is added here and nowhere else.
"""

from __future__ import annotations

from typing import Literal, get_args

Style = Literal["photorealistic", "artistic", "cinematic", "anime", "none"]
STYLES: tuple[str, ...] = get_args(Style)

Quality = Literal["high", "standard", "none"]
QUALITIES: tuple[str, ...] = get_args(Quality)

# The scores that can gate regeneration, with their documented ranges: the one place both are
# defined (request schemas, validation, the scorers and GET /v1/models read them from here).
# `hps` and `pickscore` come from the preference scorers (`scorers:` entries of family hps and
# pickscore, deployments/scoring/families); a config computes only its scorers' metrics.
GateMetric = Literal["alignment", "aesthetic", "laion", "hps", "pickscore", "combined"]
GATE_METRICS: tuple[str, ...] = get_args(GateMetric)
SCORE_RANGES: dict[str, tuple[float, float]] = {
    "alignment": (0.0, 100.0),
    "aesthetic": (0.0, 1.0),
    "laion": (1.0, 10.0),
    # HPSv2.1: cosine of the image and prompt embeddings of its fine-tuned CLIP-H (HPSv2's own
    # `score`; about 0.2-0.35 for real images), clipped at 0.
    "hps": (0.0, 1.0),
    # PickScore v1: its CLIP-H's logit scale (100) x that cosine (about 18-24 for real images), clipped at 0.
    "pickscore": (0.0, 100.0),
    "combined": (0.0, 1.0),
}
# The scores the combined score weighs (each scaled to 0-1 over its range first).
COMBINABLE: tuple[str, ...] = ("aesthetic", "alignment", "laion", "hps", "pickscore")
# What `combined` weighs when neither the request nor the policy gives weights: equal weights over
# these, where computed. The preference scores join only when weighted, so adding a scorer does not
# move every existing `combined` threshold.
DEFAULT_COMBINED: tuple[str, ...] = ("aesthetic", "alignment", "laion")


def default_combined(computed) -> tuple[str, ...]:
    """What an unweighted `combined` averages: DEFAULT_COMBINED where computed, else (scorers with no
    clip entry) every combinable score computed."""
    return tuple(metric for metric in DEFAULT_COMBINED if metric in computed) \
        or tuple(metric for metric in COMBINABLE if metric in computed)

Aspect = Literal["composition", "lighting", "colors", "sharpness", "style"]
ASPECTS: tuple[str, ...] = get_args(Aspect)

ControlType = Literal["canny", "depth"]
CONTROL_TYPES: tuple[str, ...] = get_args(ControlType)

# API key scopes (docs/security.md): generate (images, videos, jobs, scores, enhance), read (own
# jobs, the catalogues), admin (every key's jobs and usage).
Scope = Literal["generate", "read", "admin"]
SCOPES: tuple[str, ...] = get_args(Scope)

assert tuple(SCORE_RANGES) == GATE_METRICS

# Best-of-N: the most images one request may generate in a round (`candidates`); a config may
# allow fewer (policy.max_candidates).
MAX_CANDIDATES = 16

# The OpenAI Images API's `quality` and `style` values, and what each means here (POST
# /v1/images/generations; docs/agents.md has the table). genserve's own values are accepted too.
OPENAI_QUALITIES: dict[str, Quality | None] = {
    "auto": None, "max": "high", "xhigh": "high", "hd": "high", "high": "high", "medium": "standard",
    "standard": "standard", "low": "none",
}
OPENAI_STYLES: dict[str, Style] = {"vivid": "cinematic", "natural": "photorealistic"}

# LoRA names: what a request's `loras[].name` or a hub entry may call an adapter. Pure text rules,
# checked before any file is looked at (the registry's safety rules: deployments.lora_registry).
MAX_LORA_NAME_LENGTH = 128


def lora_name_problem(name: str) -> str | None:
    """Why `name` can never name a LoRA, or None. Pure text checks: nothing is read."""
    if not name:
        return "must not be empty"
    if len(name) > MAX_LORA_NAME_LENGTH:
        return f"must be at most {MAX_LORA_NAME_LENGTH} characters"
    if "/" in name or "\\" in name:
        return "must be a plain name from GET /v1/loras, not a path (no '/' or '\\')"
    if ".." in name:
        return "must not contain '..'"
    if any(ord(char) < 32 or ord(char) == 127 for char in name):
        return "must not contain control characters"
    return None


def check_lora_name(name: str) -> str:
    problem = lora_name_problem(name)
    if problem is not None:
        raise ValueError(f"LoRA name {problem}")
    return name

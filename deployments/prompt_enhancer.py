"""Prompt enhancement deployment.

Template mode (the only one so far) appends a style's descriptors and quality modifiers to the
user's prompt and picks the style's negative-prompt preset. The user's subject always comes first,
so text encoders that truncate (CLIP keeps 77 tokens) keep it. An LLM mode will be a second
strategy behind the same `enhance` method; `EnhancedPrompt.enhancer` says which one answered.
"""

from __future__ import annotations

from ray import serve

from deployments.config import EnhancerConfig
from deployments.types import EnhancedPrompt

STYLES: dict[str, list[str]] = {
    "photorealistic": ["professional photography", "natural lighting", "depth of field", "sharp focus"],
    "artistic": ["digital art", "concept art", "detailed illustration", "vibrant colors"],
    "cinematic": ["cinematic lighting", "dramatic composition", "film still", "35mm photograph", "bokeh"],
    "anime": ["anime style", "manga illustration", "cel shading", "detailed anime art"],
    "none": [],
}

QUALITY_MODIFIERS: dict[str, list[str]] = {
    "high": ["highly detailed", "best quality"],
    "standard": ["detailed"],
    "none": [],
}

_GENERAL_NEGATIVE = "low quality, worst quality, low resolution, blurry, jpeg artifacts, watermark, signature, text"

NEGATIVE_PRESETS: dict[str, str] = {
    "photorealistic": "cartoon, anime, illustration, painting, drawing, oversaturated, distorted, " + _GENERAL_NEGATIVE,
    "artistic": "photograph, photorealistic, poorly drawn, distorted, " + _GENERAL_NEGATIVE,
    "cinematic": "flat lighting, snapshot, overexposed, cartoon, " + _GENERAL_NEGATIVE,
    "anime": "photograph, photorealistic, 3d render, bad anatomy, extra limbs, " + _GENERAL_NEGATIVE,
    "none": _GENERAL_NEGATIVE,
}


def template_enhance(prompt: str, style: str, quality: str, negative_prompt: str | None = None) -> EnhancedPrompt:
    """Append the style's descriptors and the quality modifiers the prompt does not already say.

    A negative prompt given by the user is kept as it is; otherwise the style's preset is used.
    """
    if style not in STYLES:
        raise ValueError(f"style must be one of {sorted(STYLES)}; got {style!r}")
    if quality not in QUALITY_MODIFIERS:
        raise ValueError(f"quality must be one of {sorted(QUALITY_MODIFIERS)}; got {quality!r}")
    subject = prompt.strip().rstrip(",")
    said = subject.lower()
    additions = [term for term in STYLES[style] + QUALITY_MODIFIERS[quality] if term.lower() not in said]
    enhanced = ", ".join([subject, *additions])
    negative = negative_prompt if negative_prompt is not None else NEGATIVE_PRESETS[style]
    return EnhancedPrompt(prompt=enhanced, negative_prompt=negative, style=style, enhancer="template")


@serve.deployment(name="PromptEnhancer", max_ongoing_requests=64, ray_actor_options={"num_cpus": 0.1})
class PromptEnhancer:
    """Turns a short idea into a prompt for the target model, with a negative prompt."""

    def __init__(self, config: EnhancerConfig):
        self._config = config

    def enhance(
        self,
        prompt: str,
        style: str | None = None,
        quality: str = "high",
        negative_prompt: str | None = None,
    ) -> EnhancedPrompt:
        return template_enhance(prompt, style or self._config.default_style, quality, negative_prompt)

    def info(self) -> dict:
        return {"mode": self._config.mode, "styles": sorted(STYLES), "quality": sorted(QUALITY_MODIFIERS)}

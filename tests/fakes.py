"""Fake deployments for testing the graph without models or Ray, and the services over them.

The fake generator paints each image a flat grey derived from its seed; the fake scorer reads the
grey back as the score, so tests choose which seeds pass a threshold.
"""

from __future__ import annotations

import numpy as np

from deployments.runtime.types import EnhancedPrompt, GenerationOutput, GenerationParams
from deployments.scoring.clip_scorer import ASPECTS, combined_score
from deployments.scoring.perceptual import perceptual_scores
from serve_app.services.facade import Services
from serve_app.services.settings import Handles, Settings
from tests.helpers import app_settings


def grey_for_seed(seed: int) -> int:
    return seed % 256


class FakeEnhancer:
    def __init__(self):
        self.calls = []
        self.targets = []

    def enhance(self, prompt, style=None, quality="high", negative_prompt=None, target=None):
        self.calls.append((prompt, style, quality, negative_prompt))
        self.targets.append(target)
        return EnhancedPrompt(prompt=f"{prompt}, enhanced", negative_prompt=negative_prompt or "bad", style=style or "photorealistic", enhancer="template")

    def revise(self, prompt, previous, weak, target=None):
        self.calls.append(("revise", prompt, previous.prompt, tuple(weak)))
        return EnhancedPrompt(prompt=f"{previous.prompt}, fixing {'+'.join(weak)}", negative_prompt=previous.negative_prompt,
                              style=previous.style, enhancer="template")


class FakeGenerator:
    def __init__(self):
        self.calls: list[tuple[GenerationParams, EnhancedPrompt]] = []

    async def generate(self, params: GenerationParams, prompt: EnhancedPrompt) -> GenerationOutput:
        self.calls.append((params, prompt))
        images = np.stack(
            [np.full((params.height, params.width, 3), grey_for_seed(seed), dtype=np.uint8) for seed in params.seeds]
        )
        return GenerationOutput(images=images, seeds=list(params.seeds), model="fake", seconds=0.0, device="cpu", dtype="float32")


class FakeScorer:
    """aesthetic = grey / 255, alignment = 100 * grey / 255, laion = 1 + 9 * grey / 255; combined from
    those with the real formula; aspects all grey / 255 unless `fixed_aspects` sets some (`aspects=False`:
    none, as a scorer without aspect scores); perceptual from the pixels (the real checks)."""

    def __init__(self, aspects: bool = True, fixed_aspects: dict[str, float] | None = None):
        self.received = []
        self.weights = []
        self.aspects = aspects
        self.fixed_aspects = fixed_aspects or {}

    async def score(self, images, prompt, weights=None):
        self.received.append(type(images).__name__)
        self.weights.append(weights)
        array = images.images if isinstance(images, GenerationOutput) else images
        results = []
        for image in array:
            grey = float(image[0, 0, 0]) / 255.0
            scores = {"aesthetic": grey, "alignment": 100.0 * grey, "laion": 1.0 + 9.0 * grey}
            scores["combined"] = combined_score(scores, weights or {"aesthetic": 1, "alignment": 1, "laion": 1})
            if self.aspects:
                scores["aspects"] = {aspect: self.fixed_aspects.get(aspect, grey) for aspect in ASPECTS}
            scores["perceptual"] = perceptual_scores(np.asarray(image))
            results.append(scores)
        return results

    async def score_video(self, frames, prompt, weights=None):
        """Frames scored as images; consistency 1 - the mean absolute change between frames (0-1 of 255)."""
        scored = await self.score(frames, prompt, weights) if prompt else []
        changes = [np.abs(a.astype(float) - b).mean() / 255 for a, b in zip(frames[1:], frames[:-1])]
        return {"frames": scored, "temporal_consistency": 1 - float(np.mean(changes)) if changes else None}


def fake_services(settings: Settings | None = None, *, enhancer=None, generator=None, scorer=None,
                  generators: dict | None = None, video_generators: dict | None = None) -> Services:
    """`Services.build` in one process over fakes: FakeEnhancer, FakeScorer and a FakeGenerator per
    image model unless given (`generator`: the default model's, `generators`: by model id). Settings:
    `tests.helpers.app_settings()` unless given."""
    settings = settings or app_settings()
    chosen = {model: FakeGenerator() for model in settings.specs}
    if generator is not None:
        chosen[settings.default_model] = generator
    handles = Handles.local(enhancer or FakeEnhancer(), {**chosen, **(generators or {})}, scorer or FakeScorer(),
                            video_generators)
    return Services.build(settings, handles)

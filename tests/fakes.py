"""Fake deployments for testing the graph without models or Ray.

The fake generator paints each image a flat grey derived from its seed; the fake scorer reads the
grey back as the score, so tests choose which seeds pass a threshold.
"""

from __future__ import annotations

import numpy as np

from deployments.types import EnhancedPrompt, GenerationOutput, GenerationParams


def grey_for_seed(seed: int) -> int:
    return seed % 256


class FakeEnhancer:
    def __init__(self):
        self.calls = []
        self.targets = []

    def enhance(self, prompt, style=None, quality="high", negative_prompt=None, target="flux"):
        self.calls.append((prompt, style, quality, negative_prompt))
        self.targets.append(target)
        return EnhancedPrompt(prompt=f"{prompt}, enhanced", negative_prompt=negative_prompt or "bad", style=style or "photorealistic", enhancer="template")

    def revise(self, prompt, previous, weak, target="flux"):
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
    """aesthetic = grey / 255, alignment = 100 * grey / 255; with `aspects`, aspect scores too
    (lighting = grey / 255, the others fixed), as a scorer with aspect scores gives them."""

    def __init__(self, aspects: bool = False):
        self.received = []
        self.aspects = aspects

    async def score(self, images, prompt):
        self.received.append(type(images).__name__)
        array = images.images if isinstance(images, GenerationOutput) else images
        greys = array[:, 0, 0, 0].astype(float) / 255.0
        scores = [{"aesthetic": g, "alignment": 100.0 * g} for g in greys]
        if self.aspects:
            for entry, g in zip(scores, greys):
                entry["aspects"] = {"composition": 0.5, "lighting": g, "colors": 0.6, "sharpness": 0.7, "style": 0.9}
        return scores

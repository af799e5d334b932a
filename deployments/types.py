"""Plain messages passed between the ingress and the model deployments.

They travel through Ray's object store (numpy arrays are zero-copy there), so they hold arrays and
plain values only, never tensors or PIL images.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class GenerationParams:
    """What a generator needs for one batch besides the prompt: one image per seed."""

    seeds: list[int]
    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float = 0.0


@dataclass
class GenerationOutput:
    """Images as uint8 (N, H, W, 3), in the order of `seeds`."""

    images: np.ndarray
    seeds: list[int]
    model: str
    seconds: float
    device: str
    dtype: str


@dataclass(frozen=True)
class EnhancedPrompt:
    """The prompt a generator uses. Generators that run without guidance ignore `negative_prompt`."""

    prompt: str
    negative_prompt: str | None
    style: str
    enhancer: str
    notes: list[str] = field(default_factory=list)

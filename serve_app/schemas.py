"""The HTTP and handle contract: request and response models.

Bounds that hold for every model are checked here, so FastAPI answers 422 naming the field before
anything reaches a deployment. Bounds that depend on the chosen model (steps, guidance) are checked
by `serve_app.models.ModelSpec.check` against the same 422 shape.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

Style = Literal["photorealistic", "artistic", "cinematic", "anime", "none"]
Quality = Literal["high", "standard", "none"]
Metric = Literal["aesthetic", "alignment"]
MAX_SEED = 2**32 - 1


class ImageRequest(BaseModel):
    """`POST /v1/images`, and the argument of the ingress's `generate_images` handle method.

    Omitted optional fields take the deployed config's defaults; the response says which values
    were used. Unknown fields are rejected rather than ignored.
    """

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=2000, description="What to draw (1-2000 characters).")
    negative_prompt: str | None = Field(
        None, max_length=2000, description="What to avoid; models without guidance report it as unused."
    )
    model: str = Field("flux-schnell", description="A model id from GET /v1/models.")
    style: Style | None = Field(None, description="Template style; default from config.")
    quality: Quality = Field("high", description="Quality modifiers the enhancer appends.")
    enhance: bool = Field(True, description="Run the prompt enhancer; false sends the prompt as given.")
    width: int | None = Field(None, ge=256, le=2048, multiple_of=16, description="256-2048, a multiple of 16.")
    height: int | None = Field(None, ge=256, le=2048, multiple_of=16, description="256-2048, a multiple of 16.")
    num_inference_steps: int | None = Field(None, ge=1, le=50, description="Denoising steps; the model sets the range.")
    guidance_scale: float | None = Field(None, ge=0, le=30, description="CFG scale; 0 for guidance-distilled models.")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="0-4294967295; omitted means random (returned).")
    num_images: int = Field(1, ge=1, le=4, description="Images to return, 1-4.")
    quality_metric: Metric | None = Field(None, description="Score that gates regeneration; default from config.")
    quality_threshold: float | None = Field(
        None, ge=0, le=100, description="Minimum gating score (aesthetic 0-1, alignment 0-100)."
    )
    max_attempts: int | None = Field(None, ge=1, le=5, description="Generation rounds, 1-5; default from config.")

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("prompt must contain non-whitespace text")
        return value


class Scores(BaseModel):
    aesthetic: float = Field(description="0-1: CLIP's preference for 'beautiful' over 'ugly' descriptions.")
    alignment: float = Field(description="0-100: CLIPScore of the image against the original prompt.")


class GeneratedImage(BaseModel):
    b64_png: str = Field(description="Base64 PNG with the generation parameters in its text chunks.")
    seed: int
    width: int
    height: int
    attempt: int = Field(description="The generation round that produced this image, from 1.")
    scores: Scores
    passed: bool


class Attempt(BaseModel):
    """One generated candidate image, kept or not."""

    attempt: int
    seed: int
    prompt: str
    scores: Scores
    passed: bool


class ImageResponse(BaseModel):
    id: str
    created: int = Field(description="Unix time the request was accepted.")
    model: str
    prompt: str = Field(description="The prompt as the user sent it.")
    enhanced_prompt: str = Field(description="The prompt the model saw.")
    negative_prompt: str | None = Field(description="The negative prompt the model used; null when unused.")
    style: str | None
    enhancer: str = Field(description="Which enhancer produced enhanced_prompt: 'template' or 'none'.")
    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float
    quality_metric: Metric
    quality_threshold: float
    passed: bool = Field(description="Every returned image reached the threshold.")
    images: list[GeneratedImage]
    attempts: list[Attempt] = Field(description="Every candidate generated, in order.")
    timings: dict[str, float] = Field(description="Seconds per stage: enhance, generate, score, encode, total.")
    warnings: list[str] = Field(default_factory=list)

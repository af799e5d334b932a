"""The HTTP and handle contract: request and response models.

Bounds that hold for every model are checked here, so FastAPI answers 422 naming the field before
anything reaches a deployment. Rules that depend on the chosen model or the config (steps, guidance,
control, LoRAs, budgets) are decided in `serve_app.services.validation`, in the same 422 shape.
"""

from __future__ import annotations

import base64
import json
import secrets
import warnings
from typing import Annotated, Any, Callable, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from deployments.config import CombinedWeights
from deployments.names import MAX_CANDIDATES, ControlType, Quality, Style, check_lora_name
from deployments.names import GateMetric as Metric
from serve_app._deprecated import REMOVAL

MAX_SEED = 2**32 - 1


def random_seed() -> int:
    """A seed for requests that give none; returned to the caller so the result can be replayed."""
    return secrets.randbelow(MAX_SEED + 1)


MAX_LORAS = 8
LORA_SCALE_RANGE = (-2.0, 2.0)
# Reference images one request may carry; each model's own limit (GET /v1/models reference_images)
# is at most this, and 0 for models that take none.
MAX_REFERENCE_IMAGES = 8


class JobImageRef(BaseModel):
    """An image of an earlier, succeeded image job the caller may see, by job id and index: an agent
    edits what it made without sending the pixels back. The HTTP, jobs, MCP and A2A front ends look
    it up; through the Python handle, send the image itself."""

    model_config = ConfigDict(extra="forbid")

    job_id: str = Field(min_length=1, max_length=64, description="The id of a succeeded image job (POST /v1/jobs).")
    index: int = Field(0, ge=0, le=3, description="Which of the job's images, 0-3.")

# An image's file format, as the OpenAI Images API names them.
ImageFormat = Literal["png", "jpeg", "webp"]
IMAGE_MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
# jpeg/webp quality when a request gives no output_compression: at 1024x1024 WebP q90 is about a tenth
# of the PNG's bytes and no slower to encode than PNG level 1 (docs/benchmarks.md).
DEFAULT_IMAGE_QUALITY = 90


class Lora(BaseModel):
    """One LoRA adapter for a request, by its name in GET /v1/loras."""

    model_config = ConfigDict(extra="forbid", strict=True)  # "revise_prompt": 0 is not a bool

    name: str = Field(
        min_length=1, max_length=128,
        description="A name from GET /v1/loras (a file stem or a configured hub entry); never a path.",
    )
    scale: float = Field(
        1.0, ge=LORA_SCALE_RANGE[0], le=LORA_SCALE_RANGE[1],
        description="Strength, -2 to 2: 1 as trained, 0 no effect, negative pushes away from the adapter's style.",
    )

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        return check_lora_name(value)


class ControlOptions(BaseModel):
    """`control` of POST /v1/images: a ControlNet condition from a reference picture (SDXL models)."""

    model_config = ConfigDict(extra="forbid", strict=True)  # "revise_prompt": 0 is not a bool

    type: ControlType = Field(description="'canny' (edges) or 'depth'; GET /v1/controls lists them.")
    image: str = Field(
        min_length=1,
        description="Base64 PNG or JPEG (a data: URL prefix is accepted): the reference picture, or with "
                    "preprocess false the edge/depth map itself. Scaled to cover the output size and centre-cropped.",
    )
    conditioning_scale: float = Field(0.5, ge=0, le=2, description="How strongly the map steers the image, 0-2.")
    preprocess: bool = Field(
        True, description="true: compute the canny edges or depth map from image; false: image already is the map."
    )
    low_threshold: int = Field(100, ge=0, le=255, description="Canny: lower hysteresis threshold, 0-255.")
    high_threshold: int = Field(
        200, ge=0, le=255, validate_default=True,  # checked against low_threshold even when left out
        description="Canny: upper hysteresis threshold, 0-255, above low.",
    )

    @field_validator("high_threshold")
    @classmethod
    def _above_low(cls, value: int, info: ValidationInfo) -> int:
        low = info.data.get("low_threshold")
        if low is not None and value <= low:
            raise ValueError(f"high_threshold ({value}) must be above low_threshold ({low})")
        return value


DEFAULT_STRENGTH = 0.75


class HiresOptions(BaseModel):
    """`hires` of POST /v1/images: generate at the requested size, upscale (Lanczos), then refine
    with image-to-image ("hires fix"). The output is `scale` times the requested size."""

    model_config = ConfigDict(extra="forbid")

    scale: float = Field(2.0, ge=1, le=2, description="Upscale factor, 1-2; the final size is rounded to a multiple of 16.")
    strength: float = Field(
        0.5, ge=0, le=1, description="How much the second pass repaints, 0-1; steps x strength must be at least 1."
    )
    steps: int | None = Field(None, ge=1, le=50, description="Second pass steps (scheduled); default: the first pass's.")


class ImageRequest(BaseModel):
    """`POST /v1/images`, and the argument of the ingress's `generate_images` handle method.

    Omitted optional fields take the deployed config's defaults; the response says which values
    were used. Unknown fields are rejected rather than ignored.
    """

    model_config = ConfigDict(extra="forbid", strict=True)  # "revise_prompt": 0 is not a bool

    prompt: str = Field(min_length=1, max_length=2000, description="What to draw (1-2000 characters).")
    negative_prompt: str | None = Field(
        None, max_length=2000, description="What to avoid; models without guidance report it as unused."
    )
    model: str | None = Field(None, description="A model id from GET /v1/models; default: the config's default model.")
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
        None, ge=0, le=100,
        description="Minimum gating score (aesthetic 0-1, alignment 0-100, laion 1-10, combined 0-1).",
    )
    quality_weights: CombinedWeights | None = Field(
        None,
        description="Weights of the combined score ({aesthetic, alignment, laion}, unset ones 0); default from config.",
    )
    quality_percentile: float | None = Field(
        None, ge=0, le=100,
        description="Instead of quality_threshold: pass an image that scores at least as well as this percent of "
                    "what the model makes (70: better than 70%, the top 30%), from the model's calibration "
                    "(GET /v1/admin/quality).",
    )
    candidates: int | None = Field(
        None, ge=1, le=MAX_CANDIDATES,
        description=f"Best-of-N: generate this many images in one batch, score them all and return the best "
                    f"num_images (at least num_images, at most {MAX_CANDIDATES} or the config's "
                    "policy.max_candidates); default: num_images.",
    )
    max_attempts: int | None = Field(None, ge=1, le=5, description="Generation rounds, 1-5; default from config.")
    revise_prompt: bool | None = Field(
        None,
        description="On regeneration, ask the enhancer for a prompt that fixes the weakest scores "
                    "(false: new seed, same prompt); default from config.",
    )
    loras: list[Lora] = Field(
        default_factory=list, max_length=MAX_LORAS,
        description="LoRA adapters to apply, each {name, scale}; at most the config's loras.max_per_request (up to 8). "
                    "Each must be made for the model's family (GET /v1/loras).",
    )
    control: ControlOptions | None = Field(
        None, description="ControlNet guidance from a reference picture (models with ControlNets: see GET /v1/models)."
    )
    init_image: str | None = Field(
        None, min_length=1,
        description="Image-to-image: base64 PNG, JPEG or WebP to start from (a data: URL prefix is accepted); "
                    "scaled to cover the output size and centre-cropped. Models with image_to_image in GET /v1/models.",
    )
    strength: float | None = Field(
        None, ge=0, le=1,
        description=f"With init_image: how much to repaint, 0-1 (1 ignores the image); default {DEFAULT_STRENGTH}. "
                    "num_inference_steps x strength must be at least 1.",
    )
    mask: str | None = Field(
        None, min_length=1,
        description="Inpainting (with init_image): base64 PNG, JPEG or WebP of init_image's size; white (>= 128 in "
                    "grey) is repainted, black kept. Models with inpainting in GET /v1/models.",
    )
    mask_blur: int | None = Field(
        None, ge=0, le=64, description="With mask: Gaussian blur radius in pixels softening the mask's edge; default 4."
    )
    preserve_unmasked: bool | None = Field(
        None, description="With mask: paste the input's pixels back where the mask is black, so they stay exact; "
                          "default true."
    )
    hires: HiresOptions | None = Field(
        None, description="A second, high-resolution pass: {scale, strength, steps}; not with mask."
    )
    reference_images: list[Annotated[str, Field(min_length=1)] | JobImageRef] = Field(
        default_factory=list, max_length=MAX_REFERENCE_IMAGES,
        description="Images the model conditions every image on, each base64 PNG, JPEG or WebP or an earlier job's "
                    "image {job_id, index}: the prompt then says what to make of them, a new picture (\"this mug "
                    "on a beach\") or an edit by instruction (\"make it night\"). Models with reference_images "
                    "in GET /v1/models take up to that many; not with init_image or control.",
    )
    preview: bool = Field(
        True, description="As a job: send a small approximate picture of the image being denoised with its progress "
                          "events (models whose family has preview factors). No effect on a sync request.",
    )
    fallback: bool = Field(
        False,
        description="Allow the configured remote images endpoint to serve this request when the local model is "
                    "saturated (the prompt then goes to that third party). Needs `fallback.enabled` in the config.",
    )
    output_format: ImageFormat = Field(
        "png", description="png (lossless, the generation parameters in its text chunks), or jpeg or webp: smaller "
                           "and cheaper to encode, the parameters in EXIF. The image is in b64_png, or b64_image.",
    )
    output_compression: int | None = Field(
        None, ge=0, le=100,
        description=f"jpeg and webp only: the quality, 0-100 (OpenAI's output_compression); default "
                    f"{DEFAULT_IMAGE_QUALITY}.",
    )

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("prompt must contain non-whitespace text")
        return value

    @field_validator("output_compression")
    @classmethod
    def _lossy_only(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and info.data.get("output_format", "png") == "png":
            raise PydanticCustomError("lossy_only", "output_compression applies to output_format jpeg or webp only, "
                                                    "not png (allowed: omit it, or set output_format)")
        return value


class PromptIssueInfo(BaseModel):
    code: str = Field(description="too_short, too_long, vague_words, contradiction or repeated_words.")
    message: str


class PromptAdviceInfo(BaseModel):
    """Advice on the prompt as the user wrote it. Never blocks a request."""

    score: int = Field(description="0-100; 100 means no issue was found.")
    issues: list[PromptIssueInfo]


class AspectScores(BaseModel):
    """CLIP's probability for each aspect's 'good' text over its 'bad' one (0-1, higher is better)."""

    composition: float = Field(description="0-1: well composed and balanced vs cluttered.")
    lighting: float = Field(description="0-1: excellent vs poor, flat lighting.")
    colors: float = Field(description="0-1: vibrant, harmonious vs dull, washed-out colours.")
    sharpness: float = Field(description="0-1: sharp and detailed vs blurry, as CLIP sees it.")
    style: float = Field(description="0-1: artistic and creative vs generic.")


class PerceptualScores(BaseModel):
    """Pixel statistics, no model. They describe; higher is not always better (a night scene is dark)."""

    brightness: float = Field(description="0-1: mean luma (BT.601); 0 black, 1 white.")
    contrast: float = Field(description="0-1: RMS contrast, 2 x the standard deviation of luma on 0-1.")
    saturation: float = Field(description="0-1: mean HSV saturation; 0 for grey.")
    sharpness: float = Field(
        description="0 and up: variance of the 4-neighbour Laplacian of luma on 0-255 (as OpenCV's "
                    "Laplacian().var()); below ~100 usually looks blurry; depends on image size."
    )


class Scores(BaseModel):
    aesthetic: float = Field(description="0-1: CLIP's preference for 'beautiful' over 'ugly' descriptions.")
    alignment: float = Field(description="0-100: CLIPScore of the image against the original prompt.")
    laion: float | None = Field(
        None, description="1-10: LAION aesthetic predictor's rating; null when the scorer's LAION head is off."
    )
    hps: float | None = Field(
        None, description="0-1: HPSv2.1 human-preference score (about 0.2-0.35 for real images); null without an "
                          "hps scorer."
    )
    pickscore: float | None = Field(
        None, description="0-100: PickScore v1 human-preference score (about 18-24 for real images); null without "
                          "a pickscore scorer."
    )
    # The three below are always set; null only in async-job results stored by older versions.
    combined: float | None = Field(
        None, description="0-1: weighted mean of aesthetic, alignment/100 and (laion-1)/9 (see quality_weights)."
    )
    aspects: AspectScores | None = Field(None, description="Per-aspect scores (always set by this version).")
    perceptual: PerceptualScores | None = Field(None, description="Pixel statistics (always set by this version).")


MAX_SCORE_IMAGES = 16


class ScoreRequest(BaseModel):
    """`POST /v1/scores`: score uploaded images against a prompt, with no generation."""

    model_config = ConfigDict(extra="forbid", strict=True)  # "revise_prompt": 0 is not a bool

    prompt: str = Field(min_length=1, max_length=2000, description="What the images should show (1-2000 characters).")
    images: list[str] = Field(
        min_length=1, max_length=MAX_SCORE_IMAGES,
        description=f"1-{MAX_SCORE_IMAGES} base64 PNG or JPEG images (a data: URL prefix is accepted), "
                    "scored in one batch.",
    )
    quality_metric: Metric | None = Field(None, description="Score that decides `passed` and `best`; default from config.")
    quality_threshold: float | None = Field(
        None, ge=0, le=100, description="Minimum of quality_metric for `passed`; default from config."
    )
    quality_weights: CombinedWeights | None = Field(None, description="Weights of the combined score; default from config.")

    _not_blank = field_validator("prompt")(ImageRequest._not_blank.__func__)


class ScoredImage(BaseModel):
    index: int = Field(description="Position in the request's images.")
    width: int = Field(description="The upload's width (EXIF orientation applied).")
    height: int = Field(description="The upload's height (EXIF orientation applied).")
    scored_width: int | None = Field(
        None, description="The width of the copy that was scored: smaller than `width` when the request's images "
                          "were over the scoring pixel budget (scores.pixel_budget); see docs/operations.md.")
    scored_height: int | None = Field(None, description="The height of the copy that was scored.")
    scores: Scores
    passed: bool = Field(description="quality_metric is at least quality_threshold.")


class ScoreResponse(BaseModel):
    prompt: str
    quality_metric: Metric
    quality_threshold: float
    quality_weights: CombinedWeights = Field(description="The weights the combined score used.")
    images: list[ScoredImage]
    best: int = Field(description="Index of the image with the highest quality_metric (the first, on ties).")
    ranges: dict[str, tuple[float, float]] = Field(description="Range of each gate score: [low, high], higher is better.")
    timings: dict[str, float] = Field(description="Seconds: decode, score, total.")


class HiresInfo(HiresOptions):
    """The hires pass that ran: `steps` filled in, and the first pass's size."""

    steps: int
    first_width: int = Field(description="Width of the first pass, before upscaling.")
    first_height: int = Field(description="Height of the first pass, before upscaling.")


class ImageInfo(BaseModel):
    """One returned image, without its pixels."""

    seed: int
    width: int
    height: int
    attempt: int = Field(description="The generation round that produced this image, from 1.")
    scores: Scores
    passed: bool


class GeneratedImage(ImageInfo):
    output_format: ImageFormat = Field("png", description="The request's output_format.")
    b64_png: str | None = Field(
        None, description="Base64 PNG with the generation parameters in its text chunks (output_format png, the "
                          "default); null for jpeg and webp, which are in b64_image.")
    b64_image: str | None = Field(
        None, description="With output_format jpeg or webp: the base64 image, the generation parameters in its EXIF "
                          "ImageDescription (JSON); null for png.")

    def image_bytes(self) -> bytes:
        """The image file, whichever field holds it."""
        return base64.b64decode(self.b64_png if self.output_format == "png" else self.b64_image)

    @property
    def media_type(self) -> str:
        return IMAGE_MEDIA_TYPES[self.output_format]


class Attempt(BaseModel):
    """One generated candidate image, kept or not."""

    attempt: int
    seed: int
    prompt: str
    scores: Scores
    passed: bool
    thumbnail: str | None = Field(
        None, description="For a candidate that was not returned in `images`: a small PNG data: URL of it, so it "
                          "can be compared with the chosen ones; null for returned images.",
    )


class CandidateInfo(BaseModel):
    """One image generated for a request, returned or not: what best-of-N chose from."""

    attempt: int = Field(description="The generation round that made it, from 1.")
    seed: int
    scores: Scores
    passed: bool = Field(description="Its quality_metric reached the threshold.")
    chosen: bool = Field(description="It is one of the returned `images`.")


class ImageResponse(BaseModel):
    id: str
    created: int = Field(description="Unix time the request was accepted.")
    model: str
    prompt: str = Field(description="The prompt as the user sent it.")
    enhanced_prompt: str = Field(description="The prompt the model saw.")
    negative_prompt: str | None = Field(description="The negative prompt the model used; null when unused.")
    style: str | None
    enhancer: str = Field(description="Which enhancer produced enhanced_prompt: 'llm', 'template' or 'none'.")
    enhancer_fallback: str | None = Field(
        None, description="Why the template answered although the LLM was asked (e.g. 'off_topic: ...'); else null."
    )
    enhancer_dropped: list[str] = Field(
        default_factory=list,
        description="The enhancer's own additions left out so that the prompts fit the model's text encoders "
                    "(CLIP keeps 77 tokens): style and quality terms, LLM clauses, negative-preset terms "
                    "('negative: ...'). The user's words are never dropped. Empty when everything fitted.",
    )
    prompt_advice: PromptAdviceInfo | None = Field(
        None, description="Validation advice on the prompt as sent (null only in job results stored by older versions)."
    )
    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float
    quality_metric: Metric
    quality_threshold: float
    quality_percentile: float | None = Field(
        None, description="The percentile the request asked for; quality_threshold is the score it came to."
    )
    quality_weights: CombinedWeights | None = Field(
        None, description="The weights the combined score used (null only in job results stored by older versions)."
    )
    passed: bool = Field(description="Every returned image reached the threshold.")
    images: list[GeneratedImage]
    attempts: list[Attempt] = Field(description="Every candidate generated, in order.")
    candidates: list[CandidateInfo] = Field(
        default_factory=list,
        description="Every image generated, in order, with its scores and whether it was chosen (best-of-N).",
    )
    timings: dict[str, float] = Field(description="Seconds per stage: enhance, generate, score, encode, total; turn: "
                                                  "a synchronous request's wait for its turn in the fair queue (the "
                                                  "prompt is enhanced meanwhile); parts of generate where they happened: first_pass and hires, and move_in (an "
                                                  "on-demand model moved onto the GPU first); and device: the "
                                                  "generator's own time on its device (GPU-seconds).")
    warnings: list[str] = Field(default_factory=list)
    loras: list[Lora] = Field(default_factory=list, description="The LoRA adapters applied, with their scales.")
    mode: Literal["text-to-image", "image-to-image", "inpainting", "instruction-edit"] = Field(
        "text-to-image", description="What the first pass started from: noise, init_image, init_image and mask, or "
                                     "noise conditioned on reference_images (the prompt an instruction)."
    )
    strength: float | None = Field(None, description="The strength used with init_image; null for text-to-image.")
    hires: HiresInfo | None = Field(None, description="The high-resolution second pass, when one ran.")
    backend: Literal["local", "remote"] = Field(
        "local", description="Who generated the images: this service's model, or the configured remote endpoint "
                             "(a `fallback` request at a peak; `model` then names the remote model)."
    )
    simulated: str | None = Field(
        None, description="The simulated device profile (e.g. 'h200') when the model runs on a simulated "
                          "accelerator: the images are placeholders and the timings modelled, never a GPU's; "
                          "null on a real device. The PNGs' `genserve` metadata says the same.",
    )


class EnhanceRequest(BaseModel):
    """`POST /v1/prompts/enhance`: what the image graph's enhance step would make of a prompt."""

    model_config = ConfigDict(extra="forbid", strict=True)  # "revise_prompt": 0 is not a bool

    prompt: str = Field(min_length=1, max_length=2000, description="The idea to enhance (1-2000 characters).")
    negative_prompt: str | None = Field(None, max_length=2000, description="Kept as given; else the style's preset.")
    model: str | None = Field(
        None, description="Target model id from GET /v1/models (shapes the prompt's form); default: the config's."
    )
    style: Style | None = Field(None, description="Template style; default from config.")
    quality: Quality = Field("high", description="Quality modifiers the template appends.")

    _not_blank = field_validator("prompt")(ImageRequest._not_blank.__func__)


class EnhanceResponse(BaseModel):
    prompt: str = Field(description="The prompt as sent.")
    enhanced_prompt: str
    negative_prompt: str | None = Field(description="The negative prompt; null when the target model does not use one.")
    style: str
    model: str
    enhancer: str = Field(description="'llm' or 'template'.")
    enhancer_fallback: str | None = Field(None, description="Why the template answered although the LLM was asked.")
    enhancer_dropped: list[str] = Field(
        default_factory=list,
        description="The enhancer's own additions left out so that the prompts fit the model's text encoders "
                    "(CLIP keeps 77 tokens): style and quality terms, LLM clauses, negative-preset terms "
                    "('negative: ...'). The user's words are never dropped. Empty when everything fitted.",
    )
    prompt_advice: PromptAdviceInfo
    seconds: float = Field(description="Time the enhancer took.")


class KeyframeOptions(BaseModel):
    """How text-to-video makes its keyframe: the image fields of POST /v1/images (one image)."""

    model_config = ConfigDict(extra="forbid", strict=True)  # "revise_prompt": 0 is not a bool

    negative_prompt: str | None = Field(None, max_length=2000)
    model: str | None = Field(None, description="Image model that draws the keyframe; default: the config's.")
    style: Style | None = None
    quality: Quality = "high"
    enhance: bool = True
    num_inference_steps: int | None = Field(None, ge=1, le=50, description="Image model's steps.")
    guidance_scale: float | None = Field(None, ge=0, le=30)
    quality_metric: Metric | None = None
    quality_threshold: float | None = Field(None, ge=0, le=100)
    quality_weights: CombinedWeights | None = None
    max_attempts: int | None = Field(None, ge=1, le=5)
    revise_prompt: bool | None = None
    loras: list[Lora] = Field(default_factory=list, max_length=MAX_LORAS, description="As for POST /v1/images.")
    control: ControlOptions | None = Field(
        None, description="ControlNet guidance for the keyframe (a model with ControlNets, e.g. sdxl)."
    )


def _video_param_schema(declared: list[tuple[str, dict]]) -> dict:
    """One video family parameter as VideoRequest's schema documents it, from each family declaring
    it (family name, its JSON schema): every family's type and bounds (one branch where they agree),
    or null (left out: the chosen model's family default); each family's default in the description."""
    branches, notes = [], {}
    for family, schema in declared:
        shape = {key: value for key, value in schema.items() if key not in ("title", "description", "default")}
        for branch in shape.get("anyOf", [shape]):
            if branch not in branches:
                branches.append(branch)
        notes.setdefault(schema.get("description", ""), []).append(f"{family} (default {json.dumps(schema.get('default'))})")
    nulls = [branch for branch in branches if branch.get("type") == "null"]
    branches = [branch for branch in branches if branch.get("type") != "null"] + (nulls or [{"type": "null"}])
    return {"anyOf": branches, "default": None,
            "description": " ".join(f"{', '.join(families)}: {text}" for text, families in notes.items())}


def video_params_schema(by_family: dict[str, dict[str, dict]]) -> dict[str, dict]:
    """The properties VideoRequest's schema documents for the video families' own parameters, from
    {family name: {parameter: JSON schema}} (`VideoFamily.param_schema`)."""
    declared: dict[str, list[tuple[str, dict]]] = {}
    for family, params in by_family.items():
        for name, schema in params.items():
            declared.setdefault(name, []).append((family, schema))
    return {name: {"title": name.replace("_", " ").title(), **_video_param_schema(families)}
            for name, families in declared.items()}


def _document_family_params(schema: dict, model: type) -> None:
    source = model.family_params_source
    if source is not None:
        for name, documented in video_params_schema(source()).items():
            schema["properties"].setdefault(name, documented)


class VideoRequest(BaseModel):
    """`POST /v1/videos`: a video from `model` (default: the config's default video model).

    Image-to-video animates `image`; text-to-video takes `prompt`: natively for families that take
    one (ltx), or through a keyframe an image model draws first (svd). Families that do both (ltx)
    take `image` and `prompt` together. Frame counts and sizes follow the model's family rules
    (GET /v1/models); a request breaking one gets 422 naming the field and the rule.

    Each video family has parameters of its own (GET /v1/models: `params`, `param_schema`), given as
    more fields of this body: kept as extra fields here and checked against the chosen model's family
    (a parameter it does not take is a 422 naming it). The built-in families' are documented below.
    """

    # Extra fields are the family's own parameters (`family_params`), checked by the video service.
    model_config = ConfigDict(extra="allow", strict=True, json_schema_extra=_document_family_params)
    # () -> {family name: {parameter: JSON schema}}: where the published schema (OpenAPI, MCP) reads
    # the built-in families' parameters. The layer that publishes it sets it (serve_app.api): this
    # module is the client's too, and may not import the families (they load torch).
    family_params_source: ClassVar[Callable[[], dict[str, dict[str, dict]]] | None] = None

    model: str | None = Field(None, description="Video model id (GET /v1/models video_models); default: the config's.")
    image: str | None = Field(
        None, min_length=1, description="Base64 PNG or JPEG to animate (a data: URL prefix is accepted)."
    )
    prompt: str | None = Field(
        None, min_length=1, max_length=2000,
        description="Text-to-video: the video's prompt (native families) or the keyframe's (svd).",
    )
    keyframe: KeyframeOptions = Field(
        default_factory=KeyframeOptions, description="Keyframe options (keyframe text-to-video: svd)."
    )
    width: int | None = Field(None, ge=16, le=2048, description="Within the family's size rule; default: the model's.")
    height: int | None = Field(None, ge=16, le=2048, description="Within the family's size rule; default: the model's.")
    num_frames: int | None = Field(
        None, ge=2, le=257, description="Generated frames, by the family's frame rule (svd 2-25, ltx 8k+1); default: the model's."
    )
    fps: int | None = Field(None, ge=1, le=60, description="Frames per second generated (also the model's fps "
                                                            "conditioning); default: the model's.")
    interpolate: Literal[1, 2, 4] = Field(
        1, description="Frame interpolation (ffmpeg minterpolate): N frames become (N-1)*k+1 at k*fps."
    )
    num_inference_steps: int | None = Field(None, ge=1, le=100, description="Denoising steps; default from config.")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Video seed (and the keyframe's); random if omitted.")
    output_format: Literal["mp4", "gif", "webp"] = Field("mp4", description="H.264 MP4, or animated GIF/WebP.")
    response_format: Literal["json", "binary"] = Field(
        "json", description="json: base64 in JSON with metadata; binary: the file itself, metadata in headers."
    )
    quality_metric: Metric | None = Field(
        None, description="Score that decides the video's `scores.passed` (its sampled frames' mean); default from config."
    )
    quality_threshold: float | None = Field(
        None, ge=0, le=100,
        description="Minimum of quality_metric (the sampled frames' mean) for `scores.passed`; needs a prompt, which "
                    "the frames are scored against. The video is not regenerated: the gate reports.",
    )

    @property
    def family_params(self) -> dict[str, Any]:
        """The fields given beyond the common ones: the chosen model's family's own parameters."""
        return dict(self.model_extra or {})

    @classmethod
    def family_param_names(cls) -> tuple[str, ...]:
        """Deprecated: the families' parameters are no longer fields of this model; see `family_params`
        and GET /v1/models (`params`). The names the published schema documents."""
        warnings.warn("VideoRequest.family_param_names() is deprecated and goes after " + REMOVAL + ": a video "
                      "family declares its own parameters (GET /v1/models: params); a request's are "
                      "VideoRequest.family_params", DeprecationWarning, stacklevel=2)
        source = cls.family_params_source
        return tuple(video_params_schema(source())) if source is not None else ()

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("prompt must contain non-whitespace text")
        return value

    @model_validator(mode="after")
    def _image_or_prompt(self) -> "VideoRequest":
        if self.image is None and self.prompt is None:
            raise PydanticCustomError(
                "image_or_prompt", "give image (image-to-video), prompt (text-to-video), or both where the model "
                                   "takes both (ltx); neither was given",
            )
        if self.image is not None and "keyframe" in self.model_fields_set:
            raise PydanticCustomError("keyframe_without_prompt", "keyframe options apply to text-to-video (prompt) only")
        return self


class KeyframeInfo(BaseModel):
    """The keyframe text-to-video drew, scored as for images."""

    model: str
    seed: int
    prompt: str
    enhanced_prompt: str
    enhancer: str | None = Field(None, description="'llm', 'template' or 'none', as for images.")
    enhancer_fallback: str | None = None
    enhancer_dropped: list[str] = Field(default_factory=list, description="As for images.")
    prompt_advice: PromptAdviceInfo | None = None
    scores: Scores
    passed: bool
    attempts: list[Attempt]


class VideoScores(BaseModel):
    """A video's sampled frames scored as images are, and how steady it is from frame to frame."""

    sampled_frames: list[int] = Field(description="Indices of the generated frames scored (evenly spaced, before "
                                                   "interpolation; scores.video_frames of them).")
    frames: list[Scores] = Field(description="Each sampled frame's scores against the prompt; empty without a prompt.")
    mean: dict[str, float] = Field(description="The mean of each flat score over the sampled frames; empty without "
                                               "a prompt.")
    temporal_consistency: float | None = Field(
        description="Mean cosine similarity of consecutive sampled frames' CLIP image embeddings (-1 to 1; 1 for "
                    "identical frames, lower for flicker or jumps); null for a single frame."
    )
    quality_metric: Metric | None = Field(None, description="The gate's metric; null without a prompt.")
    quality_threshold: float | None = None
    passed: bool | None = Field(None, description="The mean of quality_metric is at least quality_threshold; null "
                                                  "without a prompt.")


class VideoInfo(BaseModel):
    """A generated video, without the file."""

    id: str
    created: int
    model: str = Field(description="The video model id.")
    family: str = Field(description="Its video family (svd, ltx, ...).")
    source: str = Field(description="Where its weights came from (config source).")
    mode: Literal["image-to-video", "text-to-video"]
    prompt: str | None = Field(None, description="The text the video model was conditioned on (native text-to-video, "
                                                 "or beside the image: ltx); keyframe text-to-video: see keyframe.")
    content_type: str
    output_format: str
    seed: int
    num_frames: int = Field(description="Frames in the file (after interpolation).")
    fps: int = Field(description="Frames per second of the file.")
    source_frames: int = Field(description="Frames the model generated (before interpolation).")
    source_fps: int = Field(description="Frames per second generated.")
    interpolate: int = Field(description="Interpolation factor k: num_frames = (source_frames - 1) * k + 1.")
    duration_s: float
    width: int
    height: int
    num_inference_steps: int
    params: dict[str, Any] = Field(description="The family's own parameters used (e.g. svd: motion_bucket_id).")
    keyframe: KeyframeInfo | None = Field(None, description="Set for text-to-video.")
    scores: VideoScores | None = Field(None, description="Sampled frames' scores and temporal consistency; null "
                                                         "when scores.video_frames is 0.")
    timings: dict[str, float] = Field(description="Seconds: keyframe (svd text-to-video), video, interpolate, encode, "
                                                  "score, total.")
    simulated: str | None = Field(
        None, description="The simulated device profile when the video model runs on a simulated accelerator: the "
                          "frames are placeholders and the timings modelled; null on a real device. The file's "
                          "metadata says the same.",
    )


class VideoResponse(VideoInfo):
    b64_video: str = Field(description="The file, base64-encoded.")


class ControlPreviewRequest(ControlOptions):
    """`POST /v1/controls/preview`: the control map a request with this `control` would use."""

    model: str | None = Field(
        None, description="A model id with a ControlNet of this type (GET /v1/models); default: the first deployed "
                          "model that has one."
    )
    width: int | None = Field(None, ge=256, le=2048, multiple_of=16, description="Map width; the model's default if omitted.")
    height: int | None = Field(None, ge=256, le=2048, multiple_of=16, description="Map height; the model's default if omitted.")
    response_format: Literal["json", "binary"] = Field(
        "json", description="json: base64 PNG in JSON; binary: the PNG itself (image/png)."
    )


class ControlPreviewResponse(BaseModel):
    type: ControlType
    model: str
    width: int
    height: int
    preprocessed: bool = Field(description="Whether the map was computed (false: the image was fitted only).")
    seconds: float
    b64_png: str = Field(description="The control map as a base64 PNG.")

"""Typed configuration of the model deployments.

These models are what `configs/*.yaml` feed, through `serve_app.config.AppArgs`. Every field has a
safe default and a description; validators reject impossible values with a message naming the
field, when the config is loaded rather than when a replica starts.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

TINY = "tiny"
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def validate_source(value: str) -> str:
    """A model source is `tiny`, a Hugging Face repo id (`org/name`) or a local folder path."""
    value = value.strip()
    if value == TINY or _HUB_ID.match(value):
        return value
    if value.startswith(("/", "./", "../", "~")):
        return value
    raise ValueError(
        f"source must be 'tiny', a Hugging Face repo id like 'org/name', or a local folder path "
        f"starting with '/', './', '../' or '~'; got {value!r}"
    )


ModelSource = Annotated[str, AfterValidator(validate_source)]


class DeviceOptions(_Strict):
    """Where a model runs and in which precision."""

    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="'auto' picks CUDA only when torch sees a CUDA device, else CPU."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="'auto' is bfloat16 on CUDA and float32 on CPU."
    )
    torch_threads: int | None = Field(
        None,
        ge=1,
        le=256,
        description=(
            "CPU threads torch may use in this replica. Ray sets OMP_NUM_THREADS=1 for "
            "fractional num_cpus, so set this explicitly on CPU; None keeps torch's default."
        ),
    )
    memory_fraction: float | None = Field(
        None,
        gt=0,
        le=1,
        description=(
            "Share of the CUDA device's memory this replica may allocate "
            "(torch.cuda.set_per_process_memory_fraction); applied only on CUDA. Unset, the "
            "builder sets it to the deployment's num_gpus when that is a fraction of one GPU, "
            "so a replica cannot take memory Ray gave to the others on the same card."
        ),
    )


class FluxConfig(_Strict):
    """FLUX.1-schnell: a guidance-distilled flow model, good in 1-4 steps."""

    source: ModelSource = Field(
        "black-forest-labs/FLUX.1-schnell",
        description="Hugging Face repo id, local folder (diffusers layout) or 'tiny'.",
    )
    device: DeviceOptions = Field(default_factory=DeviceOptions)
    default_width: int = Field(1024, ge=256, le=2048, multiple_of=16, description="Width when a request gives none.")
    default_height: int = Field(1024, ge=256, le=2048, multiple_of=16, description="Height when a request gives none.")
    default_steps: int = Field(4, ge=1, le=4, description="Denoising steps when a request gives none.")
    max_sequence_length: int = Field(
        256, ge=16, le=512, description="T5 prompt tokens (schnell was trained with up to 256)."
    )


class ScorerConfig(_Strict):
    """CLIP scoring of generated images."""

    source: ModelSource = Field(
        "openai/clip-vit-large-patch14",
        description="Hugging Face repo id, local folder (transformers layout) or 'tiny'.",
    )
    device: DeviceOptions = Field(default_factory=DeviceOptions)
    aesthetic_positive: str = Field(
        "a beautiful, high-quality, professional photograph",
        min_length=1,
        description="Text the aesthetic score compares each image with (the 'good' side).",
    )
    aesthetic_negative: str = Field(
        "an ugly, low-quality, amateur photograph",
        min_length=1,
        description="Text the aesthetic score compares each image with (the 'bad' side).",
    )

    @model_validator(mode="after")
    def _distinct_aesthetic_texts(self) -> "ScorerConfig":
        if self.aesthetic_positive.strip() == self.aesthetic_negative.strip():
            raise ValueError("aesthetic_positive and aesthetic_negative must differ")
        return self


class EnhancerConfig(_Strict):
    """Prompt enhancement. Only the template mode exists for now; an LLM mode will join it."""

    mode: Literal["template"] = Field("template", description="How prompts are enhanced.")
    default_style: Literal["photorealistic", "artistic", "cinematic", "anime", "none"] = Field(
        "photorealistic", description="Style used when a request names none."
    )


class SvdMemory(_Strict):
    """Memory tiers for Stable Video Diffusion, from fastest to leanest (the seed guide's tiers).

    - whole model on the GPU: `offload: none` (fastest; SVD-XT needs the most memory);
    - `offload: model`: each sub-model moves to the GPU only while it runs (accelerate);
    - `offload: sequential`: layer by layer (slowest, least memory);
    - `unet_forward_chunking`: feed-forward layers run in chunks (less peak memory, a bit slower);
    - `decode_chunk_size`: frames the VAE decodes at once (lower uses less memory).
    Offloading moves weights between CPU and GPU, so it only applies when the model runs on CUDA.
    """

    offload: Literal["none", "model", "sequential"] = Field("none", description="CPU offload tier on CUDA.")
    unet_forward_chunking: bool = Field(False, description="Chunk the UNet's feed-forward layers.")
    decode_chunk_size: int = Field(8, ge=1, le=25, description="Frames decoded at once when a request gives none.")


class SvdConfig(_Strict):
    """Stable Video Diffusion (image-to-video)."""

    source: ModelSource = Field(
        "stabilityai/stable-video-diffusion-img2vid-xt",
        description="Repo id (img2vid-xt: 25 frames; img2vid: 14 frames), local folder, or 'tiny'.",
    )
    device: DeviceOptions = Field(default_factory=DeviceOptions)
    memory: SvdMemory = Field(default_factory=SvdMemory)
    default_width: int = Field(1024, ge=256, le=2048, multiple_of=64, description="Width when a request gives none.")
    default_height: int = Field(576, ge=256, le=2048, multiple_of=64, description="Height when a request gives none.")
    default_steps: int = Field(25, ge=1, le=100, description="Denoising steps when a request gives none.")
    default_num_frames: int | None = Field(
        None, ge=2, le=25, description="Frames when a request gives none; None uses the model's own (25 or 14)."
    )


ControlType = Literal["canny", "depth"]
CONTROL_TYPES: tuple[str, ...] = ("canny", "depth")


class SdxlConfig(_Strict):
    """Stable Diffusion XL base 1.0 (classifier-free guidance, 1-50 steps), with optional ControlNets.

    The ControlNet pipelines are built from the base pipeline's own components (one UNet, one
    VAE, one pair of text encoders), so each ControlNet adds only its own weights.
    """

    source: ModelSource = Field(
        "stabilityai/stable-diffusion-xl-base-1.0",
        description="Hugging Face repo id, local folder (diffusers layout) or 'tiny'.",
    )
    device: DeviceOptions = Field(default_factory=DeviceOptions)
    controlnets: dict[ControlType, ModelSource] = Field(
        default_factory=lambda: {
            "canny": "diffusers/controlnet-canny-sdxl-1.0",
            "depth": "diffusers/controlnet-depth-sdxl-1.0",
        },
        description="ControlNet per control type (canny, depth): repo id, local folder or 'tiny'. "
                    "A type left out is refused with 422; {} serves plain text-to-image only.",
    )
    depth_estimator: ModelSource = Field(
        "depth-anything/Depth-Anything-V2-Small-hf",
        description="transformers depth-estimation model (Depth Anything, DPT such as Intel/dpt-hybrid-midas) "
                    "that turns a reference picture into a depth map; loaded only with a depth ControlNet.",
    )
    default_width: int = Field(1024, ge=256, le=2048, multiple_of=16, description="Width when a request gives none.")
    default_height: int = Field(1024, ge=256, le=2048, multiple_of=16, description="Height when a request gives none.")
    default_steps: int = Field(30, ge=1, le=50, description="Denoising steps when a request gives none.")
    default_guidance: float = Field(5.0, ge=0, le=30, description="CFG scale when a request gives none.")


class SdxlTurboConfig(SdxlConfig):
    """SDXL-Turbo: adversarially distilled SDXL, 1-4 steps without guidance (trained at 512x512).

    The SDXL ControlNets fit its UNet too; none are loaded unless listed.
    """

    source: ModelSource = Field(
        "stabilityai/sdxl-turbo", description="Hugging Face repo id, local folder (diffusers layout) or 'tiny'."
    )
    controlnets: dict[ControlType, ModelSource] = Field(
        default_factory=dict,
        description="ControlNet per control type (canny, depth); none by default.",
    )
    default_width: int = Field(512, ge=256, le=2048, multiple_of=16, description="Width when a request gives none.")
    default_height: int = Field(512, ge=256, le=2048, multiple_of=16, description="Height when a request gives none.")
    default_steps: int = Field(1, ge=1, le=4, description="Denoising steps when a request gives none.")
    default_guidance: float = Field(0.0, ge=0, le=0, description="Always 0: SDXL-Turbo runs without guidance.")

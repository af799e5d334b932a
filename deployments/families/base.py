"""What a model family declares, and what a loaded model of it does.

A family is one module with one `ImageFamily` subclass instance. It says what the rest of genserve
needs to know about that kind of model, as data: the diffusers pipeline class, the widest step and
guidance ranges, default sizes, whether a negative prompt means anything, which control types its
options enable, what its LoRA files look like, the enhancer's prompt form, its family-specific
config options, and how to build a tiny random-weight pipeline. A config entry of
`image_models:` picks a family and may narrow its limits (`ImageModelConfig.limits`).

At run time the generic `deployments.image_generator.ImageGenerator` deployment calls
`family.load(config, placement)` and gets a `LoadedImageModel`: the one object that knows how to
call this family's pipeline. Everything else a generator does (the lock, progress and cancel, LoRA
switching, metrics, info, health) is the generic deployment's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict

from deployments.runtime.types import ControlInput, EnhancedPrompt, GenerationParams, PromptForm

if TYPE_CHECKING:
    from deployments.config import AccelerationConfig, ImageModelConfig
    from deployments.runtime.loading import Placement


class NoOptions(BaseModel):
    """A family without options of its own: `options:` must be empty."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class LoraSignature:
    """How a LoRA file made for this family is recognised from its safetensors header alone.

    `metadata_prefixes`: lower-case prefixes of kohya's `ss_base_model_version` or the modelspec
    `modelspec.architecture` value. `key_prefixes` / `key_fragments`: tensor names that only this
    family's adapters have. `cross_attention_dims`: for UNet-only adapters, the width of the text
    embeddings the UNet's cross-attention takes (SD 1.x 768, SDXL 2048), read from the shape of a
    `to_k` LoRA matrix.
    """

    # Tensor-name prefixes of adapters that touch only a UNet (the family then comes from the width).
    UNET_PREFIXES = ("unet.", "lora_unet_")

    metadata_prefixes: tuple[str, ...] = ()
    key_prefixes: tuple[str, ...] = ()
    key_fragments: tuple[str, ...] = ()
    cross_attention_dims: tuple[int, ...] = ()
    # UNet-only adapters whose width no family claims are taken to be this family's.
    unet_fallback: bool = False

    def matches_metadata(self, hint: str) -> bool:
        return bool(self.metadata_prefixes) and hint.startswith(self.metadata_prefixes)

    def matches_keys(self, keys: list[str]) -> bool:
        return any(
            key.startswith(self.key_prefixes) or any(fragment in key for fragment in self.key_fragments) for key in keys
        )


@dataclass(frozen=True)
class AccelerationSupport:
    """What a family's denoiser supports of the acceleration tiers (`deployments.config.AccelerationConfig`).

    `denoiser`: the pipeline attribute compiled, quantized and cached (`transformer`, `unet`).
    `repeated_blocks`: it declares `_repeated_blocks`, so `compile: repeated_blocks` applies.
    `cache_hooks`: the diffusers cache hooks it takes (`first_block`; a UNet takes none).
    `fuse_qkv`: it has `fuse_qkv_projections`. `channels_last`: its convolutions gain from it.
    Compilation, quantization, attention backends and VAE tiling need nothing of the family.
    """

    denoiser: str = "transformer"
    repeated_blocks: bool = False
    cache_hooks: tuple[str, ...] = ()
    fuse_qkv: bool = False
    channels_last: bool = False

    def unsupported(self, tier: "AccelerationConfig") -> str | None:
        """Why this family cannot run `tier` (naming the field), or None when it can."""
        if tier.compile == "repeated_blocks" and not self.repeated_blocks:
            return f"compile: repeated_blocks: this family's {self.denoiser} declares no repeated blocks; use 'full'"
        if tier.cache is not None and tier.cache.kind not in self.cache_hooks:
            have = ", ".join(self.cache_hooks) or "none"
            return f"cache.kind: {tier.cache.kind!r} is not a cache hook this family's {self.denoiser} takes ({have})"
        if tier.fuse_qkv and not self.fuse_qkv:
            return f"fuse_qkv: this family's {self.denoiser} cannot fuse its QKV projections"
        if tier.channels_last and not self.channels_last:
            return f"channels_last: this family's {self.denoiser} has no convolutions that gain from it"
        return None


def prompt_arguments(prompts: list[EnhancedPrompt]) -> dict:
    """`prompt` and `negative_prompt` of a diffusers call for one image per prompt. A batch never
    mixes prompts with and without a negative one (it is part of the batch key): diffusers treats
    None (zero embeddings, for SDXL) differently from an empty string."""
    negatives = [prompt.negative_prompt for prompt in prompts]
    return {"prompt": [prompt.prompt for prompt in prompts],
            "negative_prompt": None if all(negative is None for negative in negatives) else
            [negative or "" for negative in negatives]}


class LoadedImageModel:
    """A family's pipeline, loaded on its device. Subclasses implement `__call__`.

    `pipeline` is the base pipeline: LoRA adapters are switched on its modules, and any other
    pipeline the family builds from it (a ControlNet one) shares those modules.
    """

    def __init__(self, family: "ImageFamily", config: "ImageModelConfig", placement: "Placement", pipeline):
        self.family = family
        self.config = config
        self.options = family.options_of(config)
        self.placement = placement
        self.pipeline = pipeline

    @property
    def control_types(self) -> tuple[str, ...]:
        return ()

    async def preprocess(self, control: ControlInput) -> ControlInput:
        """The control map of a reference picture; families with ControlNets override it."""
        raise ValueError(f"{self.config.id} has no ControlNet")

    def __call__(self, params: GenerationParams, prompts: list[EnhancedPrompt], control: ControlInput | None,
                 generators: list, callback) -> Any:
        """Run the pipeline for one batch: image i from `prompts[i]` and `generators[i]` (one per seed
        of `params.seeds`), with `num_images_per_prompt=1`; several requests batched together give
        one call (`prompt_arguments` makes the prompt arguments). Return float images (N, H, W, 3) in [0, 1]."""
        raise NotImplementedError

    def info(self) -> dict:
        """What GET /v1/models shows of this replica beyond id, family, source, device and dtype."""
        return {}


class ImageFamily:
    """One family of text-to-image models. Subclass it, set the class attributes, instantiate once.

    The class attributes are the family's widest limits; a config entry may narrow them.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    pipeline_class: ClassVar[str]
    Options: ClassVar[type[BaseModel]] = NoOptions
    min_steps: ClassVar[int] = 1
    max_steps: ClassVar[int] = 50
    default_steps: ClassVar[int] = 30
    guidance_range: ClassVar[tuple[float, float]] = (0.0, 30.0)
    default_guidance: ClassVar[float] = 0.0
    default_size: ClassVar[tuple[int, int]] = (1024, 1024)
    # Classifier-free guidance with a negative prompt (diffusers runs it above a scale of 1).
    negative_prompt: ClassVar[bool] = False
    # How the enhancer's LLM should write prompts for this family; None: the neutral form.
    prompt_form: ClassVar[PromptForm | None] = None
    # How this family's LoRA files are recognised; None: the family takes no LoRAs.
    lora: ClassVar[LoraSignature | None] = None
    loaded_class: ClassVar[type[LoadedImageModel]] = LoadedImageModel
    # Which acceleration tiers the family's denoiser supports (the config is checked against it).
    acceleration: ClassVar[AccelerationSupport] = AccelerationSupport()

    def options_of(self, config: "ImageModelConfig") -> BaseModel:
        """The entry's `options:` validated against this family's `Options` model."""
        return self.Options.model_validate(config.options)

    def control_types(self, options: BaseModel) -> tuple[str, ...]:
        """The ControlNet types a model with these options serves."""
        return ()

    def capabilities(self, options: BaseModel) -> dict:
        return {"text_to_image": True, "control_types": list(self.control_types(options)), "loras": self.lora is not None}

    def build_tiny(self, seed: int = 0, config: "ImageModelConfig | None" = None):
        """A pipeline of this family's classes with tiny random weights (tests, the dev profile);
        `config`, when given, is the entry it stands in for (a variant may differ in shape)."""
        raise NotImplementedError(f"family {self.name!r} has no tiny builder")

    def save_tiny(self, folder, seed: int = 0, config: "ImageModelConfig | None" = None) -> None:
        """Write the tiny pipeline in diffusers' layout, loadable like a hub checkpoint."""
        self.build_tiny(seed, config).save_pretrained(folder)

    def load_pipeline(self, config: "ImageModelConfig", placement: "Placement"):
        """`<pipeline_class>.from_pretrained` for hub ids and folders, `build_tiny` for 'tiny', on the device."""
        from deployments.runtime.loading import load_diffusers_pipeline

        return load_diffusers_pipeline(
            self.pipeline_class, config.source, placement, lambda: self.build_tiny(config=config)
        ).to(
            placement.device
        )

    def load(self, config: "ImageModelConfig", placement: "Placement") -> LoadedImageModel:
        """The pipeline on its device, with the entry's acceleration tier applied to the modules that
        every pipeline built from it shares (so a ControlNet pipeline gets it too)."""
        from deployments.runtime.acceleration import accelerate, check_hardware

        check_hardware(config.acceleration, placement)  # before the weights load: fail fast
        pipeline = self.load_pipeline(config, placement)
        accelerate(pipeline, config.acceleration, self.acceleration, placement)
        return self.loaded_class(self, config, placement, pipeline)

"""What a model family declares, and what a loaded model of it does.

A family is one module with one `ImageFamily` subclass instance. It says what the rest of genserve
needs to know about that kind of model, as data: the diffusers pipeline class, the widest step and
guidance ranges, default sizes, whether a negative prompt means anything, which control types its
options enable, what its LoRA files look like, the enhancer's prompt form, its family-specific
config options, which image-to-image and inpainting pipelines it has, which acceleration tiers its
denoiser supports, and how to build a tiny random-weight pipeline. A config entry of
`image_models:` picks a family and may narrow its limits (`ImageModelConfig.limits`); the config is
plain data, so the family checks the entry (`check_entry`, run when the config loads) and resolves
its limits and defaults (`step_limits`, `steps_default`, ...).

At run time the generic `deployments.image_generator.ImageGenerator` deployment calls
`family.load(config, placement)` and gets a `LoadedImageModel`: the one object that knows how to
call this family's pipeline. Everything else a generator does (the lock, progress and cancel, LoRA
switching, metrics, info, health) is the generic deployment's.
"""

from __future__ import annotations

import dataclasses
import inspect
import warnings
from dataclasses import dataclass, replace
from functools import cache
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict

from deployments.runtime.acceleration import AccelerationSupport
from deployments.runtime.types import ControlInput, EnhancedPrompt, GenerationParams, PromptForm, PromptTokenizer

if TYPE_CHECKING:
    from deployments.config import ImageModelConfig
    from deployments.runtime.loading import Placement
    from deployments.runtime.weights import WeightSource


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
    # Signatures are tried in descending precedence: a family whose adapters would also match a
    # broader family's signature (FLUX.2's "flux-2" metadata and transformer keys match FLUX.1's
    # "flux" and "transformer.") sets it above 0, so it is asked first.
    precedence: int = 0

    def matches_metadata(self, hint: str) -> bool:
        return bool(self.metadata_prefixes) and hint.startswith(self.metadata_prefixes)

    def matches_keys(self, keys: list[str]) -> bool:
        return any(
            key.startswith(self.key_prefixes) or any(fragment in key for fragment in self.key_fragments) for key in keys
        )


@dataclass(frozen=True)
class ImageCapabilities:
    """What a model of one config entry can do beyond text-to-image, computed once from its family
    and entry (`ImageFamily.capabilities_of`): the request checks and GET /v1/models both read it
    (through `serve_app.services.validation.ModelSpec`), so what is offered is what is accepted."""

    image_to_image: bool
    inpainting: bool
    control_types: tuple[str, ...]
    # Whether ControlNet guidance combines with image-to-image and inpainting.
    control_edits: bool
    loras: bool
    # How many reference images one request may condition on (0: none), and whether the prompt may
    # be an instruction that edits them ("make it night"): the family's `reference_images` and
    # `instruction_edits`.
    reference_images: int = 0
    instruction_edits: bool = False
    # What the pipeline accepts of each reference image: the shortest side in pixels and the largest
    # ratio of the sides (0: any).
    reference_min_side: int = 0
    reference_max_aspect: float = 0.0

    def public(self) -> dict:
        return {"text_to_image": True, "image_to_image": self.image_to_image, "inpainting": self.inpainting,
                "control_types": list(self.control_types), "loras": self.loras,
                "reference_images": self.reference_images, "instruction_edits": self.instruction_edits}


def derived_pipeline(class_name: str, base, **components):
    """A diffusers pipeline of `class_name` over `base`'s own modules (`from_pipe`: no weights are
    copied or loaded), with `components` added or replaced."""
    derive = getattr(base, "derive", None)  # a simulated pipeline derives its own (deployments.runtime.sim)
    if derive is not None:
        return derive(class_name)
    import diffusers

    cls = getattr(diffusers, class_name)
    if any(getattr(module, "is_quantized", False) for module in base.components.values()):
        pipeline = _constructed(cls, base, components)
    else:
        # from_pipe casts every module to its dtype argument, float32 when none is given: the base's
        # own dtype keeps a bf16 model in bf16 (its modules are shared, so a cast would double them).
        pipeline = cls.from_pipe(base, dtype=base.dtype, **components)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _constructed(cls, base, components: dict):
    """`cls` over `base`'s modules and config values, uncast: diffusers refuses to cast a quantized
    module (GGUF, NF4), which `from_pipe` always does."""
    expected, optional = cls._get_signature_keys(cls)
    accepted = set(expected) | set(optional)
    values = {key: value for key, value in base.config.items()
              if key in accepted and key not in base.components and not key.startswith("_")}
    parts = {key: module for key, module in base.components.items() if key in accepted}
    return cls(**{**values, **parts, **components})


@cache
def _call_parameters(pipeline_class: type) -> frozenset[str]:
    return frozenset(inspect.signature(pipeline_class.__call__).parameters)


def takes(pipeline, name: str) -> bool:
    """Whether `pipeline`'s `__call__` has a parameter `name` (SDXL's and SD's image-to-image
    pipelines take no width or height: the image sets the size)."""
    return name in _call_parameters(type(pipeline))


def size_arguments(pipeline, params: GenerationParams) -> dict:
    return {name: getattr(params, name) for name in ("width", "height") if takes(pipeline, name)}


def prompt_arguments(prompts: list[EnhancedPrompt], negative: bool) -> dict:
    """`prompt`, `num_images_per_prompt` and (with `negative`) `negative_prompt` of a diffusers call
    for one image per prompt. One prompt for every image (a request alone, or a batch of the same
    prompt) is passed once with `num_images_per_prompt`, as diffusers encodes it once; different
    prompts (a batch) go as lists, one per image. A batch never mixes prompts with and without a
    negative one (it is part of the batch key): diffusers treats none (SDXL: zero embeddings)
    differently from an empty one."""
    first = prompts[0]
    if all((prompt.prompt, prompt.negative_prompt) == (first.prompt, first.negative_prompt) for prompt in prompts):
        arguments = {"prompt": first.prompt, "num_images_per_prompt": len(prompts)}
        if negative:
            arguments["negative_prompt"] = first.negative_prompt
        return arguments
    arguments = {"prompt": [prompt.prompt for prompt in prompts], "num_images_per_prompt": 1}
    if negative:
        negatives = [prompt.negative_prompt for prompt in prompts]
        arguments["negative_prompt"] = None if all(text is None for text in negatives) else [text or "" for text in negatives]
    return arguments


def edit_arguments(params: GenerationParams) -> dict:
    """The image-to-image / inpainting arguments diffusers' pipelines share: `image` (one per seed),
    `strength` and, for inpainting, `mask_image` softened by `mask_blur`.

    One init image is passed once per seed: FLUX's edit pipelines sample each image's VAE latent
    with the generator of the same index, so a single image would take every image's sample from
    the first seed's generator, and image 2 of a request (or of a batch) would differ from the
    same seed alone."""
    edit = params.edit
    if edit is None:
        return {}
    from PIL import Image, ImageFilter

    images = edit.image
    image = [Image.fromarray(one) for one in images] if images.ndim == 4 else \
        [Image.fromarray(images)] * len(params.seeds)
    arguments = {"image": image, "strength": edit.strength}
    if edit.mask is not None:
        mask = Image.fromarray(edit.mask)
        if edit.mask_blur:
            mask = mask.filter(ImageFilter.GaussianBlur(edit.mask_blur))
        arguments["mask_image"] = mask
    return arguments


class LoadedModel:
    """What a loaded model of any family (image or video) holds: its family, its config entry, the
    entry's options as the family's `Options`, where it runs, and its pipeline."""

    def __init__(self, family, config, placement: "Placement", pipeline):
        self.family = family
        self.config = config
        self.options = family.options_of(config)
        self.placement = placement
        self.pipeline = pipeline


class LoadedImageModel(LoadedModel):
    """A family's pipeline, loaded on its device; a family subclasses it to add call arguments
    (`pipeline_kwargs`) or other pipelines (`__call__`).

    `pipeline` is the base pipeline: LoRA adapters are switched on its modules, and any other
    pipeline the family builds from it (a ControlNet one, the image-to-image and inpainting ones
    in `edit_pipelines`) shares those modules.
    """

    def __init__(self, family: "ImageFamily", config: "ImageModelConfig", placement: "Placement", pipeline):
        super().__init__(family, config, placement, pipeline)
        # EditInput.mode -> the pipeline that runs it, built over the base pipeline's modules.
        self.edit_pipelines = {
            mode: derived_pipeline(class_name, pipeline)
            for mode, class_name in (("image-to-image", family.img2img_pipeline_class),
                                     ("inpainting", family.inpaint_pipeline_class))
            if class_name is not None
        }

    def pipeline_for(self, params: GenerationParams):
        """The base pipeline, or the image-to-image / inpainting one when `params.edit` is set."""
        return self.pipeline if params.edit is None else self.edit_pipelines[params.edit.mode]

    @property
    def control_types(self) -> tuple[str, ...]:
        return ()

    async def preprocess(self, control: ControlInput) -> ControlInput:
        """The control map of a reference picture; families with ControlNets override it."""
        raise ValueError(f"{self.config.id} has no ControlNet")

    def pipeline_kwargs(self, pipeline, params: GenerationParams, prompts: list[EnhancedPrompt], generators: list,
                        callback) -> dict:
        """The arguments every pipeline call of `pipeline` takes (text-to-image, image-to-image and
        inpainting alike); families add their own."""
        return dict(
            **prompt_arguments(prompts, self.family.negative_prompt),
            **size_arguments(pipeline, params),
            num_inference_steps=params.num_inference_steps,
            guidance_scale=params.guidance_scale,
            generator=generators,
            output_type="np",
            callback_on_step_end=callback,
            **edit_arguments(params),
        )

    def __call__(self, params: GenerationParams, prompts: list[EnhancedPrompt], control: ControlInput | None,
                 generators: list, callback) -> Any:
        """Run the pipeline for one call: image i from `prompts[i]` and `generators[i]` (one per seed
        of `params.seeds`); several requests batched together make one call (`prompt_arguments`
        builds the prompt arguments). Return float images (N, H, W, 3) in [0, 1]."""
        pipeline = self.pipeline_for(params)
        return pipeline(**self.pipeline_kwargs(pipeline, params, prompts, generators, callback)).images

    def latent_image(self, latents, params: GenerationParams):
        """The pipeline's in-loop latents as (B, C, h, w); families that pack them override this."""
        return latents

    def preview(self, latents, params: GenerationParams):
        """An approximate RGB picture (h, w, 3) of the first image being denoised, or None."""
        from deployments.runtime.previews import latent_rgb

        factors = self.family.preview_factors
        if factors is None:
            return None
        return latent_rgb(self.latent_image(latents, params), factors, self.family.preview_bias)

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
    # The text encoders' tokenizers a prompt must fit (subfolder, tokens kept); the enhancer counts with them.
    prompt_tokenizers: ClassVar[tuple[PromptTokenizer, ...]] = ()
    # How this family's LoRA files are recognised; None: the family takes no LoRAs.
    lora: ClassVar[LoraSignature | None] = None
    loaded_class: ClassVar[type[LoadedImageModel]] = LoadedImageModel
    # Image-to-image and inpainting: diffusers pipeline classes built from the loaded base pipeline
    # (`from_pipe`, so no weights are loaded twice); None: the family cannot (422 naming the field).
    img2img_pipeline_class: ClassVar[str | None] = None
    inpaint_pipeline_class: ClassVar[str | None] = None
    # Whether ControlNet guidance combines with image-to-image and inpainting.
    control_edits: ClassVar[bool] = False
    # Reference images: how many the base pipeline conditions one call on (`GenerationParams.references`,
    # which the family's `pipeline_kwargs` passes on); 0: none (422 naming `reference_images`).
    reference_images: ClassVar[int] = 0
    # Whether the prompt may be an instruction that edits the reference images ("make it night"),
    # so an edit needs no mask and no strength (OpenAI's /v1/images/edits without a mask uses it).
    instruction_edits: ClassVar[bool] = False
    # Each reference image's shortest side in pixels and largest ratio of the sides (0: any).
    reference_min_side: ClassVar[int] = 0
    reference_max_aspect: ClassVar[float] = 0.0
    # Denoising previews: latent channel -> RGB factors (C x 3) and bias for the family's VAE latents,
    # as ComfyUI's latent previews publish them; None: no previews for this family.
    preview_factors: ClassVar[tuple[tuple[float, float, float], ...] | None] = None
    preview_bias: ClassVar[tuple[float, float, float]] = (0.0, 0.0, 0.0)
    # The weight variant published for a dtype (dtype name -> variant, e.g. float16 -> fp16):
    # `genserve download` fetches it and loading asks for it when it is on disk. 16-bit weights
    # halve the download and host memory; fp16 weights loaded as bf16 lose nothing bf16 keeps.
    weight_variants: ClassVar[dict[str, str]] = {}
    # Which acceleration tiers the family's denoiser supports (the config is checked against it).
    acceleration: ClassVar[AccelerationSupport] = AccelerationSupport()
    # The denoiser's diffusers class, for quantized loading (memory.weights gguf_* and nf4); None: only
    # native and fp8 weights. `gguf` says whether diffusers reads a GGUF checkpoint of it.
    denoiser_class: ClassVar[str | None] = None
    gguf: ClassVar[bool] = False

    def weight_sources(self, config: "ImageModelConfig") -> list["WeightSource"]:
        """Every set of weights a deployment of this entry loads (`genserve download` fetches them)."""
        from deployments.runtime.weights import WeightSource, variant_for

        sources = [WeightSource(f"{config.id} pipeline", config.source, "diffusers-pipeline",
                                variant_for(self.weight_variants, config.device.dtype))]
        repo, filename = config.memory.gguf_location()
        if config.memory.gguf_file and repo is not None:
            sources.append(WeightSource(f"{config.id} GGUF denoiser", repo, "file", filename=filename))
        return sources

    def prompt_form_of(self, config: "ImageModelConfig") -> PromptForm | None:
        """The prompt form for an entry: the family's, with its tokenizers loaded from the entry's source.
        A simulated entry (`sim:<profile>`) has no files to read them from: its prompt is not fitted."""
        if self.prompt_form is None:
            return None
        if config.device.simulated is not None:
            return dataclasses.replace(self.prompt_form, tokenizers=())
        tokenizers = tuple(dataclasses.replace(tokenizer, source=config.source) for tokenizer in self.prompt_tokenizers)
        return dataclasses.replace(self.prompt_form, tokenizers=tokenizers)

    def options_of(self, config: "ImageModelConfig") -> BaseModel:
        """The entry's `options:` validated against this family's `Options` model."""
        return self.Options.model_validate(config.options)

    # An entry's limits and defaults: its own where it sets them, else this family's.

    def step_limits(self, config: "ImageModelConfig") -> tuple[int, int]:
        return (config.limits.min_steps or self.min_steps, config.limits.max_steps or self.max_steps)

    def guidance_limits(self, config: "ImageModelConfig") -> tuple[float, float]:
        low, high = self.guidance_range
        limits = config.limits
        return (low if limits.min_guidance is None else limits.min_guidance,
                high if limits.max_guidance is None else limits.max_guidance)

    def steps_default(self, config: "ImageModelConfig") -> int:
        low, high = self.step_limits(config)
        return config.default_steps if config.default_steps is not None else min(max(self.default_steps, low), high)

    def guidance_default(self, config: "ImageModelConfig") -> float:
        low, high = self.guidance_limits(config)
        if config.default_guidance is not None:
            return config.default_guidance
        return min(max(self.default_guidance, low), high)

    def size_default(self, config: "ImageModelConfig") -> tuple[int, int]:
        width, height = self.default_size
        return (config.default_width or width, config.default_height or height)

    def check_entry(self, config: "ImageModelConfig") -> None:
        """Raise ValueError, naming the field, where the entry does not fit this family: its options,
        limits and defaults, acceleration tier and warm-up steps. `AppArgs` runs it when the config loads."""
        try:
            self.options_of(config)
        except ValueError as error:  # pydantic's ValidationError, naming the option
            raise ValueError(f"options for family {self.name!r}: {error}") from None
        self._check_limits(config)
        if config.device.simulated is not None:  # a simulated device models a published architecture
            from deployments.runtime.sim.flops import architecture_for

            architecture_for(config.source)
        unsupported = self.acceleration.unsupported(config.acceleration)
        if unsupported:
            raise ValueError(f"acceleration: {unsupported}")
        self._check_memory(config)
        low, high = self.step_limits(config)
        for index, shape in enumerate(config.warmup.shapes):
            if shape.steps is not None and not low <= shape.steps <= high:
                raise ValueError(f"warmup.shapes.{index}.steps ({shape.steps}) must lie within the limits, {low}-{high}")

    def _check_memory(self, config: "ImageModelConfig") -> None:
        weights = config.memory.weights
        if weights.startswith("gguf") and not self.gguf:
            raise ValueError(f"memory.weights {weights!r}: the {self.name} family loads no GGUF checkpoints "
                             "(flux does); use 'fp8' or 'nf4'")
        if weights == "nf4" and self.denoiser_class is None:
            raise ValueError(f"memory.weights 'nf4': the {self.name} family does not say its denoiser's class")
        if weights != "native" and config.acceleration.quantization != "none":
            raise ValueError(f"memory.weights {weights!r} and acceleration.quantization "
                             f"{config.acceleration.quantization!r} both quantize the denoiser: pick one")

    def _check_limits(self, config: "ImageModelConfig") -> None:
        low, high = self.step_limits(config)
        if not self.min_steps <= low <= high <= self.max_steps:
            raise ValueError(f"limits: steps {low}-{high} must lie within the {self.name} family's "
                             f"{self.min_steps}-{self.max_steps}, min not above max")
        glow, ghigh = self.guidance_limits(config)
        flow, fhigh = self.guidance_range
        if not flow <= glow <= ghigh <= fhigh:
            raise ValueError(f"limits: guidance {glow:g}-{ghigh:g} must lie within the {self.name} family's "
                             f"{flow:g}-{fhigh:g}, min not above max")
        if not low <= self.steps_default(config) <= high:
            raise ValueError(f"default_steps ({config.default_steps}) must lie within the limits, {low}-{high}")
        if not glow <= self.guidance_default(config) <= ghigh:
            raise ValueError(f"default_guidance ({config.default_guidance:g}) must lie within the limits, "
                             f"{glow:g}-{ghigh:g}")

    def control_types(self, options: BaseModel) -> tuple[str, ...]:
        """The ControlNet types a model with these options serves."""
        return ()

    def capabilities_of(self, config: "ImageModelConfig") -> ImageCapabilities:
        """What a model of this entry can do: the family's pipelines, narrowed by the entry's options
        (its ControlNets) and acceleration tier."""
        capabilities = self._capabilities(self.options_of(config), config.acceleration.fuse_qkv)
        if config.device.simulated is not None:  # a simulated device does not model adapters: 422, not a 500
            capabilities = replace(capabilities, loras=False)
        return capabilities

    def capabilities(self, options: BaseModel) -> dict:
        """Deprecated (goes after 2027-03-01): `capabilities_of(entry).public()`. Options alone do not
        say the entry's acceleration tier, so this assumes none (LoRAs where a fuse_qkv entry has none)."""
        warnings.warn("ImageFamily.capabilities(options) is deprecated: use capabilities_of(entry), which knows "
                      "the entry's acceleration (the old path goes after 2027-03-01)", DeprecationWarning, stacklevel=2)
        return self._capabilities(options, fuse_qkv=False).public()

    def _capabilities(self, options: BaseModel, fuse_qkv: bool) -> ImageCapabilities:
        return ImageCapabilities(
            image_to_image=self.img2img_pipeline_class is not None,
            inpainting=self.inpaint_pipeline_class is not None,
            control_types=tuple(self.control_types(options)),
            control_edits=self.control_edits,
            # Fused QKV projections leave the separate ones a LoRA patches unused: no LoRAs then.
            loras=self.lora is not None and not fuse_qkv,
            reference_images=self.reference_images,
            instruction_edits=self.instruction_edits and self.reference_images > 0,
            reference_min_side=self.reference_min_side,
            reference_max_aspect=self.reference_max_aspect,
        )

    def build_tiny(self, seed: int = 0, config: "ImageModelConfig | None" = None):
        """A pipeline of this family's classes with tiny random weights (tests, the dev profile);
        `config`, when given, is the entry it stands in for (a variant may differ in shape)."""
        raise NotImplementedError(f"family {self.name!r} has no tiny builder")

    def save_tiny(self, folder, seed: int = 0, config: "ImageModelConfig | None" = None) -> None:
        """Write the tiny pipeline in diffusers' layout, loadable like a hub checkpoint."""
        self.build_tiny(seed, config).save_pretrained(folder)

    def load_pipeline(self, config: "ImageModelConfig", placement: "Placement"):
        """`<pipeline_class>.from_pretrained` for hub ids and folders (its denoiser quantized as
        `memory.weights` says), `build_tiny` for 'tiny'; on the CPU (`load` places it)."""
        from deployments.runtime.loading import load_diffusers_pipeline, quantized_denoiser
        from deployments.runtime.weights import local_variant

        variant = local_variant(config.source, self.weight_variants.get(placement.dtype_name))
        denoiser = self.acceleration.denoiser
        components = ({} if config.memory.weights in ("native", "fp8") else
                      quantized_denoiser(denoiser, self.denoiser_class, config.source, config.memory, placement))
        return load_diffusers_pipeline(
            self.pipeline_class, config.source, placement, lambda: self.build_tiny(config=config), variant, **components)

    def load_simulated(self, config: "ImageModelConfig", placement: "Placement"):
        """The pipeline-like stand-in of a simulated device: the published architecture of `source`,
        modelled (deployments.runtime.sim). ControlNets are not modelled."""
        from deployments.runtime.sim.pipeline import load_simulated

        if self.control_types(self.options_of(config)):
            raise ValueError(f"options: {config.id} names ControlNets, which a simulated device does not model")
        return load_simulated(self, config, placement)

    def load(self, config: "ImageModelConfig", placement: "Placement") -> LoadedImageModel:
        """The pipeline on its device, with the entry's VAE settings and acceleration tier applied to
        the modules that every pipeline built from it shares (ControlNet, image-to-image and
        inpainting pipelines get them too)."""
        from deployments.runtime.acceleration import accelerate, check_hardware
        from deployments.runtime.loading import on_demand_in_host, place_pipeline, store_weights

        check_hardware(config.acceleration, placement)  # before the weights load: fail fast
        if placement.simulated is not None:
            return self.loaded_class(self, config, placement, self.load_simulated(config, placement))
        pipeline = self.load_pipeline(config, placement)
        store_weights(pipeline, self.acceleration.denoiser, config.memory.weights, placement)
        if not on_demand_in_host(config):  # an on-demand model waits in host RAM: its holder moves it in
            pipeline = place_pipeline(pipeline, config.memory.offload, placement)
        vae = getattr(pipeline, "vae", None)
        if vae is not None and config.vae.slicing and hasattr(vae, "enable_slicing"):
            vae.enable_slicing()
        if vae is not None and config.vae.tiling and hasattr(vae, "enable_tiling"):
            vae.enable_tiling()
        accelerate(pipeline, config.acceleration, self.acceleration, placement)
        return self.loaded_class(self, config, placement, pipeline)

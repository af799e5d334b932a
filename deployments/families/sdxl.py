"""Stable Diffusion XL (base, Turbo, fine-tunes), plain or guided by a ControlNet.

The same family serves SDXL base 1.0 (classifier-free guidance, ~30 steps), SDXL-Turbo (1-4 steps,
no guidance: `limits: {max_steps: 4, max_guidance: 0}`) and any SDXL fine-tune in diffusers layout.

The ControlNet pipelines are built from the base pipeline's own components
(`StableDiffusionXLControlNetPipeline(**base.components, controlnet=...)`), so the UNet, the VAE and
both text encoders are loaded once and shared: a ControlNet adds only its own weights. Anything
applied to the base pipeline's modules (LoRA adapters on its UNet or text encoders, say) applies
to the ControlNet path too. Image-to-image and inpainting, plain or with a ControlNet, are
pipelines built the same way (`from_pipe`), so they share every module too.

Control maps are made here, where the depth estimator lives (`preprocess`): canny edges with
OpenCV, depth with a transformers depth-estimation model loaded once per replica.
"""

from __future__ import annotations

import asyncio
import dataclasses

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from deployments.config import ModelSource
from deployments.families.base import (
    AccelerationSupport,
    ImageFamily,
    LoadedImageModel,
    LoraSignature,
    derived_pipeline,
)
from deployments.names import CONTROL_TYPES, ControlType
from deployments.runtime.loading import Placement, is_tiny, pretrained_location
from deployments.runtime.types import ControlInput, PromptForm, PromptTokenizer


class SdxlOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    controlnets: dict[ControlType, ModelSource] = Field(
        default_factory=dict,
        description="ControlNet per control type (canny, depth): repo id, local folder or 'tiny'. A type left "
                    "out is refused with 422; none (the default) serves plain text-to-image only. SDXL's are "
                    "diffusers/controlnet-canny-sdxl-1.0 and diffusers/controlnet-depth-sdxl-1.0.",
    )
    depth_estimator: ModelSource = Field(
        "depth-anything/Depth-Anything-V2-Small-hf",
        description="transformers depth-estimation model (Depth Anything, DPT such as Intel/dpt-hybrid-midas) "
                    "that turns a reference picture into a depth map; loaded only with a depth ControlNet.",
    )


def load_controlnet(kind: str, source: str, placement: Placement):
    """A `ControlNetModel` from a repo id or folder (safetensors only, the dtype's variant when it
    was downloaded), or the tiny one for `tiny`."""
    if is_tiny(source):
        return build_tiny_sdxl_controlnet(kind=kind).to(dtype=placement.dtype)
    from diffusers import ControlNetModel

    from deployments.runtime.weights import local_variant

    variant = local_variant(source, FAMILY.weight_variants.get(placement.dtype_name))
    return ControlNetModel.from_pretrained(pretrained_location(source), dtype=placement.dtype, use_safetensors=True,
                                           variant=variant)


def controlnet_pipeline(base, controlnet):
    """A StableDiffusionXLControlNetPipeline over `base`'s own modules (no second UNet, VAE or text encoder)."""
    from diffusers import StableDiffusionXLControlNetPipeline

    pipeline = StableDiffusionXLControlNetPipeline(
        **base.components,
        controlnet=controlnet,
        force_zeros_for_empty_prompt=base.config.force_zeros_for_empty_prompt,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def canny_map(image: np.ndarray, low_threshold: int, high_threshold: int) -> np.ndarray:
    """OpenCV's Canny edges of an RGB uint8 image (gradients over all three channels, as the
    A1111 ControlNet and diffusers examples compute them), white on black, as (H, W, 3) uint8."""
    import cv2

    edges = cv2.Canny(np.ascontiguousarray(image), low_threshold, high_threshold)
    return np.repeat(edges[:, :, None], 3, axis=2)


class DepthEstimator:
    """A transformers depth-estimation model (DPT, Depth Anything) and its image processor.

    `estimate` returns relative depth as a grey (H, W, 3) uint8 image at the input's size, near
    bright and far dark (the models predict inverse depth), scaled to the full 0-255 range.
    """

    def __init__(self, source: str, placement: Placement):
        if is_tiny(source):
            from deployments.runtime.tiny import build_tiny_depth

            parts = build_tiny_depth()
            model, processor = parts["model"].to(dtype=placement.dtype), parts["image_processor"]
        else:
            from transformers import AutoImageProcessor, AutoModelForDepthEstimation

            location = pretrained_location(source)
            model = AutoModelForDepthEstimation.from_pretrained(location, dtype=placement.dtype, use_safetensors=True)
            processor = AutoImageProcessor.from_pretrained(location)
        self.model = model.to(placement.device).eval()
        self.processor = processor
        self._placement = placement

    def estimate(self, image: np.ndarray) -> np.ndarray:
        import torch
        from PIL import Image

        height, width = image.shape[:2]
        inputs = self.processor(images=Image.fromarray(image), return_tensors="pt")
        pixels = inputs["pixel_values"].to(self._placement.device, self._placement.dtype)
        with torch.inference_mode():
            depth = self.model(pixel_values=pixels).predicted_depth
            depth = torch.nn.functional.interpolate(
                depth[:, None].float(), size=(height, width), mode="bicubic", align_corners=False
            )[0, 0]
            low, high = depth.min(), depth.max()
            scaled = (depth - low) / (high - low) if high > low else torch.zeros_like(depth)
            grey = (scaled.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
        return np.repeat(grey[:, :, None], 3, axis=2)


class LoadedSdxl(LoadedImageModel):
    def __init__(self, family, config, placement, pipeline):
        super().__init__(family, config, placement, pipeline)
        controlnets = self.options.controlnets
        self.controlled = {
            kind: controlnet_pipeline(pipeline, load_controlnet(kind, source, placement).to(placement.device))
            for kind, source in controlnets.items()
        }
        # (control type, EditInput.mode) -> the ControlNet image-to-image / inpainting pipeline.
        self.controlled_edits = {
            (kind, mode): derived_pipeline(class_name, controlled)
            for kind, controlled in self.controlled.items()
            for mode, class_name in (("image-to-image", "StableDiffusionXLControlNetImg2ImgPipeline"),
                                     ("inpainting", "StableDiffusionXLControlNetInpaintPipeline"))
        }
        self.depth = DepthEstimator(self.options.depth_estimator, placement) if "depth" in controlnets else None
        # The depth estimator has its own lock, so a map can be made while another request denoises.
        self._depth_lock = asyncio.Lock()

    @property
    def control_types(self) -> tuple[str, ...]:
        return tuple(kind for kind in CONTROL_TYPES if kind in self.controlled)

    async def preprocess(self, control: ControlInput) -> ControlInput:
        if control.type not in self.controlled:
            raise ValueError(f"{self.config.id} has no {control.type!r} ControlNet; it has {sorted(self.controlled)}")
        if not control.preprocess:
            return control
        if control.type == "canny":
            result = await asyncio.to_thread(canny_map, control.image, control.low_threshold, control.high_threshold)
        else:
            async with self._depth_lock:
                result = await asyncio.to_thread(self.depth.estimate, control.image)
        return dataclasses.replace(control, image=result, preprocess=False)

    def __call__(self, params, prompts, control, generators, callback):
        from PIL import Image

        if control is None:
            return super().__call__(params, prompts, control, generators, callback)
        edit = params.edit
        pipeline = self.controlled[control.type] if edit is None else self.controlled_edits[(control.type, edit.mode)]
        kwargs = self.pipeline_kwargs(pipeline, params, prompts, generators, callback)
        # The ControlNet edit pipelines take the init image as `image` and the map as `control_image`.
        kwargs["image" if edit is None else "control_image"] = Image.fromarray(control.image)
        kwargs["controlnet_conditioning_scale"] = control.conditioning_scale
        return pipeline(**kwargs).images

    def info(self) -> dict:
        return {
            "controlnets": dict(self.options.controlnets),
            "depth_estimator": self.options.depth_estimator if self.depth is not None else None,
        }


class SdxlFamily(ImageFamily):
    name = "sdxl"
    description = "Stable Diffusion XL: UNet with two CLIP text encoders; classifier-free guidance, ControlNets."
    pipeline_class = "StableDiffusionXLPipeline"
    Options = SdxlOptions
    min_steps, max_steps, default_steps = 1, 50, 30
    guidance_range = (0.0, 30.0)
    default_guidance = 5.0
    negative_prompt = True
    loaded_class = LoadedSdxl
    img2img_pipeline_class = "StableDiffusionXLImg2ImgPipeline"
    inpaint_pipeline_class = "StableDiffusionXLInpaintPipeline"
    control_edits = True
    acceleration = AccelerationSupport(denoiser="unet", repeated_blocks=True, fuse_qkv=True, channels_last=True)
    prompt_tokenizers = (PromptTokenizer("tokenizer", 77), PromptTokenizer("tokenizer_2", 77))
    denoiser_class = "UNet2DConditionModel"
    # SDXL's CLIP encoders respond to short comma-separated tags.
    prompt_form = PromptForm(
        instructions="Write a comma-separated list of short tags (at most 40 words): subject first, then details, "
                     "lighting, style and quality tags.",
        examples=(
            ("a cat on a windowsill | photorealistic",
             "ginger tabby cat, curled up on wooden windowsill, morning sunlight, blurred garden background, "
             "professional photography, shallow depth of field, sharp focus, highly detailed"),
            ("castle in the mountains | artistic",
             "stone castle, snowy mountain ridge, golden hour, violet sky, glowing towers, digital concept art, "
             "vibrant colors, detailed illustration"),
        ),
    )
    # SDXL's 4-channel VAE latents (published by ComfyUI's latent previews).
    preview_factors = ((0.3651, 0.4232, 0.4341), (-0.2533, -0.0042, 0.1068), (0.1076, 0.1111, -0.0362),
                       (-0.3165, -0.2492, -0.2188))
    preview_bias = (0.1084, -0.0175, -0.0011)
    lora = LoraSignature(
        metadata_prefixes=("sdxl", "stable-diffusion-xl"),
        key_prefixes=("text_encoder_2.", "lora_te2_", "lora_te1_"),
        cross_attention_dims=(2048,),
        unet_fallback=True,
    )

    # SDXL base, its ControlNets and Turbo publish fp16 files beside the fp32 ones.
    weight_variants = {"float16": "fp16", "bfloat16": "fp16"}

    def control_types(self, options: SdxlOptions) -> tuple[str, ...]:
        return tuple(kind for kind in CONTROL_TYPES if kind in options.controlnets)

    def weight_sources(self, config):
        from deployments.runtime.weights import WeightSource, variant_for

        options = self.options_of(config)
        variant = variant_for(self.weight_variants, config.device.dtype)
        sources = super().weight_sources(config)
        sources += [WeightSource(f"{config.id} {kind} ControlNet", source, "diffusers-model", variant)
                    for kind, source in options.controlnets.items()]
        if "depth" in options.controlnets:
            sources.append(WeightSource(f"{config.id} depth estimator", options.depth_estimator, "transformers"))
        return sources

    def build_tiny(self, seed: int = 0, config=None):
        return build_tiny_sdxl(seed)


FAMILY = SdxlFamily()


def _tiny_sdxl_unet():
    """SDXL's UNet layout in miniature: `text_time` added conditioning (pooled text embeds plus the
    six size/crop numbers), cross-attention on both text encoders' hidden states side by side."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=6 * 8 + 32,  # six time ids x 8, plus text_encoder_2's projection
        cross_attention_dim=64, norm_num_groups=8,  # text_encoder (32) + text_encoder_2 (32) hidden states
    )


def build_tiny_sdxl(seed: int = 0):
    """A StableDiffusionXLPipeline with the real component classes and tiny random weights.

    The VAE keeps SDXL's 8x downsampling, so a 256x256 request costs a 32x32 latent as it would
    with the real model (and a ControlNet's conditioning embedding downsamples its map 8x too).
    """
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from deployments.runtime.tiny import clip_text_config, eval_mode, seeded, tiny_clip_tokenizer, tiny_vae

    rng = seeded(seed)
    try:
        tokenizer = tiny_clip_tokenizer()
        tokenizer_2 = tiny_clip_tokenizer()
        text_encoder = CLIPTextModel(clip_text_config(tokenizer))
        text_encoder_2 = CLIPTextModelWithProjection(clip_text_config(tokenizer_2))
        unet = _tiny_sdxl_unet()
        vae = tiny_vae(scaling_factor=0.13025)
    finally:
        rng.__exit__(None, None, None)
    eval_mode(text_encoder, text_encoder_2, unet, vae)
    # The scheduler settings of the released SDXL base checkpoint.
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        prediction_type="epsilon", steps_offset=1, timestep_spacing="leading",
    )
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler,
    )


def build_tiny_sdxl_controlnet(seed: int = 0, kind: str = "canny"):
    """A ControlNetModel for the tiny SDXL UNet: `ControlNetModel.from_unet` copies the UNet's
    encoder (as real ControlNets start), then a random conditioning embedding that downsamples
    the control map 8x, like the VAE. `kind` only varies the seed, so canny and depth differ."""
    import torch
    from diffusers import ControlNetModel

    from deployments.runtime.tiny import eval_mode, seeded

    unet = build_tiny_sdxl(seed).unet
    rng = seeded(seed + 1 + ("canny", "depth").index(kind))
    try:
        controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 8, 8))
        # A new ControlNet's zero convolutions (after the map's embedding and on each output) start
        # at zero, so it changes nothing until trained; random ones make the tiny model's control
        # map visible in its images, as a trained one's is.
        zero_convs = [controlnet.controlnet_cond_embedding.conv_out, *controlnet.controlnet_down_blocks,
                      controlnet.controlnet_mid_block]
        for conv in zero_convs:
            torch.nn.init.normal_(conv.weight, std=0.2)
    finally:
        rng.__exit__(None, None, None)
    eval_mode(controlnet)
    return controlnet



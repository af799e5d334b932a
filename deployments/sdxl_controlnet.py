"""Stable Diffusion XL (base or Turbo) text-to-image, plain or guided by a ControlNet.

One deployment class serves both model ids: `sdxl` (SdxlGenerator, from `sdxl:` in the config) and
`sdxl-turbo` (the same class bound as SdxlTurboGenerator, from `sdxl_turbo:`).

The ControlNet pipelines are built from the base pipeline's own components
(`StableDiffusionXLControlNetPipeline(**base.components, controlnet=...)`), so the UNet, the VAE and
both text encoders are loaded once and shared: a ControlNet adds only its own weights. Anything
applied to the base pipeline's modules (LoRA adapters on its UNet or text encoders, say) applies
to the ControlNet path too.

Control maps are made here, where the depth estimator lives (`preprocess`): canny edges with
OpenCV, depth with a transformers depth-estimation model loaded once per replica.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

import numpy as np
from ray import serve

from deployments.config import SdxlConfig
from deployments.loading import (
    Placement,
    check_device_health,
    is_tiny,
    load_diffusers_pipeline,
    pretrained_location,
    resolve_placement,
    seeded_generators,
    to_uint8_images,
)
from deployments.lora import LoraManager
from deployments.metrics import ModelMetrics
from deployments.progress import StepMonitor, run_interruptibly
from deployments.types import ControlInput, EnhancedPrompt, GenerationOutput, GenerationParams

logger = logging.getLogger("ray.serve")


def load_sdxl_pipeline(config: SdxlConfig, placement: Placement):
    """`StableDiffusionXLPipeline.from_pretrained` for repo ids and folders; the tiny factory for `tiny`."""
    from deployments.tiny import build_tiny_sdxl

    return load_diffusers_pipeline("StableDiffusionXLPipeline", config.source, placement, build_tiny_sdxl)


def load_controlnet(kind: str, source: str, placement: Placement):
    """A `ControlNetModel` from a repo id or folder (safetensors only), or the tiny one for `tiny`."""
    if is_tiny(source):
        from deployments.tiny import build_tiny_sdxl_controlnet

        return build_tiny_sdxl_controlnet(kind=kind).to(dtype=placement.dtype)
    from diffusers import ControlNetModel

    return ControlNetModel.from_pretrained(pretrained_location(source), dtype=placement.dtype, use_safetensors=True)


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
            from deployments.tiny import build_tiny_depth

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


@serve.deployment(name="SdxlGenerator", max_ongoing_requests=4, ray_actor_options={"num_cpus": 1})
class SdxlGenerator:
    """Generates images with SDXL (classifier-free guidance: negative prompt and guidance_scale
    apply) or SDXL-Turbo, optionally following a canny or depth ControlNet.

    As in FluxGenerator, one batch runs at a time per replica behind an asyncio lock, in a worker
    thread, stoppable at the end of a step and reporting steps to a job runner. The depth
    estimator has its own lock, so a map can be made while another request denoises.
    """

    def __init__(self, config: SdxlConfig, model_id: str = "sdxl", metrics: bool = True, lora_cache_size: int = 8):
        self._config = config
        self._model_id = model_id
        self._placement = resolve_placement(config.device)
        self._metrics = ModelMetrics(model_id, self._placement.device, enabled=metrics)
        started = time.perf_counter()
        self._pipeline = load_sdxl_pipeline(config, self._placement).to(self._placement.device)
        self._controlled = {
            kind: controlnet_pipeline(self._pipeline, load_controlnet(kind, source, self._placement).to(self._placement.device))
            for kind, source in config.controlnets.items()
        }
        self._depth = DepthEstimator(config.depth_estimator, self._placement) if "depth" in config.controlnets else None
        # One manager, on the base pipeline: the ControlNet pipelines share its UNet and text
        # encoders, so the adapters it switches apply (or not) to both paths alike.
        self._loras = LoraManager(self._pipeline, lora_cache_size)
        self._lock = asyncio.Lock()
        self._depth_lock = asyncio.Lock()
        logger.info(
            "%s loaded from %s with ControlNets %s on %s/%s in %.1fs", model_id, config.source,
            sorted(config.controlnets) or "none", self._placement.device, self._placement.dtype_name,
            time.perf_counter() - started,
        )

    def _check_control(self, control: ControlInput) -> None:
        if control.type not in self._controlled:
            raise ValueError(f"{self._model_id} has no {control.type!r} ControlNet; it has {sorted(self._controlled)}")

    async def preprocess(self, control: ControlInput) -> ControlInput:
        """The control map of `control`'s reference image (unchanged when it is a map already)."""
        self._check_control(control)
        if not control.preprocess:
            return control
        if control.type == "canny":
            result = await asyncio.to_thread(canny_map, control.image, control.low_threshold, control.high_threshold)
        else:
            async with self._depth_lock:
                result = await asyncio.to_thread(self._depth.estimate, control.image)
        return dataclasses.replace(control, image=result, preprocess=False)

    async def generate(self, params: GenerationParams, prompt: EnhancedPrompt) -> GenerationOutput:
        """One image per seed, guided by `params.control` when set (its map is made first if needed)."""
        control = params.control
        if control is not None:
            if control.image.shape[:2] != (params.height, params.width):
                raise ValueError(
                    f"the control image is {control.image.shape[1]}x{control.image.shape[0]}, "
                    f"not the requested {params.width}x{params.height}"
                )
            control = await self.preprocess(control)
        monitor = StepMonitor(params.progress, params.num_inference_steps)
        async with self._lock:
            return await run_interruptibly(lambda: self._generate(params, prompt, control, monitor), monitor)

    def _generate(self, params: GenerationParams, prompt: EnhancedPrompt, control: ControlInput | None,
                  monitor: StepMonitor) -> GenerationOutput:
        import torch
        from PIL import Image

        self._loras.apply(params.loras)  # before the monitor starts: loading is not a denoising step
        pipeline, extra = self._pipeline, {}
        if control is not None:
            pipeline = self._controlled[control.type]
            extra = {"image": Image.fromarray(control.image),
                     "controlnet_conditioning_scale": control.conditioning_scale}
        started = time.perf_counter()
        monitor.started()
        with self._metrics.track(), torch.inference_mode():
            result = pipeline(
                prompt=prompt.prompt,
                negative_prompt=prompt.negative_prompt,
                width=params.width,
                height=params.height,
                num_inference_steps=params.num_inference_steps,
                guidance_scale=params.guidance_scale,
                num_images_per_prompt=len(params.seeds),
                generator=seeded_generators(params.seeds, self._placement.device),
                output_type="np",
                callback_on_step_end=monitor,
                **extra,
            )
        return GenerationOutput(
            images=to_uint8_images(result.images),
            seeds=list(params.seeds),
            model=self._model_id,
            seconds=time.perf_counter() - started,
            device=self._placement.device,
            dtype=self._placement.dtype_name,
        )

    def info(self) -> dict:
        return {
            "id": self._model_id,
            "family": "sdxl",
            "source": self._config.source,
            "controlnets": dict(self._config.controlnets),
            "depth_estimator": self._config.depth_estimator if self._depth is not None else None,
            "device": self._placement.device,
            "dtype": self._placement.dtype_name,
            "memory_fraction": self._placement.memory_fraction,
            "loras_loaded": self._loras.loaded(),
        }

    def check_health(self) -> None:
        check_device_health(self._placement)


"""The one image generator deployment: it serves any `image_models:` entry, whatever its family.

The builder binds it once per entry, named after the model id (`serve_app.config.generator_name`).
What differs between families (pipeline classes, call arguments, ControlNets) is the family's
`LoadedImageModel` (`deployments.families`); what every generator has is here.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

import numpy as np

from ray import serve

from deployments.config import ImageModelConfig
from deployments.runtime.loading import check_device_health, resolve_placement, seeded_generators, to_uint8_images
from deployments.runtime.lora import LoraManager
from deployments.runtime.metrics import ModelMetrics
from deployments.runtime.progress import StepMonitor, run_interruptibly
from deployments.runtime.types import ControlInput, EditInput, EnhancedPrompt, GenerationOutput, GenerationParams

logger = logging.getLogger("ray.serve")

WARMUP_PROMPT = EnhancedPrompt(prompt="warm-up", negative_prompt=None, style="none", enhancer="none")


@serve.deployment(name="ImageGenerator", max_ongoing_requests=4, ray_actor_options={"num_cpus": 1})
class ImageGenerator:
    """Generates images with one model of any family.

    A diffusers pipeline keeps scheduler state and is not safe under concurrent calls, so each
    replica runs one batch at a time behind an asyncio lock; the pipeline itself runs in a worker
    thread so the replica's event loop keeps answering health checks meanwhile. Extra requests
    wait in the lock's FIFO queue (at most `max_ongoing_requests` per replica; the rest queue at
    Serve's router, where autoscaling sees them).

    A cancelled request stops at the end of its current denoising step (`deployments.runtime.progress`);
    with `params.progress` set, each step is reported to a job runner. LoRA adapters named in
    `params.loras` are loaded on first use and kept (at most `lora_cache_size`); each call turns on
    exactly its own adapters, or none (`deployments.runtime.lora`).

    With `params.edit` the family's image-to-image or inpainting pipeline runs; inpainting with
    `preserve_unmasked` then pastes the input's pixels back outside the mask. With `params.hires`
    the images are upscaled (Lanczos) and refined by image-to-image in the same call, under the
    same lock, so the scorer sees the final images.

    Before the constructor returns (so before Serve sees the replica healthy), the model's
    acceleration tier is applied and the declared warm-up shapes run, so no user pays for
    compilation or a first call; the whole cold start is a metric and part of `info()`.
    """

    def __init__(self, config: ImageModelConfig, metrics: bool = True, lora_cache_size: int = 8):
        self._config = config
        self._family = config.model_family
        self._placement = resolve_placement(config.device)
        self._metrics = ModelMetrics(config.id, self._placement.device, enabled=metrics)
        started = time.perf_counter()
        self._model = self._family.load(config, self._placement)
        loaded = time.perf_counter()
        # One manager, on the base pipeline: pipelines the family builds from it (ControlNet ones)
        # share its modules, so the adapters it switches apply (or not) to every path alike.
        self._loras = LoraManager(self._model.pipeline, lora_cache_size)
        self._lock = asyncio.Lock()
        self._warmup_shapes = self._warm_up()
        self._cold_start = {"load_s": round(loaded - started, 3), "warmup_s": round(time.perf_counter() - loaded, 3)}
        self._metrics.record_cold_start(time.perf_counter() - started)
        logger.info(
            "%s (%s) loaded from %s on %s/%s in %.1fs, warmed up (%d shapes) in %.1fs; acceleration: %s",
            config.id, self._family.name, config.source, self._placement.device, self._placement.dtype_name,
            self._cold_start["load_s"], len(self._warmup_shapes), self._cold_start["warmup_s"],
            config.acceleration.active() or "none",
        )

    def _warm_up(self) -> list[dict]:
        """Run the declared warm-up shapes once each (compiling, if the tier compiles); text-to-image,
        no LoRA, no progress target."""
        config, warmup = self._config, self._config.warmup
        width, height = config.size_default()
        shapes = [{"width": width, "height": height, "steps": config.steps_default(), "images": 1}] \
            if warmup.default_shape else []
        shapes += [{"width": shape.width, "height": shape.height, "steps": shape.steps or config.steps_default(),
                    "images": shape.images} for shape in warmup.shapes]
        for shape in shapes:
            params = GenerationParams(seeds=list(range(shape["images"])), width=shape["width"],
                                      height=shape["height"], num_inference_steps=shape["steps"],
                                      guidance_scale=config.guidance_default())
            self._generate(params, WARMUP_PROMPT, None, StepMonitor(None, params.total_steps()))
        return shapes

    async def preprocess(self, control: ControlInput) -> ControlInput:
        """The control map of `control`'s reference image (unchanged when it is a map already)."""
        return await self._model.preprocess(control)

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
        edit = params.edit
        if edit is not None and edit.image.shape[-3:-1] != (params.height, params.width):
            raise ValueError(f"the init image is {edit.image.shape[-2]}x{edit.image.shape[-3]}, "
                             f"not the requested {params.width}x{params.height}")
        monitor = StepMonitor(params.progress, params.total_steps())
        async with self._lock:
            return await run_interruptibly(lambda: self._generate(params, prompt, control, monitor), monitor)

    def _generate(self, params: GenerationParams, prompt: EnhancedPrompt, control: ControlInput | None,
                  monitor: StepMonitor) -> GenerationOutput:
        import torch

        self._loras.apply(params.loras)  # before the monitor starts: loading is not a denoising step
        started = time.perf_counter()
        monitor.started()
        timings = {}
        with self._metrics.track(), torch.inference_mode():
            images = self._run(params, prompt, control, monitor)
            if params.hires is not None:
                first_pass = time.perf_counter()
                timings["first_pass"] = first_pass - started
                control = hires_control(params, control)
                images = self._run(hires_params(params, images, control), prompt, control, monitor)
                timings["hires"] = time.perf_counter() - first_pass
        return GenerationOutput(
            images=images,
            seeds=list(params.seeds),
            model=self._config.id,
            seconds=time.perf_counter() - started,
            device=self._placement.device,
            dtype=self._placement.dtype_name,
            timings=timings,
        )

    def _run(self, params: GenerationParams, prompt: EnhancedPrompt, control: ControlInput | None,
             monitor: StepMonitor) -> np.ndarray:
        """One pipeline call as uint8 images, the input's pixels pasted back outside an inpainting mask."""
        monitor.steps_before = monitor.steps_done
        monitor.preview = lambda latents: self._model.preview(latents, params)  # this call's size
        images = to_uint8_images(
            self._model(params, prompt, control, seeded_generators(params.seeds), monitor)
        )
        edit = params.edit
        if edit is not None and edit.mask is not None and edit.preserve_unmasked:
            images = paste_unmasked(images, edit)
        return images

    def info(self) -> dict:
        config = self._config
        return {
            "id": config.id,
            "family": self._family.name,
            "source": config.source,
            "device": self._placement.device,
            "dtype": self._placement.dtype_name,
            "memory_fraction": self._placement.memory_fraction,
            "loras_loaded": self._loras.loaded(),
            # The active tier: only what differs from plain eager ({} when nothing does).
            "acceleration": config.acceleration.active(),
            "warmup_shapes": self._warmup_shapes,
            "cold_start": self._cold_start,
            **self._model.info(),
        }

    def check_health(self) -> None:
        check_device_health(self._placement)


def paste_unmasked(images: np.ndarray, edit: EditInput) -> np.ndarray:
    """`images` with `edit.image`'s pixels wherever the (unblurred) mask is 0, as AUTOMATIC1111's
    inpainting does: the VAE round trip would otherwise change every pixel a little."""
    keep = (edit.mask == 0)[None, :, :, None]
    return np.where(keep, edit.image, images).astype(np.uint8)


def _lanczos(image: np.ndarray, width: int, height: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.LANCZOS), dtype=np.uint8)


def hires_params(params: GenerationParams, images: np.ndarray, control: ControlInput | None) -> GenerationParams:
    """The second pass of a hires request: image-to-image over the first pass's images, upscaled."""
    hires = params.hires
    upscaled = np.stack([_lanczos(image, hires.width, hires.height) for image in images])
    return dataclasses.replace(
        params, width=hires.width, height=hires.height, num_inference_steps=hires.steps,
        edit=EditInput(image=upscaled, strength=hires.strength), hires=None, control=control,
    )


def hires_control(params: GenerationParams, control: ControlInput | None) -> ControlInput | None:
    """The control map at the second pass's size (the ControlNet guides both passes)."""
    if control is None:
        return None
    hires = params.hires
    return dataclasses.replace(control, image=_lanczos(control.image, hires.width, hires.height))

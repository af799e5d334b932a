"""The one image generator deployment: it serves any `image_models:` entry, whatever its family.

The builder binds it once per entry, named after the model id (`serve_app.config.generator_name`).
What differs between families (pipeline classes, call arguments, ControlNets) is the family's
`LoadedImageModel` (`deployments.families`); what every generator has is here.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import time

import numpy as np
from ray import serve

from deployments.config import IMAGE_GENERATOR_MAX_ONGOING_REQUESTS, ImageModelConfig
from deployments.families import get_family
from deployments.generator_base import GeneratorBase
from deployments.runtime.loading import in_serve_replica, seeded_generators, to_uint8_images
from deployments.runtime.lora import LoraManager
from deployments.runtime.progress import BatchMonitor, StepMonitor, run_interruptibly
from deployments.runtime.types import ControlInput, EditInput, EnhancedPrompt, GenerationOutput, GenerationParams

logger = logging.getLogger("ray.serve")

WARMUP_PROMPT = EnhancedPrompt(prompt="warm-up", negative_prompt=None, style="none", enhancer="none")


def _digest(array: np.ndarray | None) -> str | None:
    return None if array is None else hashlib.blake2b(np.ascontiguousarray(array).tobytes(), digest_size=16).hexdigest()


@dataclasses.dataclass
class _Pending:
    """One request waiting for the pipeline, with its own monitor (progress target, stop flag) and
    its control map already made."""

    params: GenerationParams
    prompt: EnhancedPrompt
    control: ControlInput | None
    monitor: StepMonitor

    @property
    def images(self) -> int:
        return len(self.params.seeds)

    def key(self) -> tuple:
        """Requests with equal keys can share a pipeline call: everything the call takes once for
        the whole batch. That is the size, steps and guidance; the LoRA set and scales; the control
        (type, scale, map); the edit (mode, strength, mask blur and paste-back, init image and mask);
        the hires pass; the reference images; and whether a negative prompt is given (diffusers treats
        none and an empty one differently). Prompts and seeds are per image."""
        params, control, edit = self.params, self.control, self.params.edit
        loras = tuple((lora.name, lora.location, lora.weight_name, lora.revision, lora.scale) for lora in params.loras)
        control_key = None if control is None else (
            control.type, control.conditioning_scale, control.image.shape, _digest(control.image))
        edit_key = None if edit is None else (
            edit.mode, edit.strength, edit.mask_blur, edit.preserve_unmasked, edit.image.shape, _digest(edit.image),
            _digest(edit.mask))
        references = tuple((image.shape, _digest(image)) for image in params.references)
        return (params.width, params.height, params.num_inference_steps, params.guidance_scale, loras, control_key,
                edit_key, params.hires, references, self.prompt.negative_prompt is None)


def _images_in(batch: list[_Pending]) -> int:
    return sum(pending.images for pending in batch)


@serve.deployment(name="ImageGenerator", max_ongoing_requests=IMAGE_GENERATOR_MAX_ONGOING_REQUESTS, ray_actor_options={"num_cpus": 1})
class ImageGenerator(GeneratorBase):
    """Generates images with one model of any family.

    A diffusers pipeline keeps scheduler state and is not safe under concurrent calls, so each
    replica runs one pipeline call at a time behind an asyncio lock; the pipeline itself runs in a
    worker thread so the replica's event loop keeps answering health checks meanwhile. Extra
    requests wait in the lock's FIFO queue (at most `max_ongoing_requests` per replica; the rest
    queue at Serve's router, where autoscaling sees them).

    With `batching.enabled`, requests go through Ray Serve's `@serve.batch` instead: those that
    arrive within `wait_ms` and share a batch key (`_Pending.key`) run as one pipeline call of at
    most `max_batch_images` images; different keys run as separate calls, so text-to-image,
    image-to-image, inpainting, hires and ControlNet requests never mix unless everything the call
    takes once is the same. Each image keeps its own seed's generator, so a seed gives the same
    image batched or alone (up to the float rounding of a larger matmul; docs/acceleration.md
    states the measured tolerance).

    A cancelled request stops at the end of its current denoising step (`deployments.runtime.progress`);
    in a batch, its result is dropped and the others go on. With `params.progress` set, each step
    is reported to a job runner, and each request of a batch gets its own steps and previews. LoRA adapters named in
    `params.loras` are loaded on first use and kept (at most `lora_cache_size`); each call turns on
    exactly its own adapters, or none (`deployments.runtime.lora`).

    With `params.edit` the family's image-to-image or inpainting pipeline runs; inpainting with
    `preserve_unmasked` then pastes the input's pixels back outside the mask. With `params.hires`
    the images are upscaled (Lanczos) and refined by image-to-image in the same call, under the
    same lock, so the scorer sees the final images.

    Before the constructor returns (so before Serve sees the replica healthy), the model's
    acceleration tier is applied and the declared warm-up shapes run, so no user pays for
    compilation or a first call; the whole cold start is a metric and part of `info()`
    (`deployments.generator_base`, shared with the video generator).
    """

    _family_of = staticmethod(get_family)

    def __init__(self, config: ImageModelConfig, metrics: bool = True, lora_cache_size: int = 8):
        self._load(config, metrics)
        # One manager, on the base pipeline: pipelines the family builds from it (ControlNet ones)
        # share its modules, so the adapters it switches apply (or not) to every path alike.
        self._loras = LoraManager(self._model.pipeline, lora_cache_size)
        batching = config.batching
        if batching.enabled and not in_serve_replica():
            # Serve's batch queue reads its replica's settings; in process (a benchmark's stand-in) requests
            # simply take turns.
            logger.info("%s: request batching runs in a Serve replica only; off in this process", config.id)
        # Built per instance: Serve's batch queue belongs to the function it decorates, and two
        # generators in one process must not share one.
        self._batched = serve.batch(
            max_batch_size=batching.max_batch_images, batch_wait_timeout_s=batching.wait_ms / 1000,
            batch_size_fn=_images_in,
        )(self._run_batch) if batching.enabled and in_serve_replica() else None
        self._ready(f"acceleration: {config.acceleration.active() or 'none'}")

    def _warmup_shapes(self) -> list[dict]:
        """The default shape (the model's default size and steps, one image) unless switched off,
        then each of `warmup.shapes`."""
        config, warmup = self._config, self._config.warmup
        width, height = self._family.size_default(config)
        shapes = [{"width": width, "height": height, "steps": self._family.steps_default(config), "images": 1}] \
            if warmup.default_shape else []
        return shapes + [{"width": shape.width, "height": shape.height, "steps": shape.steps or self._family.steps_default(config),
                          "images": shape.images} for shape in warmup.shapes]

    def _warm(self, shape: dict) -> None:
        """One text-to-image call of `shape` (compiling, if the tier compiles); no LoRA."""
        params = GenerationParams(seeds=list(range(shape["images"])), width=shape["width"], height=shape["height"],
                                  num_inference_steps=shape["steps"], guidance_scale=self._family.guidance_default(self._config))
        monitor = StepMonitor(None, params.total_steps())
        self._generate([_Pending(params, WARMUP_PROMPT, None, monitor)], monitor)

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
        pending = _Pending(params, prompt, control, StepMonitor(params.progress, params.total_steps()))
        if self._batched is not None and pending.images <= self._config.batching.max_batch_images:
            try:
                result = await self._batched(pending)
            except asyncio.CancelledError:
                pending.monitor.stop.set()  # the batch goes on for the others; this result is dropped
                raise
            if isinstance(result, BaseException):
                raise result
            return result
        async with self._lock:
            async with await self._on_card(pending.monitor.loading):
                outputs = await run_interruptibly(lambda: self._generate([pending], pending.monitor), pending.monitor)
        return self._with_move(outputs)[0]

    async def _run_batch(self, batch: list[_Pending]) -> list[GenerationOutput | BaseException]:
        """Serve's batch handler: one pipeline call per batch key, in the arrival order of each key's
        first request. Returns each request's output or its exception (a failing key fails only its
        own requests)."""
        groups: dict[tuple, list[int]] = {}
        for index, pending in enumerate(batch):
            groups.setdefault(pending.key(), []).append(index)
        results: list = [None] * len(batch)
        async with self._lock, await self._on_card(lambda: [pending.monitor.loading() for pending in batch]):
            for indices in groups.values():
                group = [batch[index] for index in indices]
                monitor = group[0].monitor if len(group) == 1 else BatchMonitor(
                    [pending.monitor for pending in group], [pending.images for pending in group])
                try:
                    outputs = self._with_move(await asyncio.to_thread(self._generate, group, monitor))
                except Exception as error:  # Interrupted too: every request of the group was cancelled
                    outputs = [error] * len(group)
                for index, output in zip(indices, outputs):
                    results[index] = output
        return results

    def _with_move(self, outputs: list[GenerationOutput]) -> list[GenerationOutput]:
        """The seconds an on-demand model took to move onto the GPU for this call, in each output's timings."""
        if self._holder is not None and self._holder.last_move_s:
            for output in outputs:
                output.timings["move_in"] = round(self._holder.last_move_s, 3)
        return outputs

    def _generate(self, group: list[_Pending], monitor: StepMonitor | BatchMonitor) -> list[GenerationOutput]:
        """One pipeline call (two with hires) for requests of one batch key: image i has its own
        prompt and seed; the outputs are split back per request, in order."""
        import torch

        first = group[0]
        self._loras.apply(first.params.loras)  # before the monitor starts: loading is not a denoising step
        prompts = [pending.prompt for pending in group for _ in pending.params.seeds]
        params = dataclasses.replace(first.params, seeds=[seed for pending in group for seed in pending.params.seeds],
                                     progress=None)
        control = first.control
        started = time.perf_counter()
        monitor.started()
        timings = {}
        with self._metrics.track(), torch.inference_mode():
            images = self._run(params, prompts, control, monitor)
            if params.hires is not None:
                first_pass = time.perf_counter()
                timings["first_pass"] = first_pass - started
                control = hires_control(params, control)
                images = self._run(hires_params(params, images, control), prompts, control, monitor)
                timings["hires"] = time.perf_counter() - first_pass
        seconds = time.perf_counter() - started
        outputs, offset = [], 0
        for pending in group:
            outputs.append(GenerationOutput(
                images=images[offset:offset + pending.images], seeds=list(pending.params.seeds),
                model=self._config.id, seconds=seconds, device=self._placement.device,
                dtype=self._placement.dtype_name, timings=dict(timings),
                share_seconds=seconds * pending.images / len(prompts) if len(group) > 1 else None,
            ))
            offset += pending.images
        return outputs

    def _run(self, params: GenerationParams, prompts: list[EnhancedPrompt], control: ControlInput | None,
             monitor: StepMonitor | BatchMonitor) -> np.ndarray:
        """One pipeline call as uint8 images, the input's pixels pasted back outside an inpainting mask."""
        # Each request's preview is of its own first image, at this call's size.
        monitor.begin_pass(lambda latents, index: self._model.preview(latents[index:index + 1], params))
        images = to_uint8_images(
            self._model(params, prompts, control, seeded_generators(params.seeds), monitor)
        )
        edit = params.edit
        if edit is not None and edit.mask is not None and edit.preserve_unmasked:
            images = paste_unmasked(images, edit)
        return images

    def info(self) -> dict:
        config = self._config
        return {
            **super().info(),
            "loras_loaded": self._loras.loaded(),
            # The active tier: only what differs from plain eager ({} when nothing does).
            "acceleration": config.acceleration.active(),
            "batching": config.batching.model_dump() if config.batching.enabled else None,
        }


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

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

from ray import serve

from deployments.config import ImageModelConfig
from deployments.runtime.loading import check_device_health, resolve_placement, seeded_generators, to_uint8_images
from deployments.runtime.lora import LoraManager
from deployments.runtime.metrics import ModelMetrics
from deployments.runtime.progress import BatchMonitor, StepMonitor, run_interruptibly
from deployments.runtime.types import ControlInput, EnhancedPrompt, GenerationOutput, GenerationParams

WARMUP_PROMPT = EnhancedPrompt(prompt="warm-up", negative_prompt=None, style="none", enhancer="none")


@dataclasses.dataclass
class _Pending:
    """One request waiting in the batch queue, with its own monitor (progress target, stop flag)."""

    params: GenerationParams
    prompt: EnhancedPrompt
    control: ControlInput | None
    monitor: StepMonitor | None

    @property
    def images(self) -> int:
        return len(self.params.seeds)

    def key(self) -> tuple:
        """Requests with equal keys can share a pipeline call: everything the call takes once for
        the whole batch (size, steps, guidance, LoRA set and scales, control type, map and scale);
        prompts and seeds are per image. A request with a negative prompt and one without never
        mix (see `prompt_arguments`)."""
        params, control = self.params, self.control
        loras = tuple((lora.name, lora.location, lora.weight_name, lora.revision, lora.scale) for lora in params.loras)
        control_key = None if control is None else (
            control.type, control.conditioning_scale, control.image.shape,
            hashlib.blake2b(control.image.tobytes(), digest_size=16).hexdigest(),
        )
        return (params.width, params.height, params.num_inference_steps, params.guidance_scale, loras, control_key,
                self.prompt.negative_prompt is None)


def _images_in(batch: list[_Pending]) -> int:
    return sum(pending.images for pending in batch)

logger = logging.getLogger("ray.serve")


@serve.deployment(name="ImageGenerator", max_ongoing_requests=4, ray_actor_options={"num_cpus": 1})
class ImageGenerator:
    """Generates images with one model of any family.

    A diffusers pipeline keeps scheduler state and is not safe under concurrent calls, so each
    replica runs one pipeline call at a time behind an asyncio lock; the pipeline itself runs in a
    worker thread so the replica's event loop keeps answering health checks meanwhile. Extra
    requests wait in the lock's FIFO queue (at most `max_ongoing_requests` per replica; the rest
    queue at Serve's router, where autoscaling sees them).

    With `batching.enabled`, requests go through Ray Serve's `@serve.batch` instead: those that
    arrive within `wait_ms` and share a batch key (`_Pending.key`) run as one pipeline call of at
    most `max_batch_images` images; different keys run as separate calls. Each image keeps its
    own seed's generator, so a seed gives the same image batched or alone (up to the float
    rounding of a larger matmul; docs/acceleration.md states the measured tolerance).

    A cancelled request stops at the end of its current denoising step (`deployments.runtime.progress`);
    in a batch, its result is dropped and the others go on. With `params.progress` set, each step
    is reported to a job runner. LoRA adapters named in `params.loras` are loaded on first use and
    kept (at most `lora_cache_size`); each call turns on exactly its own adapters, or none
    (`deployments.runtime.lora`).

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
        batching = config.batching
        # Built per instance: Serve's batch queue belongs to the function it decorates, and two
        # generators in one process (the in-process benchmark, tests) must not share one.
        self._batched = serve.batch(
            max_batch_size=batching.max_batch_images, batch_wait_timeout_s=batching.wait_ms / 1000,
            batch_size_fn=_images_in,
        )(self._run_batch) if batching.enabled else None
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
        """Run the declared warm-up shapes once each (compiling, if the tier compiles)."""
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
            self._generate([_Pending(params, WARMUP_PROMPT, None, None)], None)
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
        pending = _Pending(params, prompt, control, StepMonitor(params.progress, params.num_inference_steps))
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
            return (await run_interruptibly(lambda: self._generate([pending], pending.monitor), pending.monitor))[0]

    async def _run_batch(self, batch: list[_Pending]) -> list[GenerationOutput | BaseException]:
        """Serve's batch handler: one pipeline call per batch key, in arrival order of each key's
        first request. Returns each request's output or its exception (one failing key fails only
        its own requests)."""
        groups: dict[tuple, list[int]] = {}
        for index, pending in enumerate(batch):
            groups.setdefault(pending.key(), []).append(index)
        results: list = [None] * len(batch)
        async with self._lock:
            for indices in groups.values():
                group = [batch[index] for index in indices]
                monitor = BatchMonitor([pending.monitor for pending in group])
                try:
                    outputs = await asyncio.to_thread(self._generate, group, monitor)
                except Exception as error:  # Interrupted too: every request of the group was cancelled
                    outputs = [error] * len(group)
                for index, output in zip(indices, outputs):
                    results[index] = output
        return results

    def _generate(self, group: list[_Pending], monitor) -> list[GenerationOutput]:
        """One pipeline call for requests of one batch key: image i has its own prompt and seed."""
        import torch

        first = group[0]
        self._loras.apply(first.params.loras)  # before the monitor starts: loading is not a denoising step
        seeds = [seed for pending in group for seed in pending.params.seeds]
        prompts = [pending.prompt for pending in group for _ in pending.params.seeds]
        params = dataclasses.replace(first.params, seeds=seeds, progress=None)
        started = time.perf_counter()
        if monitor is not None:
            monitor.started()
        with self._metrics.track(), torch.inference_mode():
            images = self._model(params, prompts, first.control, seeded_generators(seeds, self._placement.device),
                                 monitor)
        images = to_uint8_images(images)
        seconds = time.perf_counter() - started
        outputs, offset = [], 0
        for pending in group:
            count = pending.images
            outputs.append(GenerationOutput(
                images=images[offset:offset + count], seeds=list(pending.params.seeds), model=self._config.id,
                seconds=seconds, device=self._placement.device, dtype=self._placement.dtype_name,
            ))
            offset += count
        return outputs

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
            "batching": config.batching.model_dump() if config.batching.enabled else None,
            "warmup_shapes": self._warmup_shapes,
            "cold_start": self._cold_start,
            **self._model.info(),
        }

    def check_health(self) -> None:
        check_device_health(self._placement)

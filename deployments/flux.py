"""FLUX.1-schnell text-to-image deployment."""

from __future__ import annotations

import asyncio
import logging
import time

from ray import serve

from deployments.config import FluxConfig
from deployments.lora import LoraManager
from deployments.loading import (
    check_device_health,
    load_diffusers_pipeline,
    resolve_placement,
    seeded_generators,
    to_uint8_images,
)
from deployments.metrics import ModelMetrics
from deployments.progress import StepMonitor, run_interruptibly
from deployments.types import EnhancedPrompt, GenerationOutput, GenerationParams

logger = logging.getLogger("ray.serve")

MODEL_ID = "flux-schnell"


def load_flux_pipeline(config: FluxConfig, placement):
    """`FluxPipeline.from_pretrained` for repo ids and folders; the tiny factory for `tiny`."""
    from deployments.tiny import build_tiny_flux

    return load_diffusers_pipeline("FluxPipeline", config.source, placement, build_tiny_flux).to(placement.device)


@serve.deployment(name="FluxGenerator", max_ongoing_requests=4, ray_actor_options={"num_cpus": 1})
class FluxGenerator:
    """Generates images with FLUX.1-schnell (guidance-distilled: no CFG, 1-4 steps).

    A diffusers pipeline keeps scheduler state and is not safe under concurrent calls, so each
    replica runs one batch at a time behind an asyncio lock; the pipeline itself runs in a worker
    thread so the replica's event loop keeps answering health checks meanwhile. Extra requests
    wait in the lock's FIFO queue (at most `max_ongoing_requests` per replica; the rest queue at
    Serve's router, where autoscaling sees them).

    A cancelled request stops at the end of its current denoising step (see
    `deployments.progress`); with `params.progress` set, each step is reported to a job runner.

    LoRA adapters named in `params.loras` are loaded on first use and kept (at most
    `lora_cache_size`); each call turns on exactly its own adapters, or none (`deployments.lora`).
    """

    def __init__(self, config: FluxConfig, metrics: bool = True, lora_cache_size: int = 8):
        self._config = config
        self._placement = resolve_placement(config.device)
        self._metrics = ModelMetrics(MODEL_ID, self._placement.device, enabled=metrics)
        started = time.perf_counter()
        self._pipeline = load_flux_pipeline(config, self._placement)
        self._loras = LoraManager(self._pipeline, lora_cache_size)
        self._lock = asyncio.Lock()
        logger.info(
            "FLUX loaded from %s on %s/%s in %.1fs",
            config.source, self._placement.device, self._placement.dtype_name, time.perf_counter() - started,
        )

    async def generate(self, params: GenerationParams, prompt: EnhancedPrompt) -> GenerationOutput:
        """One image per seed. FLUX.1-schnell runs without guidance, so the negative prompt is unused."""
        monitor = StepMonitor(params.progress, params.num_inference_steps)
        async with self._lock:
            return await run_interruptibly(lambda: self._generate(params, prompt.prompt, monitor), monitor)

    def _generate(self, params: GenerationParams, prompt: str, monitor: StepMonitor) -> GenerationOutput:
        import torch

        started = time.perf_counter()
        self._loras.apply(params.loras)  # before the monitor starts: loading is not a denoising step
        monitor.started()
        with self._metrics.track(), torch.inference_mode():
            result = self._pipeline(
                prompt=prompt,
                width=params.width,
                height=params.height,
                num_inference_steps=params.num_inference_steps,
                guidance_scale=params.guidance_scale,
                num_images_per_prompt=len(params.seeds),
                generator=seeded_generators(params.seeds, self._placement.device),
                max_sequence_length=self._config.max_sequence_length,
                output_type="np",
                callback_on_step_end=monitor,
            )
        return GenerationOutput(
            images=to_uint8_images(result.images),
            seeds=list(params.seeds),
            model=MODEL_ID,
            seconds=time.perf_counter() - started,
            device=self._placement.device,
            dtype=self._placement.dtype_name,
        )

    def info(self) -> dict:
        return {
            "id": MODEL_ID,
            "family": "flux",
            "source": self._config.source,
            "device": self._placement.device,
            "dtype": self._placement.dtype_name,
            "memory_fraction": self._placement.memory_fraction,
            "loras_loaded": self._loras.loaded(),
        }

    def check_health(self) -> None:
        check_device_health(self._placement)

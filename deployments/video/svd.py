"""Stable Video Diffusion image-to-video deployment."""

from __future__ import annotations

import asyncio
import logging
import time

import numpy as np
from ray import serve

from deployments.config import SvdConfig
from deployments.runtime.loading import (
    check_device_health,
    load_diffusers_pipeline,
    resolve_placement,
    seeded_generators,
    to_uint8_images,
)
from deployments.runtime.metrics import ModelMetrics
from deployments.runtime.weights import WeightSource, local_variant, variant_for
from deployments.runtime.progress import StepMonitor, run_interruptibly
from deployments.runtime.types import VideoOutput, VideoParams
from deployments.video.encoding import CONTENT_TYPES, encode_video

logger = logging.getLogger("ray.serve")


# Stable Video Diffusion's repos publish fp16 files beside the fp32 ones (dtype name -> variant).
SVD_WEIGHT_VARIANTS = {"float16": "fp16", "bfloat16": "fp16"}


def svd_weight_sources(config: SvdConfig) -> list[WeightSource]:
    return [WeightSource("video (SVD) pipeline", config.source, "diffusers-pipeline",
                         variant_for(SVD_WEIGHT_VARIANTS, config.device.dtype))]


def load_svd_pipeline(config: SvdConfig, placement):
    """`StableVideoDiffusionPipeline.from_pretrained` for repo ids and folders; tiny for `tiny`."""
    from deployments.tiny import build_tiny_svd

    variant = local_variant(config.source, SVD_WEIGHT_VARIANTS.get(placement.dtype_name))
    pipeline = load_diffusers_pipeline("StableVideoDiffusionPipeline", config.source, placement, build_tiny_svd, variant)
    memory = config.memory
    if memory.unet_forward_chunking:
        pipeline.unet.enable_forward_chunking()
    if placement.device == "cuda" and memory.offload == "model":
        pipeline.enable_model_cpu_offload()
    elif placement.device == "cuda" and memory.offload == "sequential":
        pipeline.enable_sequential_cpu_offload()
    else:
        if memory.offload != "none":
            logger.warning("offload %r applies to CUDA only; on %s the model already lives in host memory",
                           memory.offload, placement.device)
        pipeline = pipeline.to(placement.device)
    return pipeline


@serve.deployment(name="SvdGenerator", max_ongoing_requests=2, ray_actor_options={"num_cpus": 1})
class SvdGenerator:
    """Animates one image into a short video and encodes it (MP4, GIF or WebP).

    One run at a time per replica (the pipeline is not safe under concurrent calls); encoding
    happens after the lock is released, so the next video starts denoising meanwhile. The video
    deployment is separate from the image ones, so long video runs never hold an image replica.
    A cancelled request stops at the end of its current denoising step, and with
    `params.progress` set each step is reported (see `deployments.runtime.progress`).
    """

    def __init__(self, config: SvdConfig, metrics: bool = True):
        self._config = config
        self._placement = resolve_placement(config.device)
        self._metrics = ModelMetrics("svd", self._placement.device, enabled=metrics)
        started = time.perf_counter()
        self._pipeline = load_svd_pipeline(config, self._placement)
        self._lock = asyncio.Lock()
        logger.info("SVD loaded from %s on %s/%s in %.1fs", config.source, self._placement.device,
                    self._placement.dtype_name, time.perf_counter() - started)

    @property
    def model_num_frames(self) -> int:
        return int(self._pipeline.unet.config.num_frames)

    async def animate(self, params: VideoParams, image: np.ndarray) -> VideoOutput:
        """uint8 (H, W, 3) image at the video's size -> encoded video."""
        if params.output_format not in CONTENT_TYPES:
            raise ValueError(f"output_format must be one of {sorted(CONTENT_TYPES)}; got {params.output_format!r}")
        monitor = StepMonitor(params.progress, params.num_inference_steps)
        async with self._lock:
            started = time.perf_counter()
            frames = await run_interruptibly(lambda: self._frames(params, image, monitor), monitor)
            generated = time.perf_counter() - started
        fps = params.fps
        encode_started = time.perf_counter()
        metadata = {**params.metadata, "seed": params.seed, "num_frames": len(frames), "fps": fps,
                    "motion_bucket_id": params.motion_bucket_id, "noise_aug_strength": params.noise_aug_strength,
                    "num_inference_steps": params.num_inference_steps, "model": self._config.source}
        data = await asyncio.to_thread(encode_video, frames, fps, params.output_format, metadata)
        return VideoOutput(
            data=data,
            content_type=CONTENT_TYPES[params.output_format],
            num_frames=len(frames),
            fps=fps,
            width=frames.shape[2],
            height=frames.shape[1],
            seed=params.seed,
            generate_seconds=generated,
            encode_seconds=time.perf_counter() - encode_started,
            device=self._placement.device,
        )

    def _frames(self, params: VideoParams, image: np.ndarray, monitor: StepMonitor) -> np.ndarray:
        import torch
        from PIL import Image

        if image.shape != (params.height, params.width, 3):
            raise ValueError(f"image must be {params.height}x{params.width}x3; got {image.shape}")
        monitor.started()
        with self._metrics.track(), torch.inference_mode():
            result = self._pipeline(
                image=Image.fromarray(image),
                width=params.width,
                height=params.height,
                num_frames=params.num_frames or self._config.default_num_frames or self.model_num_frames,
                num_inference_steps=params.num_inference_steps,
                fps=params.fps,
                motion_bucket_id=params.motion_bucket_id,
                noise_aug_strength=params.noise_aug_strength,
                decode_chunk_size=params.decode_chunk_size or self._config.memory.decode_chunk_size,
                generator=seeded_generators([params.seed])[0],
                output_type="np",
                callback_on_step_end=monitor,
            )
        return to_uint8_images(result.frames[0])

    def info(self) -> dict:
        return {
            "id": "svd",
            "family": "svd",
            "source": self._config.source,
            "device": self._placement.device,
            "dtype": self._placement.dtype_name,
            "memory_fraction": self._placement.memory_fraction,
            "default_num_frames": self._config.default_num_frames or self.model_num_frames,
            "memory": self._config.memory.model_dump(),
        }

    def check_health(self) -> None:
        check_device_health(self._placement)

"""The one video generator deployment: it serves any `video_models:` entry, whatever its family.

The builder binds it once per entry, named after the model id (`serve_app.config.generator_name`,
e.g. SvdXtGenerator, LtxVideoGenerator). What differs between families (pipeline classes, call
arguments) is the family's `LoadedVideoModel` (`deployments.families.video_base`); the lock, progress
and cancel, frame interpolation, encoding, metrics, info and health are here.
"""

from __future__ import annotations

import asyncio
import logging
import time

import numpy as np
from ray import serve

from deployments.config import VideoModelConfig
from deployments.families import get_video_family
from deployments.runtime.loading import check_device_health, resolve_placement, seeded_generators, to_uint8_images
from deployments.runtime.metrics import ModelMetrics
from deployments.runtime.progress import StepMonitor, run_interruptibly
from deployments.runtime.types import VideoOutput, VideoParams
from deployments.video.encoding import CONTENT_TYPES, encode_video, interpolate_frames

logger = logging.getLogger("ray.serve")


@serve.deployment(name="VideoGenerator", max_ongoing_requests=2, ray_actor_options={"num_cpus": 1})
class VideoGenerator:
    """Makes one video at a time per replica, and encodes it (MP4, GIF or WebP).

    The pipeline is not safe under concurrent calls, so runs take an asyncio lock; interpolation and
    encoding happen after the lock is released, so the next video starts denoising meanwhile. Video
    deployments are separate from the image ones, so long video runs never hold an image replica.
    A cancelled request stops at the end of its current denoising step, and with `params.progress`
    set each step is reported (see `deployments.runtime.progress`).
    """

    def __init__(self, config: VideoModelConfig, metrics: bool = True):
        self._config = config
        self._family = get_video_family(config.family)
        self._placement = resolve_placement(config.device)
        self._metrics = ModelMetrics(config.id, self._placement.device, enabled=metrics)
        started = time.perf_counter()
        self._model = self._family.load(config, self._placement)
        self._lock = asyncio.Lock()
        logger.info("%s (%s) loaded from %s on %s/%s in %.1fs", config.id, self._family.name, config.source,
                    self._placement.device, self._placement.dtype_name, time.perf_counter() - started)

    async def animate(self, params: VideoParams, image: np.ndarray | None) -> VideoOutput:
        """One video: `image` (uint8 (H, W, 3) at the video's size) animated, or None for native
        text-to-video from `params.prompt`; then interpolated (`params.interpolate`) and encoded."""
        if params.output_format not in CONTENT_TYPES:
            raise ValueError(f"output_format must be one of {sorted(CONTENT_TYPES)}; got {params.output_format!r}")
        if image is None and self._family.text_to_video != "native":
            raise ValueError(f"{self._config.id} animates an image; it has no native text-to-video")
        if image is not None and image.shape != (params.height, params.width, 3):
            raise ValueError(f"image must be {params.height}x{params.width}x3; got {image.shape}")
        monitor = StepMonitor(params.progress, params.num_inference_steps)
        async with self._lock:
            started = time.perf_counter()
            frames = await run_interruptibly(lambda: self._frames(params, image, monitor), monitor)
            generated = time.perf_counter() - started
        if frames.shape[0] != params.num_frames or frames.shape[1:3] != (params.height, params.width):
            raise RuntimeError(f"{self._config.id} made {frames.shape[0]} frames of {frames.shape[2]}x{frames.shape[1]}; "
                               f"asked for {params.num_frames} of {params.width}x{params.height}")
        interpolate_started = time.perf_counter()
        source_frames = len(frames)
        frames = await asyncio.to_thread(interpolate_frames, frames, params.fps, params.interpolate)
        interpolated = time.perf_counter() - interpolate_started
        fps = params.fps * params.interpolate
        encode_started = time.perf_counter()
        metadata = {**params.metadata, "seed": params.seed, "num_frames": len(frames), "fps": fps,
                    "source_frames": source_frames, "source_fps": params.fps, "interpolate": params.interpolate,
                    **{key: value for key, value in params.options.items() if value is not None},
                    "num_inference_steps": params.num_inference_steps, "model": self._config.id,
                    "source": self._config.source}
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
            source_frames=source_frames,
            source_fps=params.fps,
            interpolate_seconds=interpolated if params.interpolate > 1 else 0.0,
        )

    def _frames(self, params: VideoParams, image: np.ndarray | None, monitor: StepMonitor) -> np.ndarray:
        import torch

        monitor.started()
        with self._metrics.track(), torch.inference_mode():
            frames = self._model(params, image, seeded_generators([params.seed])[0], monitor)
        return to_uint8_images(frames)

    def info(self) -> dict:
        return {
            "id": self._config.id,
            "family": self._family.name,
            "source": self._config.source,
            "device": self._placement.device,
            "dtype": self._placement.dtype_name,
            "memory_fraction": self._placement.memory_fraction,
            "options": self._model.options.model_dump(),
            **self._model.info(),
        }

    def check_health(self) -> None:
        check_device_health(self._placement)

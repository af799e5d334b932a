"""The one video generator deployment: it serves any `video_models:` entry, whatever its family.

The builder binds it once per entry, named after the model id (`serve_app.config.generator_name`,
e.g. SvdXtGenerator, LtxVideoGenerator). What differs between families (pipeline classes, call
arguments) is the family's `LoadedVideoModel` (`deployments.families.video_base`); the lock, progress
and cancel, frame interpolation and encoding are here; the cold start (warm-up included), metrics,
info and health are every generator's (`deployments.generator_base`).
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
from ray import serve

from deployments.config import VideoModelConfig
from deployments.families import get_video_family
from deployments.generator_base import GeneratorBase
from deployments.runtime.loading import seeded_generators, to_uint8_images
from deployments.runtime.progress import StepMonitor, run_interruptibly
from deployments.runtime.types import VideoOutput, VideoParams
from deployments.video.encoding import CONTENT_TYPES, encode_video, interpolate_frames


@serve.deployment(name="VideoGenerator", max_ongoing_requests=2, ray_actor_options={"num_cpus": 1})
class VideoGenerator(GeneratorBase):
    """Makes one video at a time per replica, and encodes it (MP4, GIF or WebP).

    The pipeline is not safe under concurrent calls, so runs take an asyncio lock; interpolation and
    encoding happen after the lock is released, so the next video starts denoising meanwhile. Video
    deployments are separate from the image ones, so long video runs never hold an image replica.
    A cancelled request stops at the end of its current denoising step, and with `params.progress`
    set each step is reported (see `deployments.runtime.progress`).

    Before the constructor returns, one tiny warm-up call runs (unless the entry's `warmup:` turns
    it off); the cold start is a metric and part of `info()`, as for images
    (`deployments.generator_base`).
    """

    _family_of = staticmethod(get_video_family)

    def __init__(self, config: VideoModelConfig, metrics: bool = True):
        self._load(config, metrics)
        self._ready()

    def _warmup_shapes(self) -> list[dict]:
        """One tiny call unless `warmup.default_shape` is off: the family's smallest size, fewest frames
        and steps. It pays the first call's one-off costs (no video model here is compiled, so no
        shape needs warming); a default-sized video would hold the replica's start for as long as a
        request, and far longer for a tiny model on a CPU (tiny SVD at 1024x576: minutes)."""
        family = self._family
        if not self._config.warmup.default_shape:
            return []
        side = family.size.smallest()
        return [{"width": side, "height": side, "num_frames": family.frames.fewest(), "steps": family.min_steps}]

    def _warm(self, shape: dict) -> None:
        """Frames of `shape` (not encoded): from a grey image, or from a prompt for families that
        make text-to-video natively; the family's default parameters."""
        native = self._family.text_to_video == "native"
        params = VideoParams(seed=0, width=shape["width"], height=shape["height"], num_frames=shape["num_frames"],
                             fps=self._family.fps_default(self._config), num_inference_steps=shape["steps"], output_format="mp4",
                             prompt="warm-up" if native else None, options=self._family.param_defaults())
        image = None if native else np.full((shape["height"], shape["width"], 3), 128, np.uint8)
        self._frames(params, image, StepMonitor(None, shape["steps"]))

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
        async with self._lock, await self._on_card(monitor.loading):
            started = time.perf_counter()
            frames = await run_interruptibly(lambda: self._frames(params, image, monitor), monitor)
            generated = time.perf_counter() - started
        if frames.shape[0] != params.num_frames or frames.shape[1:3] != (params.height, params.width):
            raise RuntimeError(f"{self._config.id} made {frames.shape[0]} frames of {frames.shape[2]}x{frames.shape[1]}; "
                               f"asked for {params.num_frames} of {params.width}x{params.height}")
        interpolate_started = time.perf_counter()
        source_frames = len(frames)
        sampled = sample_indices(source_frames, params.score_frames)
        source = frames
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
            sampled_frames=tuple(sampled),
            frames=source[list(sampled)] if sampled else None,
        )

    def _frames(self, params: VideoParams, image: np.ndarray | None, monitor: StepMonitor) -> np.ndarray:
        import torch

        monitor.started()
        with self._metrics.track(), torch.inference_mode():
            frames = self._model(params, image, seeded_generators([params.seed])[0], monitor)
        return to_uint8_images(frames)

    def info(self) -> dict:
        return {**super().info(), "options": self._model.options.model_dump()}


def sample_indices(count: int, wanted: int) -> list[int]:
    """`wanted` evenly spaced frame indices of `count` generated frames, first and last included (all
    of them when there are fewer): the frames the scorer sees."""
    if wanted <= 0 or count <= 0:
        return []
    if wanted >= count:
        return list(range(count))
    if wanted == 1:
        return [count // 2]
    return sorted({round(index * (count - 1) / (wanted - 1)) for index in range(wanted)})

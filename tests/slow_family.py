"""A test family whose denoising steps take a set time (`step_delay_s`), so a test can keep a model
deployment busy on purpose and fill its queue (the hybrid fallback's tests). SD 1.5's tiny
pipeline underneath; named in config by import path (`family: tests.slow_family:FAMILY`).
"""

from __future__ import annotations

import time

from pydantic import BaseModel, ConfigDict, Field

from deployments.families import ImageFamily, LoadedImageModel
from deployments.families.base import prompt_arguments


class SlowOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    step_delay_s: float = Field(0.5, ge=0, description="Extra seconds each denoising step takes.")


class LoadedSlow(LoadedImageModel):
    def __call__(self, params, prompts, control, generators, callback):
        def slow_step(pipeline, step, timestep, tensors):
            time.sleep(self.options.step_delay_s)  # the pipeline runs in a worker thread of the replica
            return callback(pipeline, step, timestep, tensors) if callback is not None else tensors

        return self.pipeline(
            **prompt_arguments(prompts, negative=False), width=params.width, height=params.height,
            num_inference_steps=params.num_inference_steps, guidance_scale=params.guidance_scale,
            generator=generators, output_type="np",
            callback_on_step_end=slow_step,
        ).images


class SlowFamily(ImageFamily):
    name = "slow"
    description = "A test family whose steps take step_delay_s each: SD 1.5's tiny classes."
    pipeline_class = "StableDiffusionPipeline"
    Options = SlowOptions
    min_steps, max_steps, default_steps = 1, 16, 1
    guidance_range = (0.0, 10.0)
    default_guidance = 0.0
    default_size = (256, 256)
    loaded_class = LoadedSlow

    def build_tiny(self, seed: int = 0, config=None):
        from deployments.families import get_family

        return get_family("sd15").build_tiny(seed + 2)


FAMILY = SlowFamily()

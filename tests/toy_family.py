"""A model family defined outside genserve's package, named in config by import path
(`family: tests.toy_family:FAMILY`): the test that no product file changes to add one.

It reuses SD 1.5's pipeline class with its own tiny builder, takes an option of its own (`invert`)
and declares no prompt form and no LoRA signature.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from deployments.families import ImageFamily, LoadedImageModel


class ToyOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    invert: bool = Field(False, description="Return the negative of each image.")


class LoadedToy(LoadedImageModel):
    def __call__(self, params, prompts, control, generators, callback):
        images = super().__call__(params, prompts, control, generators, callback)
        return 1.0 - images if self.options.invert else images

    def info(self) -> dict:
        return {"inverted": self.options.invert}


class ToyFamily(ImageFamily):
    name = "toy"
    description = "A toy family from the test folder: SD 1.5's classes, tiny, optionally inverted."
    pipeline_class = "StableDiffusionPipeline"
    Options = ToyOptions
    min_steps, max_steps, default_steps = 1, 8, 2
    guidance_range = (0.0, 10.0)
    default_guidance = 0.0
    default_size = (256, 256)
    loaded_class = LoadedToy

    def build_tiny(self, seed: int = 0, config=None):
        from deployments.families import get_family

        return get_family("sd15").build_tiny(seed + 1)


FAMILY = ToyFamily()

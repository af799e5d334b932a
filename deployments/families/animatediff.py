"""AnimateDiff: a motion adapter (temporal attention layers) inserted into a Stable Diffusion 1.5 UNet.

Text-to-video from an image model's weights: the entry's `source` is an SD 1.5 checkpoint (the
`sd15` image family's weights, or any SD 1.5 fine-tune), and `options.motion_adapter` the motion
module trained for it (guoyww/animatediff-motion-adapter-v1-5-2). The tiny builder is the `sd15`
family's tiny pipeline plus a tiny `MotionAdapter`.

Why SD 1.5 and not SDXL: the SD 1.5 adapters (v1-5-2, v1-5-3) are AnimateDiff's main line, trained
on 16-frame clips, and SD 1.5 fine-tunes share the UNet layout they were trained on; the SDXL adapter
is a beta release (guoyww/animatediff-motion-adapter-sdxl-beta) and needs SDXL's 3.5 B-parameter base
(counted on the meta device, docs/gpu.md) at 1024x1024 for every frame.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from deployments.families.video_base import FrameRule, LoadedVideoModel, SizeRule, VideoFamily


class AnimateDiffParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    guidance_scale: float = Field(7.5, ge=1, le=20, description="Classifier-free guidance (1: off).")
    negative_prompt: str | None = Field(None, max_length=2000, description="What the video should not show.")


class AnimateDiffOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    motion_adapter: str = Field(
        "guoyww/animatediff-motion-adapter-v1-5-2", min_length=1,
        description="The MotionAdapter: a hub repo id, a local folder, or 'tiny'.",
    )
    offload: Literal["none", "model", "sequential"] = Field("none", description="CPU offload tier on CUDA.")
    vae_slicing: bool = Field(False, description="Decode frames one at a time (less peak memory).")


class LoadedAnimateDiff(LoadedVideoModel):
    def __init__(self, family, config, placement, pipeline):
        super().__init__(family, config, placement, pipeline)
        if self.options.vae_slicing:
            pipeline.enable_vae_slicing()

    def __call__(self, params, image, generator, callback):
        own = self.request_params(params)
        return self.run_pipeline(
            self.pipeline, params, generator, callback,
            prompt=params.prompt or "",
            negative_prompt=own.negative_prompt,
            guidance_scale=own.guidance_scale,
        )

    def info(self) -> dict:
        return {"motion_adapter": self.options.motion_adapter}


class AnimateDiffFamily(VideoFamily):
    name = "animatediff"
    description = "AnimateDiff: a motion adapter over an SD 1.5 model; text-to-video, 2-32 frames (trained on 16)."
    pipeline_class = "AnimateDiffPipeline"
    image_to_video = False
    text_to_video = "native"
    # The v1-5 adapters' positional embeddings cover 32 frames.
    frames = FrameRule(2, 32)
    size = SizeRule(64, 1024, 64)
    default_size = (512, 512)
    default_frames = 16
    default_fps = 8
    min_steps, max_steps, default_steps = 1, 100, 25
    Params = AnimateDiffParams
    Options = AnimateDiffOptions
    loaded_class = LoadedAnimateDiff

    def weight_sources(self, config):
        """The SD 1.5 pipeline (the sd15 family's fp16 variant for 16-bit dtypes) and the motion adapter."""
        from deployments.families import get_family
        from deployments.runtime.weights import WeightSource, variant_for

        variant = variant_for(get_family("sd15").weight_variants, config.device.dtype)
        adapter = self.options_of(config).motion_adapter
        return [WeightSource(f"{config.id} pipeline (SD 1.5)", config.source, "diffusers-pipeline", variant),
                WeightSource(f"{config.id} motion adapter", adapter, "diffusers-model", variant)]

    def build_tiny_adapter(self, seed: int = 0):
        """A MotionAdapter sized to the sd15 family's tiny UNet (two blocks of 32 and 64 channels)."""
        from diffusers import MotionAdapter

        from deployments.runtime.tiny import eval_mode, seeded

        rng = seeded(seed)
        try:
            adapter = MotionAdapter(block_out_channels=(32, 64), motion_layers_per_block=1, motion_norm_num_groups=2,
                                    motion_num_attention_heads=4, motion_max_seq_length=32)
        finally:
            rng.__exit__(None, None, None)
        eval_mode(adapter)
        return adapter

    def save_tiny(self, folder, seed: int = 0, config=None) -> None:
        """The tiny motion adapter in diffusers' layout (the SD 1.5 weights: `save-tiny sd15`)."""
        self.build_tiny_adapter(seed).save_pretrained(folder)

    def _pipeline(self, base, adapter):
        from diffusers import AnimateDiffPipeline, DDIMScheduler

        # The scheduler AnimateDiff was trained with: linear betas, no sample clipping.
        scheduler = DDIMScheduler.from_config(base.scheduler.config, beta_schedule="linear", clip_sample=False,
                                              timestep_spacing="linspace", steps_offset=1)
        return AnimateDiffPipeline(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
                                   unet=base.unet, motion_adapter=adapter, scheduler=scheduler)

    def build_tiny(self, seed: int = 0, config=None):
        from deployments.families import get_family

        return self._pipeline(get_family("sd15").build_tiny(seed), self.build_tiny_adapter(seed))

    def load_pipeline(self, config, placement):
        """The SD 1.5 weights through the `sd15` family's loading path (StableDiffusionPipeline), the
        adapter through `MotionAdapter.from_pretrained` (or tiny), joined into an AnimateDiffPipeline."""
        from deployments.families import get_family
        from deployments.runtime.loading import is_tiny, load_diffusers_pipeline, pretrained_location
        from deployments.runtime.weights import local_variant

        sd15 = get_family("sd15")
        variant = sd15.weight_variants.get(placement.dtype_name)
        base = load_diffusers_pipeline(sd15.pipeline_class, config.source, placement, lambda: sd15.build_tiny(),
                                       local_variant(config.source, variant))
        source = self.options_of(config).motion_adapter
        if is_tiny(source):
            adapter = self.build_tiny_adapter().to(dtype=placement.dtype)
        else:
            from diffusers import MotionAdapter

            adapter = MotionAdapter.from_pretrained(pretrained_location(source), dtype=placement.dtype,
                                                    use_safetensors=True, variant=local_variant(source, variant))
        pipeline = self._pipeline(base, adapter).to(dtype=placement.dtype)
        pipeline.set_progress_bar_config(disable=True)
        return pipeline


FAMILY = AnimateDiffFamily()

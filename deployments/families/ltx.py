"""LTX-Video: one DiT with a T5 text encoder and a causal video VAE; text-to-video and image-to-video
from the same weights.

`LTXPipeline` (text-to-video) and `LTXImageToVideoPipeline` (the first frame conditioned on an
uploaded image, guided by the prompt) are built from one set of loaded components, so a replica
holds the weights once and serves both. The VAE compresses 32x32 pixels and 8 frames (after the
first) into one latent, hence its rules: width and height multiples of 32, 8k+1 frames.

Why LTX-Video and not Wan 2.2 TI2V-5B (both do text- and image-to-video from one checkpoint):
LTX-Video 0.9 has a 1.9 B transformer (counted on the meta device) against Wan 2.2 TI2V-5B's 5 B, so
it fits beside the image models on one card, and diffusers serves both of its modes from one set of
loaded components with its own `LTXPipeline`/`LTXImageToVideoPipeline` pair. See docs/video.md.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from deployments.families.video_base import FrameRule, LoadedVideoModel, SizeRule, VideoFamily


class LtxParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    guidance_scale: float = Field(3.0, ge=1, le=20, description="Classifier-free guidance (1: off).")
    negative_prompt: str | None = Field(None, max_length=2000, description="What the video should not show.")


class LtxOptions(BaseModel):
    """Memory options: CPU offload on CUDA (as for SVD) and tiled VAE decoding (less peak memory for
    long or large videos)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    offload: Literal["none", "model", "sequential"] = Field("none", description="CPU offload tier on CUDA.")
    vae_tiling: bool = Field(False, description="Decode the video in tiles.")
    max_sequence_length: int = Field(128, ge=16, le=512, description="T5 tokens of the prompt.")


class LoadedLtx(LoadedVideoModel):
    def __init__(self, family, config, placement, pipeline):
        from diffusers import LTXImageToVideoPipeline

        super().__init__(family, config, placement, pipeline)
        # The same modules (and offload hooks) as the text-to-video pipeline: no second copy.
        self.image_pipeline = LTXImageToVideoPipeline(**pipeline.components)
        self.image_pipeline.set_progress_bar_config(disable=True)
        if self.options.vae_tiling:
            pipeline.vae.enable_tiling()

    def __call__(self, params, image, generator, callback):
        own = self.request_params(params)
        arguments = dict(
            prompt=params.prompt or "",
            negative_prompt=own.negative_prompt,
            frame_rate=params.fps,
            guidance_scale=own.guidance_scale,
            max_sequence_length=self.options.max_sequence_length,
        )
        if image is None:
            return self.run_pipeline(self.pipeline, params, generator, callback, **arguments)
        from PIL import Image

        return self.run_pipeline(self.image_pipeline, params, generator, callback, image=Image.fromarray(image),
                                 **arguments)


class LtxFamily(VideoFamily):
    name = "ltx"
    description = ("LTX-Video: text-to-video and image-to-video from one set of weights (DiT + T5); "
                   "8k+1 frames, sizes in multiples of 32.")
    pipeline_class = "LTXPipeline"
    image_to_video = True
    text_to_video = "native"
    frames = FrameRule(9, 257, 8)
    size = SizeRule(64, 1280, 32)
    default_size = (704, 480)
    default_frames = 121
    default_fps = 24
    min_steps, max_steps, default_steps = 1, 100, 40
    Params = LtxParams
    Options = LtxOptions
    loaded_class = LoadedLtx

    def build_tiny(self, seed: int = 0, config=None):
        """LTXPipeline's real classes with tiny random weights, keeping the real VAE's compression
        (32x spatially, 8x in time: patch size 4 and three spatio-temporal downsamplings) so the
        frame and size rules are the real model's."""
        from diffusers import (
            AutoencoderKLLTXVideo,
            FlowMatchEulerDiscreteScheduler,
            LTXPipeline,
            LTXVideoTransformer3DModel,
        )
        from transformers import T5Config, T5EncoderModel

        from deployments.runtime.tiny import eval_mode, seeded, tiny_t5_tokenizer

        rng = seeded(seed)
        try:
            tokenizer = tiny_t5_tokenizer()
            text_encoder = T5EncoderModel(T5Config(
                vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
            ))
            transformer = LTXVideoTransformer3DModel(
                in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=4,
                attention_head_dim=8, cross_attention_dim=32, num_layers=1, caption_channels=32,
            )
            vae = AutoencoderKLLTXVideo(
                in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(8, 8, 8, 8),
                decoder_block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
                decoder_layers_per_block=(1, 1, 1, 1, 1), spatio_temporal_scaling=(True, True, True, False),
                decoder_spatio_temporal_scaling=(True, True, True, False),
                decoder_inject_noise=(False, False, False, False, False),
                upsample_residual=(False, False, False, False), upsample_factor=(1, 1, 1, 1),
                timestep_conditioning=False, patch_size=4, patch_size_t=1, encoder_causal=True, decoder_causal=False,
            )
        finally:
            rng.__exit__(None, None, None)
        eval_mode(text_encoder, transformer, vae)
        return LTXPipeline(transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(),
                           text_encoder=text_encoder, tokenizer=tokenizer)


FAMILY = LtxFamily()

"""Wan 2.2 TI2V-5B: one 5B DiT with a UMT5 text encoder and Wan 2.2's high-compression VAE;
text-to-video and image-to-video from the same weights, Apache-2.0.

`WanPipeline` (text-to-video) and `WanImageToVideoPipeline` (the first frame is the uploaded image,
the prompt guides the motion) are built from one set of loaded components, so a replica holds the
weights once and serves both. TI2V-5B conditions on the image through its latents alone
(`expand_timesteps`: the first frame's latents are kept and get timestep 0), so it has no CLIP image
encoder. The VAE compresses 16x16 pixels and 4 frames (after the first) into one latent and the
transformer patches 2x2 latents, hence its rules: width and height multiples of 32, 4k+1 frames
(720p is 1280x704, 121 frames at 24 fps). The pipeline rounds a frame count it cannot make and
refuses other sizes; the family's rules answer 422 first, naming the nearest allowed values.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from deployments.families.video_base import FrameRule, LoadedVideoModel, SizeRule, VideoFamily


class WanParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    guidance_scale: float = Field(5.0, ge=1, le=20, description="Classifier-free guidance (1: off).")
    negative_prompt: str | None = Field(None, max_length=2000, description="What the video should not show.")


class WanOptions(BaseModel):
    """Memory options: CPU offload on CUDA (as for LTX-Video) and tiled VAE decoding (less peak memory
    for long or large videos)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    offload: Literal["none", "model", "sequential"] = Field("none", description="CPU offload tier on CUDA.")
    vae_tiling: bool = Field(False, description="Decode the video in tiles.")
    max_sequence_length: int = Field(512, ge=16, le=512, description="UMT5 tokens of the prompt.")


class LoadedWan(LoadedVideoModel):
    def __init__(self, family, config, placement, pipeline):
        from diffusers import WanImageToVideoPipeline

        super().__init__(family, config, placement, pipeline)
        # The same modules (and offload hooks) as the text-to-video pipeline: no second copy. TI2V
        # has no image encoder: the image enters through its latents (`expand_timesteps`).
        self.image_pipeline = WanImageToVideoPipeline(
            **pipeline.components, image_encoder=None, image_processor=None,
            boundary_ratio=pipeline.config.boundary_ratio, expand_timesteps=pipeline.config.expand_timesteps,
        )
        self.image_pipeline.set_progress_bar_config(disable=True)
        if self.options.vae_tiling:
            pipeline.vae.enable_tiling()

    def __call__(self, params, image, generator, callback):
        own = self.request_params(params)
        arguments = dict(prompt=params.prompt or "", negative_prompt=own.negative_prompt,
                         guidance_scale=own.guidance_scale, max_sequence_length=self.options.max_sequence_length)
        if image is None:
            return self.run_pipeline(self.pipeline, params, generator, callback, **arguments)
        from PIL import Image

        return self.run_pipeline(self.image_pipeline, params, generator, callback, image=Image.fromarray(image),
                                 **self.encoded(arguments))

    def encoded(self, arguments: dict) -> dict:
        """The prompts as embeddings from the text-to-video pipeline's encoder (the same text encoder):
        diffusers 0.42's image-to-video pipeline cleans prompts with ftfy without checking it is
        installed, where the text-to-video one skips it when it is not."""
        prompt, negative = arguments.pop("prompt"), arguments.pop("negative_prompt")
        embeds, negative_embeds = self.pipeline.encode_prompt(
            prompt, negative, do_classifier_free_guidance=arguments["guidance_scale"] > 1,
            max_sequence_length=arguments.pop("max_sequence_length"), device=self.pipeline._execution_device,
        )
        return {**arguments, "prompt_embeds": embeds, "negative_prompt_embeds": negative_embeds}


class WanFamily(VideoFamily):
    name = "wan"
    description = ("Wan 2.2 TI2V-5B: text-to-video and image-to-video from one set of weights (DiT + UMT5); "
                   "4k+1 frames, sizes in multiples of 32.")
    pipeline_class = "WanPipeline"
    image_to_video = True
    text_to_video = "native"
    # Up to the 121 frames (5 s at 24 fps) the published model makes.
    frames = FrameRule(5, 121, 4)
    size = SizeRule(64, 1280, 32)
    default_size = (1280, 704)
    default_frames = 121
    default_fps = 24
    min_steps, max_steps, default_steps = 1, 100, 50
    Params = WanParams
    Options = WanOptions
    loaded_class = LoadedWan

    def build_tiny(self, seed: int = 0, config=None):
        """WanPipeline's real classes with tiny random weights, keeping TI2V-5B's VAE compression (16x
        spatially through its 2x2 patching and three halvings, 4x in time) and the transformer's 2x2
        patches, so the frame and size rules are the real model's; the published UniPC flow scheduler
        (shift 5) and `expand_timesteps`."""
        from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
        from transformers import UMT5Config, UMT5EncoderModel

        from deployments.runtime.tiny import eval_mode, seeded, tiny_t5_tokenizer

        tokenizer = tiny_t5_tokenizer()
        rng = seeded(seed)
        try:
            text_encoder = UMT5EncoderModel(UMT5Config(
                vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
            ))
            transformer = WanTransformer3DModel(
                patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=48, out_channels=48,
                text_dim=32, freq_dim=256, ffn_dim=32, num_layers=1, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
            )
            vae = AutoencoderKLWan(
                base_dim=3, z_dim=48, in_channels=12, out_channels=12, is_residual=True, patch_size=2,
                latents_mean=[0.0] * 48, latents_std=[1.0] * 48, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                scale_factor_spatial=16, scale_factor_temporal=4, temperal_downsample=[False, True, True],
            )
        finally:
            rng.__exit__(None, None, None)
        eval_mode(text_encoder, transformer, vae)
        scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0)
        return WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                           transformer=transformer, expand_timesteps=True)


FAMILY = WanFamily()

"""FLUX.1 (schnell and dev): rectified-flow transformers with a T5 and a CLIP text encoder.

One family serves both published models; their config entries differ only in data:
- FLUX.1-schnell (Apache-2.0) is timestep-distilled: 1-4 steps, no guidance
  (`limits: {max_steps: 4, max_guidance: 0}`);
- FLUX.1-dev (gated; FLUX.1 [dev] Non-Commercial License) is guidance-distilled: ~28 steps, its
  guidance scale (3.5 by default) is an embedded input, not classifier-free guidance, so a
  negative prompt does nothing for either.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from deployments.families.base import AccelerationSupport, ImageFamily, LoadedImageModel, LoraSignature
from deployments.runtime.types import PromptForm, PromptTokenizer


class FluxOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_sequence_length: int = Field(
        256, ge=16, le=512, description="T5 prompt tokens (schnell was trained with up to 256, dev with 512)."
    )


class LoadedFlux(LoadedImageModel):
    def latent_image(self, latents, params):
        # FLUX packs 2x2 latent patches into its sequence; unpack to (B, C, h, w) for a preview.
        return self.pipeline._unpack_latents(latents, params.height, params.width, self.pipeline.vae_scale_factor)

    def pipeline_kwargs(self, pipeline, params, prompts, generators, callback) -> dict:
        return {**super().pipeline_kwargs(pipeline, params, prompts, generators, callback),
                "max_sequence_length": self.options.max_sequence_length}


class FluxFamily(ImageFamily):
    name = "flux"
    description = "FLUX.1: rectified-flow transformer; guidance is distilled, so no negative prompt."
    pipeline_class = "FluxPipeline"
    Options = FluxOptions
    min_steps, max_steps, default_steps = 1, 50, 28
    guidance_range = (0.0, 30.0)
    default_guidance = 3.5
    negative_prompt = False
    loaded_class = LoadedFlux
    img2img_pipeline_class = "FluxImg2ImgPipeline"
    inpaint_pipeline_class = "FluxInpaintPipeline"
    acceleration = AccelerationSupport(
        denoiser="transformer", repeated_blocks=True, cache_hooks=("first_block",), fuse_qkv=True
    )
    # GGUF checkpoints of the transformer (city96/FLUX.1-schnell-gguf, ...) load through from_single_file.
    denoiser_class = "FluxTransformer2DModel"
    gguf = True
    # CLIP keeps 77 tokens; T5 keeps 256 (schnell) or 512 (dev), which a prompt that fits CLIP fits.
    prompt_tokenizers = (PromptTokenizer("tokenizer", 77),)
    # FLUX's T5 encoder follows natural sentences.
    prompt_form = PromptForm(
        instructions="Write one or two natural, flowing sentences (at most 70 words) describing the scene concretely.",
        examples=(
            ("a cat on a windowsill | photorealistic",
             "A ginger tabby cat curled up on a sunlit wooden windowsill, soft morning light falling across its fur, "
             "a blurred garden visible through the glass behind it, shot as a professional photograph with shallow "
             "depth of field."),
            ("castle in the mountains | artistic",
             "A weathered stone castle perched on a snowy mountain ridge at golden hour, its towers glowing against "
             "a violet sky, painted as detailed digital concept art with vibrant colors."),
        ),
    )
    # FLUX's 16-channel VAE latents (published by ComfyUI's latent previews). The tiny test VAE has
    # 4 channels, so tiny FLUX shows no preview.
    preview_factors = (
        (-0.0346, 0.0244, 0.0681), (0.0034, 0.0210, 0.0687), (0.0275, -0.0668, -0.0433), (-0.0174, 0.0160, 0.0617),
        (0.0859, 0.0721, 0.0329), (0.0004, 0.0383, 0.0115), (0.0405, 0.0861, 0.0915), (-0.0236, -0.0185, -0.0259),
        (-0.0245, 0.0250, 0.1180), (0.1008, 0.0755, -0.0421), (-0.0515, 0.0201, 0.0011), (0.0428, -0.0012, -0.0036),
        (0.0817, 0.0765, 0.0749), (-0.1264, -0.0522, -0.1103), (-0.0280, -0.0881, -0.0499), (-0.1262, -0.0982, -0.0778),
    )
    preview_bias = (-0.0329, -0.0718, -0.0851)
    lora = LoraSignature(
        metadata_prefixes=("flux",),
        key_prefixes=("transformer.", "lora_transformer_", "diffusion_model."),
        key_fragments=("double_blocks", "single_blocks", "single_transformer_blocks"),
    )

    def build_tiny(self, seed: int = 0, config=None):
        """A FluxPipeline with the real component classes and tiny random weights.

        The VAE keeps FLUX's 8x downsampling so a 256x256 request costs a 32x32 latent, as the real
        model's would, instead of a quadratic blow-up in the transformer's attention. For an entry
        that allows guidance (FLUX.1-dev), the transformer embeds the guidance scale as dev's does.
        """
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
        from transformers import CLIPTextModel, T5Config, T5EncoderModel

        from deployments.runtime.tiny import (
            clip_text_config,
            eval_mode,
            seeded,
            tiny_clip_tokenizer,
            tiny_t5_tokenizer,
            tiny_vae,
        )

        rng = seeded(seed)
        try:
            tokenizer = tiny_clip_tokenizer()
            tokenizer_2 = tiny_t5_tokenizer()
            text_encoder = CLIPTextModel(clip_text_config(tokenizer))
            text_encoder_2 = T5EncoderModel(
                T5Config(
                    vocab_size=len(tokenizer_2), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                    pad_token_id=tokenizer_2.pad_token_id, eos_token_id=tokenizer_2.eos_token_id,
                    decoder_start_token_id=tokenizer_2.pad_token_id,
                )
            )
            transformer = FluxTransformer2DModel(
                patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
                guidance_embeds=config is not None and self.guidance_limits(config)[1] > 0,
            )
            vae = tiny_vae(scaling_factor=1.5035, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)
        finally:
            rng.__exit__(None, None, None)
        eval_mode(text_encoder, text_encoder_2, transformer, vae)
        return FluxPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
            text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer,
        )


FAMILY = FluxFamily()

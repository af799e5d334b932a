"""Stable Diffusion 1.5: a UNet with one CLIP ViT-L text encoder; classifier-free guidance.

Trained at 512x512 (sizes far above it repeat subjects). The base of most community fine-tunes and
of AnimateDiff's motion adapters. Its LoRA files (kohya `lora_te_*`, or UNet-only adapters whose
cross-attention takes 768-wide text embeddings) are recognised here, so they are never offered to
SDXL.
"""

from __future__ import annotations

from deployments.families.base import AccelerationSupport, ImageFamily, LoraSignature
from deployments.runtime.types import PromptForm, PromptTokenizer


class Sd15Family(ImageFamily):
    name = "sd15"
    description = "Stable Diffusion 1.5: UNet with a CLIP ViT-L text encoder; classifier-free guidance; 512x512."
    pipeline_class = "StableDiffusionPipeline"
    min_steps, max_steps, default_steps = 1, 50, 25
    guidance_range = (0.0, 30.0)
    default_guidance = 7.5
    default_size = (512, 512)
    negative_prompt = True
    img2img_pipeline_class = "StableDiffusionImg2ImgPipeline"
    inpaint_pipeline_class = "StableDiffusionInpaintPipeline"
    acceleration = AccelerationSupport(denoiser="unet", repeated_blocks=True, fuse_qkv=True, channels_last=True)
    # SD 1.5 checkpoints in diffusers layout publish fp16 files beside the fp32 ones.
    weight_variants = {"float16": "fp16", "bfloat16": "fp16"}
    prompt_tokenizers = (PromptTokenizer("tokenizer", 77),)
    # One CLIP encoder of 77 tokens: short tags, as for SDXL, but fewer.
    prompt_form = PromptForm(
        instructions="Write a comma-separated list of short tags (at most 30 words): subject first, then details, "
                     "lighting and style.",
        examples=(
            ("a cat on a windowsill | photorealistic",
             "ginger tabby cat, wooden windowsill, morning sunlight, blurred garden, photograph, sharp focus"),
        ),
    )
    # SD 1.x's 4-channel VAE latents (published by ComfyUI's latent previews).
    preview_factors = ((0.3512, 0.2297, 0.3227), (0.3250, 0.4974, 0.2350), (-0.2829, 0.1762, 0.2721),
                       (-0.2120, -0.2616, -0.7177))
    lora = LoraSignature(
        metadata_prefixes=("sd_v1", "stable-diffusion-v1"),
        key_prefixes=("lora_te_",),
        cross_attention_dims=(768,),
    )

    def build_tiny(self, seed: int = 0, config=None):
        """A StableDiffusionPipeline of the real classes with tiny random weights (8x VAE, like SD's)."""
        from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
        from transformers import CLIPTextModel

        from deployments.runtime.tiny import clip_text_config, eval_mode, seeded, tiny_clip_tokenizer, tiny_vae

        rng = seeded(seed)
        try:
            tokenizer = tiny_clip_tokenizer()
            text_encoder = CLIPTextModel(clip_text_config(tokenizer))
            unet = UNet2DConditionModel(
                block_out_channels=(32, 64), layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                attention_head_dim=(2, 4), cross_attention_dim=32, norm_num_groups=8,
            )
            vae = tiny_vae(scaling_factor=0.18215)
        finally:
            rng.__exit__(None, None, None)
        eval_mode(text_encoder, unet, vae)
        # The scheduler settings of the released SD 1.5 checkpoint.
        scheduler = DDIMScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
            clip_sample=False, set_alpha_to_one=False, steps_offset=1,
        )
        return StableDiffusionPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )


FAMILY = Sd15Family()

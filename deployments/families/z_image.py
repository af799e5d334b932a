"""Z-Image: Tongyi-MAI's 6B single-stream DiT over a Qwen3-4B text encoder and FLUX.1's VAE
(diffusers' `ZImagePipeline`).

- Z-Image-Turbo is step-distilled: 9 steps (8 transformer passes), no guidance. Its model card on
  Hugging Face states Apache-2.0 (the licence recorded in docs/models.md);
- the undistilled Z-Image base takes ~50 steps and classifier-free guidance with a negative prompt.

Z-Image's scale counts from 0 (the pipeline runs classifier-free guidance at any scale above 0:
`pred = cond + scale * (cond - uncond)`), so its entries narrow guidance to 0 for Turbo. Image-to-image
and inpainting come from the same modules (`ZImageImg2ImgPipeline`, `ZImageInpaintPipeline`).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from deployments.families.base import AccelerationSupport, ImageFamily, LoadedImageModel, LoraSignature
from deployments.runtime.types import PromptForm


class ZImageOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_sequence_length: int = Field(512, ge=16, le=1024, description="Qwen3 prompt tokens (the chat template's included).")


class LoadedZImage(LoadedImageModel):
    # No denoising previews: the published RGB factors are FLUX.1's 16-channel ones, but Z-Image packs
    # its latents into the transformer's sequence per image (no unpacking declared here yet).

    def pipeline_kwargs(self, pipeline, params, prompts, generators, callback) -> dict:
        arguments = {**super().pipeline_kwargs(pipeline, params, prompts, generators, callback),
                     "max_sequence_length": self.options.max_sequence_length}
        if params.guidance_scale <= 0:
            arguments["negative_prompt"] = None  # no guidance: the negative prompt is never encoded
        return arguments


class ZImageFamily(ImageFamily):
    name = "z-image"
    description = ("Z-Image: single-stream DiT over Qwen3; Turbo makes an image in 9 steps without guidance; "
                   "image-to-image and inpainting.")
    pipeline_class = "ZImagePipeline"
    Options = ZImageOptions
    min_steps, max_steps, default_steps = 1, 100, 9
    guidance_range = (0.0, 10.0)
    default_guidance = 0.0
    default_size = (1024, 1024)
    # The base model's classifier-free guidance takes one; Turbo entries narrow guidance to 0, and then
    # the model spec says it takes none.
    negative_prompt = True
    loaded_class = LoadedZImage
    img2img_pipeline_class = "ZImageImg2ImgPipeline"
    inpaint_pipeline_class = "ZImageInpaintPipeline"
    acceleration = AccelerationSupport(denoiser="transformer", repeated_blocks=True)
    # Qwen3 reads natural sentences (and Chinese or English text to render in quotes).
    prompt_form = PromptForm(
        instructions="Write one or two natural sentences (at most 70 words) describing the scene concretely; put any "
                     "text that should appear in the image in double quotes.",
        examples=(
            ("a cat on a windowsill | photorealistic",
             "A ginger tabby cat curled up on a sunlit wooden windowsill, a blurred garden behind the glass, "
             "photographed with a shallow depth of field in soft morning light."),
        ),
    )
    # Z-Image's LoRAs: metadata names the model; its noise and context refiners and SwiGLU feed-forward
    # (`feed_forward.w1`) are its own, where diffusers' layout otherwise starts with FLUX.1's "transformer.".
    lora = LoraSignature(
        metadata_prefixes=("z-image", "z_image", "zimage"),
        key_fragments=("noise_refiner", "context_refiner", "feed_forward.w1", "feed_forward_w1"),
        precedence=1,
    )

    def build_tiny(self, seed: int = 0, config=None):
        """A ZImagePipeline of the real component classes with tiny random weights: a 2-layer Qwen3 over
        the byte-level ChatML tokenizer, a 2-layer transformer with one refiner layer each, and FLUX.1's
        kind of VAE keeping its 8x downsampling."""
        import torch
        from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
        from transformers import Qwen3Config, Qwen3Model

        from deployments.runtime.tiny import eval_mode, seeded, tiny_llm_tokenizer, tiny_vae

        tokenizer = tiny_llm_tokenizer()
        rng = seeded(seed)
        try:
            text_encoder = Qwen3Model(Qwen3Config(
                vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=2, head_dim=8, max_position_embeddings=1024,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
            ))
            transformer = ZImageTransformer2DModel(
                all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=2, n_refiner_layers=1,
                n_heads=2, n_kv_heads=2, qk_norm=True, cap_feat_dim=16, axes_dims=[8, 4, 4], axes_lens=[1024, 64, 64],
            )
            vae = tiny_vae(scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
        finally:
            rng.__exit__(None, None, None)
        # The padding tokens are created with torch.empty: give them values, as diffusers' own tests do.
        with torch.no_grad():
            transformer.x_pad_token.fill_(1.0)
            transformer.cap_pad_token.fill_(1.0)
        eval_mode(text_encoder, transformer, vae)
        return ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder,
                              tokenizer=tokenizer, transformer=transformer)


FAMILY = ZImageFamily()

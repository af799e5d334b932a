"""FLUX.2 [klein]: a rectified-flow transformer over a Qwen3 text encoder that generates from text
and edits from reference images with one set of weights (diffusers' `Flux2KleinPipeline`).

The pipeline takes up to a few reference images beside the prompt: their VAE latents join the
transformer's sequence at their own positions, so the prompt can describe a new picture of what
they show ("this character, in that style") or an instruction that edits them ("make it night").
That is `reference_images` and `instruction_edits` here; there is no strength and no mask, so no
image-to-image or inpainting pipeline.

The published variants differ only in data (their config entries):
- FLUX.2 [klein] 4B (Apache-2.0, not gated) is step-distilled: 4 steps, guidance ignored;
- FLUX.2 [klein] base 4B (Apache-2.0) is the undistilled base: ~50 steps, classifier-free guidance
  (around 4) against the empty prompt, which the pipeline fixes: it takes no negative prompt;
- the 9B variants are under the FLUX Non-Commercial License and gated.
The prompt embeddings are the text encoder's hidden states at three depths; the published models
take layers 9, 18 and 27 of Qwen3's 36, a quarter, half and three quarters of the way down, so a
text encoder of any depth (the tiny one's 4 layers) takes the same fractions unless
`options.text_encoder_out_layers` says otherwise.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from deployments.families.base import AccelerationSupport, ImageFamily, LoadedImageModel, LoraSignature
from deployments.runtime.types import PromptForm

# Reference images one request may give: BFL's klein examples combine up to four; each costs a
# latent as long as the output's in the transformer's sequence, so attention grows with the square.
MAX_REFERENCE_IMAGES = 4


class Flux2Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_sequence_length: int = Field(
        512, ge=16, le=512, description="Qwen3 prompt tokens (the chat template's tokens included)."
    )
    text_encoder_out_layers: tuple[int, ...] | None = Field(
        None, min_length=1, description="The text encoder's hidden-state layers that make the prompt embeddings; "
        "None: a quarter, half and three quarters of its depth (9, 18, 27 of the published models' 36).",
    )


def out_layers(num_hidden_layers: int) -> tuple[int, int, int]:
    """The published layer choice (9, 18, 27 of 36) as fractions of any text encoder's depth."""
    return (num_hidden_layers // 4, num_hidden_layers // 2, 3 * num_hidden_layers // 4)


class LoadedFlux2(LoadedImageModel):
    # No denoising previews: no RGB factors are published for FLUX.2's 32-channel latents yet.

    @property
    def text_encoder_out_layers(self) -> tuple[int, ...]:
        chosen = self.options.text_encoder_out_layers
        return chosen or out_layers(self.pipeline.text_encoder.config.num_hidden_layers)

    def pipeline_kwargs(self, pipeline, params, prompts, generators, callback) -> dict:
        from PIL import Image

        arguments = {**super().pipeline_kwargs(pipeline, params, prompts, generators, callback),
                     "max_sequence_length": self.options.max_sequence_length,
                     "text_encoder_out_layers": self.text_encoder_out_layers}
        if params.references:
            arguments["image"] = [Image.fromarray(image) for image in params.references]
        return arguments


class Flux2Family(ImageFamily):
    name = "flux2"
    description = ("FLUX.2 [klein]: rectified-flow transformer over Qwen3; text-to-image and edits by instruction "
                   f"from up to {MAX_REFERENCE_IMAGES} reference images; no negative prompt.")
    pipeline_class = "Flux2KleinPipeline"
    Options = Flux2Options
    min_steps, max_steps, default_steps = 1, 50, 4
    # Guidance above 1 runs classifier-free guidance against the empty prompt (the base variants);
    # the distilled ones ignore it, so their entries narrow it to 0-1.
    guidance_range = (0.0, 10.0)
    default_guidance = 1.0
    # The pipeline fixes the unconditional prompt to "": a negative prompt would be dropped.
    negative_prompt = False
    loaded_class = LoadedFlux2
    reference_images = MAX_REFERENCE_IMAGES
    instruction_edits = True
    # Flux2ImageProcessor.check_image_input refuses smaller or more elongated references.
    reference_min_side, reference_max_aspect = 64, 8.0
    acceleration = AccelerationSupport(denoiser="transformer", repeated_blocks=True, cache_hooks=("first_block",))
    # Qwen3 reads instructions and long descriptions alike; the enhancer keeps to natural sentences.
    prompt_form = PromptForm(
        instructions="Write one or two natural sentences (at most 70 words) describing the scene, or, for an edit, "
                     "the change to make, concretely.",
        examples=(
            ("a cat on a windowsill | photorealistic",
             "A ginger tabby cat curled up on a sunlit wooden windowsill, a blurred garden behind the glass, "
             "photographed with a shallow depth of field in soft morning light."),
        ),
    )
    # FLUX.2's LoRAs: BFL/ai-toolkit metadata says "flux-2" or "flux.2"; in diffusers' layout the
    # fused single-block projection and the SwiGLU feed-forward are FLUX.2's alone. Its original-layout
    # keys (double_blocks, single_blocks) look like FLUX.1's, so the metadata must say it, and this
    # signature is asked before FLUX.1's "flux" and "transformer.".
    lora = LoraSignature(
        metadata_prefixes=("flux-2", "flux.2", "flux2"),
        key_fragments=("to_qkv_mlp_proj", "ff.linear_in", "ff_context.linear_in", "stream_modulation"),
        precedence=1,
    )

    def build_tiny(self, seed: int = 0, config=None):
        """A Flux2KleinPipeline of the real component classes with tiny random weights: a 4-layer Qwen3
        (so the out layers are 1, 2, 3 and the embeddings 3 x 32 wide), FLUX.2's VAE with its 8x
        downsampling and batch-norm statistics, and a one-block transformer."""
        from diffusers import (
            AutoencoderKLFlux2,
            FlowMatchEulerDiscreteScheduler,
            Flux2KleinPipeline,
            Flux2Transformer2DModel,
        )
        from transformers import Qwen3Config, Qwen3ForCausalLM

        from deployments.runtime.tiny import eval_mode, seeded, tiny_llm_tokenizer

        tokenizer = tiny_llm_tokenizer()
        hidden, layers = 32, 4
        rng = seeded(seed)
        try:
            text_encoder = Qwen3ForCausalLM(Qwen3Config(
                vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=64, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=1024,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
            ))
            vae = AutoencoderKLFlux2(
                down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                block_out_channels=(8, 8, 8, 8), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                sample_size=32,
            )
            transformer = Flux2Transformer2DModel(
                patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                num_attention_heads=2, joint_attention_dim=len(out_layers(layers)) * hidden,
                timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False,
            )
        finally:
            rng.__exit__(None, None, None)
        eval_mode(text_encoder, transformer, vae)
        return Flux2KleinPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
            transformer=transformer, is_distilled=config is not None and self.guidance_limits(config)[1] <= 1,
        )


FAMILY = Flux2Family()

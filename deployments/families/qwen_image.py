"""Qwen-Image: a 20B MMDiT over a Qwen2.5-VL text encoder (diffusers' `QwenImagePipeline`),
Apache-2.0, strong at rendering text inside the image.

Its guidance is true classifier-free guidance: the pipeline's `true_cfg_scale` (4 in the published
examples), run only when a negative prompt is given, so the family passes genserve's
`guidance_scale` as `true_cfg_scale` and, above 1 without a negative prompt, the single space the
published examples use ("an empty negative prompt"). The pipeline's own `guidance_scale` is for
guidance-distilled checkpoints, which Qwen-Image is not.

The VAE is Wan's (8x spatially; one frame) and the transformer packs 2x2 latent patches, so sizes
are multiples of 16; Qwen publishes 1328x1328 for 1:1. Image-to-image and inpainting come from the
same modules (`QwenImageImg2ImgPipeline`, `QwenImageInpaintPipeline`).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from deployments.families.base import AccelerationSupport, ImageFamily, LoadedImageModel, LoraSignature
from deployments.runtime.types import PromptForm

# Qwen's published examples turn true CFG on without a concept to avoid with this negative prompt.
EMPTY_NEGATIVE = " "


class QwenImageOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_sequence_length: int = Field(
        512, ge=16, le=1024, description="Qwen2.5-VL prompt tokens kept after the system template."
    )


def true_cfg_arguments(arguments: dict, guidance_scale: float) -> dict:
    """`arguments` (from `LoadedImageModel.pipeline_kwargs`) with genserve's guidance as Qwen's true
    classifier-free guidance: `true_cfg_scale`, and a negative prompt wherever guidance runs (the
    pipeline skips CFG without one), none where it does not (it would warn and ignore it)."""
    arguments = {**arguments, "true_cfg_scale": guidance_scale, "guidance_scale": None}
    prompt, negative = arguments["prompt"], arguments.get("negative_prompt")
    if guidance_scale <= 1:
        arguments["negative_prompt"] = None
    elif negative is None:
        arguments["negative_prompt"] = [EMPTY_NEGATIVE] * len(prompt) if isinstance(prompt, list) else EMPTY_NEGATIVE
    elif isinstance(negative, list):
        arguments["negative_prompt"] = [text or EMPTY_NEGATIVE for text in negative]
    return arguments


class LoadedQwenImage(LoadedImageModel):
    # No denoising previews: no RGB factors are published for Qwen-Image's 16-channel latents.

    def pipeline_kwargs(self, pipeline, params, prompts, generators, callback) -> dict:
        arguments = super().pipeline_kwargs(pipeline, params, prompts, generators, callback)
        return {**true_cfg_arguments(arguments, params.guidance_scale),
                "max_sequence_length": self.options.max_sequence_length}


def tiny_qwen_components(seed: int, vision: bool = False) -> dict:
    """The Qwen-Image components with tiny random weights, keeping the real VAE's 8x downsampling (three
    halvings; z_dim 4 where the real one has 16, and 4 channels at full resolution, since the edit
    pipeline encodes every reference at 1 MP) and a 2-layer Qwen2.5-VL over the byte-level ChatML
    tokenizer. `vision`: the tokenizer gets Qwen2-VL's image tokens and the text encoder's config their
    ids, so the vision tower can read reference images (Qwen-Image-Edit)."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from deployments.runtime.tiny import eval_mode, seeded, tiny_llm_tokenizer

    tokenizer = tiny_llm_tokenizer()
    image_tokens = {}
    if vision:
        tokenizer.add_special_tokens({"additional_special_tokens": VISION_TOKENS})
        image_tokens = {"vision_start_token_id": tokenizer.convert_tokens_to_ids("<|vision_start|>"),
                        "vision_end_token_id": tokenizer.convert_tokens_to_ids("<|vision_end|>"),
                        "image_token_id": tokenizer.convert_tokens_to_ids("<|image_pad|>"),
                        "video_token_id": tokenizer.convert_tokens_to_ids("<|video_pad|>")}
    rng = seeded(seed)
    try:
        text_encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
            text_config=dict(
                vocab_size=len(tokenizer), hidden_size=16, intermediate_size=16, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=2, rope_theta=1e6, bos_token_id=None,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                rope_scaling={"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
            ),
            vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=16),
            **image_tokens,
        ))
        transformer = QwenImageTransformer2DModel(
            patch_size=2, in_channels=16, out_channels=4, num_layers=1, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(8, 4, 4),
        )
        vae = AutoencoderKLQwenImage(
            base_dim=4, z_dim=4, dim_mult=[1, 2, 4, 4], num_res_blocks=1, temperal_downsample=[False, True, True],
            latents_mean=[0.0] * 4, latents_std=[1.0] * 4,
        )
    finally:
        rng.__exit__(None, None, None)
    eval_mode(text_encoder, transformer, vae)
    return {"scheduler": FlowMatchEulerDiscreteScheduler(), "vae": vae, "text_encoder": text_encoder,
            "tokenizer": tokenizer, "transformer": transformer}


# Qwen2-VL's tokens around and inside an image in the prompt (the processor expands `<|image_pad|>`).
VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]

# Qwen's prompts describe the picture in full sentences, and may quote text to render.
QWEN_PROMPT_FORM = PromptForm(
    instructions="Write two or three natural sentences (at most 90 words) describing the scene concretely; put any "
                 "text that should appear in the image in double quotes.",
    examples=(
        ("a coffee shop sign | photorealistic",
         "A wooden sign hanging outside a small coffee shop reads \"Morning Brew\" in hand-painted white letters, "
         "morning sunlight on the brick wall behind it, photographed with a shallow depth of field."),
    ),
)

# Qwen-Image's LoRAs: musubi-tuner/DiffSynth metadata names the model; its blocks' image and text
# MLPs are `img_mlp.net` / `txt_mlp.net` (kohya: `img_mlp_net`), where FLUX.1's original layout
# has `img_mlp.0`, so only the `.net` forms are Qwen's. Asked before FLUX.1's broader "transformer.".
QWEN_LORA = LoraSignature(
    metadata_prefixes=("qwen-image", "qwen_image", "qwenimage"),
    key_fragments=("img_mlp.net", "txt_mlp.net", "img_mlp_net", "txt_mlp_net"),
    precedence=1,
)


class QwenImageFamily(ImageFamily):
    name = "qwen-image"
    description = ("Qwen-Image: MMDiT over Qwen2.5-VL, strong at text in images; true classifier-free guidance "
                   "with a negative prompt; image-to-image and inpainting.")
    pipeline_class = "QwenImagePipeline"
    Options = QwenImageOptions
    min_steps, max_steps, default_steps = 1, 100, 50
    guidance_range = (0.0, 20.0)
    default_guidance = 4.0
    default_size = (1328, 1328)
    negative_prompt = True
    loaded_class = LoadedQwenImage
    img2img_pipeline_class = "QwenImageImg2ImgPipeline"
    inpaint_pipeline_class = "QwenImageInpaintPipeline"
    acceleration = AccelerationSupport(denoiser="transformer", repeated_blocks=True)
    prompt_form = QWEN_PROMPT_FORM
    lora = QWEN_LORA

    def build_tiny(self, seed: int = 0, config=None):
        """A QwenImagePipeline of the real component classes with tiny random weights (`tiny_qwen_components`)."""
        from diffusers import QwenImagePipeline

        return QwenImagePipeline(**tiny_qwen_components(seed))


FAMILY = QwenImageFamily()

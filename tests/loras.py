"""Tiny LoRA files for tests, made with peft on the tiny models and saved the way diffusers saves them."""

from __future__ import annotations

from pathlib import Path

FLUX_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def make_flux_lora(folder: Path, name: str, seed: int = 0, rank: int = 4, strength: float = 8.0) -> Path:
    """`<folder>/<name>.safetensors`: a LoRA on the tiny FLUX transformer with random, non-zero
    lora_B (peft initialises B to zero, which would change nothing) times `strength`, via
    FluxPipeline.save_lora_weights."""
    import torch
    from diffusers import FluxPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    from deployments.tiny import build_tiny_flux

    transformer = build_tiny_flux().transformer
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        config = LoraConfig(r=rank, lora_alpha=rank, target_modules=FLUX_TARGETS, init_lora_weights=False)
        transformer.add_adapter(config)
    layers = {key: value * strength if "lora_B" in key else value
              for key, value in get_peft_model_state_dict(transformer).items()}
    folder.mkdir(parents=True, exist_ok=True)
    FluxPipeline.save_lora_weights(folder, transformer_lora_layers=layers, weight_name=f"{name}.safetensors")
    return folder / f"{name}.safetensors"


def _tiny_sdxl_unet():
    # SDXL's shape in miniature: text_time conditioning, cross-attention only from the second block,
    # two 32-wide text encoders concatenated (64) and a 32-wide pooled projection (+ 6 x 8 time ids).
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 1), projection_class_embeddings_input_dim=80,
        cross_attention_dim=64, norm_num_groups=1,
    )


def tiny_sdxl_pipeline(seed: int = 0):
    """A StableDiffusionXLPipeline with tiny random weights: proves the LoRA manager is not FLUX-specific."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from deployments.tiny import _clip_text_config, tiny_clip_tokenizer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = tiny_clip_tokenizer()
        components = dict(
            unet=_tiny_sdxl_unet(),
            vae=AutoencoderKL(
                block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=1,
                down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2, sample_size=128,
            ),
            text_encoder=CLIPTextModel(_clip_text_config(tokenizer)),
            text_encoder_2=CLIPTextModelWithProjection(_clip_text_config(tokenizer)),
        )
    for module in components.values():
        module.eval()
    return StableDiffusionXLPipeline(
        **components, tokenizer=tokenizer, tokenizer_2=tiny_clip_tokenizer(), scheduler=EulerDiscreteScheduler()
    )


def make_sdxl_lora(folder: Path, name: str, seed: int = 0, strength: float = 8.0) -> Path:
    """`<folder>/<name>.safetensors`: a LoRA on the tiny SDXL-shaped UNet (non-zero lora_B times
    `strength`), via StableDiffusionXLPipeline.save_lora_weights."""
    import torch
    from diffusers import StableDiffusionXLPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    unet = _tiny_sdxl_unet()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False))
    layers = {key: value * strength if "lora_B" in key else value
              for key, value in get_peft_model_state_dict(unet).items()}
    folder.mkdir(parents=True, exist_ok=True)
    StableDiffusionXLPipeline.save_lora_weights(folder, unet_lora_layers=layers, weight_name=f"{name}.safetensors")
    return folder / f"{name}.safetensors"

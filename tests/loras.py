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

    from deployments.families.flux import FAMILY

    transformer = FAMILY.build_tiny().transformer
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        config = LoraConfig(r=rank, lora_alpha=rank, target_modules=FLUX_TARGETS, init_lora_weights=False)
        transformer.add_adapter(config)
    layers = {key: value * strength if "lora_B" in key else value
              for key, value in get_peft_model_state_dict(transformer).items()}
    folder.mkdir(parents=True, exist_ok=True)
    FluxPipeline.save_lora_weights(folder, transformer_lora_layers=layers, weight_name=f"{name}.safetensors")
    return folder / f"{name}.safetensors"


def make_sdxl_lora(folder: Path, name: str, seed: int = 0, strength: float = 8.0) -> Path:
    """`<folder>/<name>.safetensors`: a LoRA on the tiny SDXL UNet the dev profile serves (non-zero
    lora_B times `strength`), via StableDiffusionXLPipeline.save_lora_weights."""
    import torch
    from diffusers import StableDiffusionXLPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    from deployments.families.sdxl import build_tiny_sdxl

    unet = build_tiny_sdxl().unet
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False))
    layers = {key: value * strength if "lora_B" in key else value
              for key, value in get_peft_model_state_dict(unet).items()}
    folder.mkdir(parents=True, exist_ok=True)
    StableDiffusionXLPipeline.save_lora_weights(folder, unet_lora_layers=layers, weight_name=f"{name}.safetensors")
    return folder / f"{name}.safetensors"

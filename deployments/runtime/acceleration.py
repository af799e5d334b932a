"""Applying a model's acceleration tier to its loaded pipeline: the one generic path every family shares.

The tier is `ImageModelConfig.acceleration`; the family's `AccelerationSupport` was checked against
it when the config loaded. What only the replica knows is checked here, before anything is changed:
the device (fp8 needs CUDA compute capability 8.9+, the `_native_flash`/`_native_cudnn` attention
backends need CUDA) and the installed packages (quantization needs torchao). A tier that cannot run
fails the replica's start with `AccelerationError`, naming the field and why.

The order matters: QKV fusion and quantization change the modules that compilation then traces;
the cache hook is registered before compiling so the compiled blocks are the ones it wraps.
Everything is done in place on the pipeline's modules, so every pipeline built from the same modules
(ControlNet, image-to-image and inpainting ones) runs accelerated too. Compilation itself is lazy: the first call traces
and compiles, which is what the replica's warm-up is for.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from deployments.config import AccelerationConfig
    from deployments.runtime.loading import Placement

logger = logging.getLogger("ray.serve")

# fp8 matmuls (torch._scaled_mm) run on Ada (8.9) and Hopper (9.0) and newer.
FP8_MIN_CAPABILITY = (8, 9)
_CUDA_ONLY_BACKENDS = ("_native_flash", "_native_cudnn")


class AccelerationError(RuntimeError):
    """An acceleration tier this replica cannot run; the message names the field."""


@dataclass(frozen=True)
class AccelerationSupport:
    """What a family's denoiser supports of the acceleration tiers (`deployments.config.AccelerationConfig`):
    each family declares one (`ImageFamily.acceleration`), and its config entries are checked against it.

    `denoiser`: the pipeline attribute compiled, quantized and cached (`transformer`, `unet`).
    `repeated_blocks`: it declares `_repeated_blocks`, so `compile: repeated_blocks` applies.
    `cache_hooks`: the diffusers cache hooks it takes (`first_block`; a UNet takes none).
    `fuse_qkv`: it has `fuse_qkv_projections`. `channels_last`: its convolutions gain from it.
    Compilation, quantization and attention backends need nothing of the family.
    """

    denoiser: str = "transformer"
    repeated_blocks: bool = False
    cache_hooks: tuple[str, ...] = ()
    fuse_qkv: bool = False
    channels_last: bool = False

    def unsupported(self, tier: "AccelerationConfig") -> str | None:
        """Why this family cannot run `tier` (naming the field), or None when it can."""
        if tier.compile == "repeated_blocks" and not self.repeated_blocks:
            return f"compile: repeated_blocks: this family's {self.denoiser} declares no repeated blocks; use 'full'"
        if tier.cache is not None and tier.cache.kind not in self.cache_hooks:
            have = ", ".join(self.cache_hooks) or "none"
            return f"cache.kind: {tier.cache.kind!r} is not a cache hook this family's {self.denoiser} takes ({have})"
        if tier.fuse_qkv and not self.fuse_qkv:
            return f"fuse_qkv: this family's {self.denoiser} cannot fuse its QKV projections"
        if tier.channels_last and not self.channels_last:
            return f"channels_last: this family's {self.denoiser} has no convolutions that gain from it"
        return None



def check_hardware(tier: "AccelerationConfig", placement: "Placement") -> None:
    """Raise AccelerationError when this replica's device or packages cannot run `tier`."""
    if placement.simulated is not None:
        _check_simulated(tier, placement.simulated)
        return
    if tier.quantization == "fp8_dynamic":
        capability = _cuda_capability(placement)
        if capability is None:
            raise AccelerationError(
                f"acceleration.quantization: 'fp8_dynamic' needs a CUDA GPU of compute capability "
                f"{FP8_MIN_CAPABILITY[0]}.{FP8_MIN_CAPABILITY[1]} or newer (Ada, Hopper); this replica runs on "
                f"{placement.device}"
            )
        if capability < FP8_MIN_CAPABILITY:
            raise AccelerationError(
                f"acceleration.quantization: 'fp8_dynamic' needs compute capability 8.9 or newer; this GPU has "
                f"{capability[0]}.{capability[1]} (use 'int8_weight_only')"
            )
    if tier.quantization != "none" and importlib.util.find_spec("torchao") is None:
        raise AccelerationError(
            f"acceleration.quantization: {tier.quantization!r} needs the torchao package, which is not installed "
            "in this replica's environment (pip install torchao)"
        )
    if tier.attention_backend in _CUDA_ONLY_BACKENDS and placement.device != "cuda":
        raise AccelerationError(
            f"acceleration.attention_backend: {tier.attention_backend!r} runs on CUDA only; this replica runs on "
            f"{placement.device} (use 'native' or 'default')"
        )


def _check_simulated(tier: "AccelerationConfig", key: str) -> None:
    """A simulated card runs every tier but fp8 where it has no fp8 tensor cores, as the real card would."""
    from deployments.sim_profiles import profile

    card = profile(key)
    if tier.quantization == "fp8_dynamic" and card.fp8_tflops is None:
        raise AccelerationError(f"acceleration.quantization: 'fp8_dynamic' needs fp8 tensor cores, which the simulated "
                                f"{card.name} has not (use 'int8_weight_only')")


def _cuda_capability(placement: "Placement") -> tuple[int, int] | None:
    if placement.device != "cuda":
        return None
    import torch

    return torch.cuda.get_device_capability()


def accelerate(pipeline, tier: "AccelerationConfig", support: "AccelerationSupport", placement: "Placement") -> None:
    """Apply `tier` to `pipeline` in place (see the module's docstring for the order and the checks)."""
    check_hardware(tier, placement)
    if not tier.active():
        return
    import torch

    denoiser = getattr(pipeline, support.denoiser)
    if tier.fuse_qkv:
        denoiser.fuse_qkv_projections()
    if tier.quantization != "none":
        _quantize(denoiser, tier.quantization)
    if tier.cache is not None:
        from diffusers import FirstBlockCacheConfig

        denoiser.enable_cache(FirstBlockCacheConfig(threshold=tier.cache.threshold))
    if tier.attention_backend != "default":
        denoiser.set_attention_backend(tier.attention_backend)
    if tier.channels_last:
        denoiser.to(memory_format=torch.channels_last)
        pipeline.vae.to(memory_format=torch.channels_last)
    if tier.compile == "repeated_blocks":
        denoiser.compile_repeated_blocks(mode=tier.compile_mode, fullgraph=tier.fullgraph)
    elif tier.compile == "full":
        denoiser.compile(mode=tier.compile_mode, fullgraph=tier.fullgraph)
    logger.info("acceleration applied to %s: %s", support.denoiser, tier.active())


def _quantize(module, kind: str) -> None:
    """torchao's in-place quantization of the module's linear layers (the same kernels diffusers'
    TorchAoConfig uses when it quantizes at from_pretrained)."""
    from torchao.quantization import quantize_

    if kind == "fp8_dynamic":
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow

        quantize_(module, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
    else:
        from torchao.quantization import Int8WeightOnlyConfig

        quantize_(module, Int8WeightOnlyConfig())

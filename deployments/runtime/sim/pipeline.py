"""The pipeline-like object a family's loaded model calls on a simulated device.

`SimulatedPipeline` takes the arguments of a diffusers text-to-image, image-to-image or inpainting
pipeline call (what `LoadedImageModel.pipeline_kwargs` builds), so the generator's code path is the
real one: the lock, batching, the step callback with its progress and cancel, metrics, the
out-of-memory path. A call holds its activations in the GPU's ledger, sleeps through its modelled
phases (text encoding, then each denoising step followed by `callback_on_step_end`, then the VAE
decode) without using the CPU, and returns a cheap deterministic picture of each image's seed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from types import SimpleNamespace

import numpy as np

from deployments.runtime.sim import flops as counted
from deployments.runtime.sim import memory, timing
from deployments.runtime.types import denoising_steps
from deployments.sim_profiles import Profile, profile

# The seed's picture: a grid of this many random colours, each a block of the image.
PICTURE_CELLS = 4


def seed_picture(seed: int, width: int, height: int) -> np.ndarray:
    """A (height, width, 3) float image in [0, 1]: blocks of colour drawn from `seed`, nothing more."""
    colours = np.random.default_rng(seed).random((PICTURE_CELLS, PICTURE_CELLS, 3), dtype=np.float32)
    rows = np.arange(height) * PICTURE_CELLS // height
    columns = np.arange(width) * PICTURE_CELLS // width
    return colours[rows[:, None], columns[None, :]]


@dataclass
class SimulatedPipeline:
    """A diffusers pipeline's call, modelled on `card` (see the module's docstring)."""

    arch: str
    card: Profile
    tier: str
    dtype: str
    classifier_free_guidance: bool
    vae_slicing: bool
    ledger: memory.Ledger
    owner: str
    class_name: str
    quantization: str = "none"

    def set_progress_bar_config(self, **_) -> None:
        """Nothing to show: the same switch as a diffusers pipeline's."""

    def describe(self) -> dict:
        """What the replica's info shows: the modelled card, tier and architecture, and its GPU's memory."""
        return {"profile": self.card.key, "card": self.card.name, "tier": self.tier, "architecture": self.arch,
                "weights_gb": round(memory.weight_bytes(self.arch, self.dtype, self.quantization) / 1e9, 2),
                "gpu_used_gb": round(self.ledger.used() / 1e9, 2), "gpu_capacity_gb": self.card.memory_gb}

    def derive(self, class_name: str) -> "SimulatedPipeline":
        """The image-to-image or inpainting pipeline over the same simulated model."""
        return replace(self, class_name=class_name)

    def __call__(self, *, generator: list, num_inference_steps: int, guidance_scale: float = 0.0,
                 width: int | None = None, height: int | None = None, image=None, strength: float = 1.0,
                 max_sequence_length: int | None = None, callback_on_step_end=None, **_) -> SimpleNamespace:
        if width is None or height is None:  # SDXL's edit pipelines take their size from the image
            width, height = image[0].size
        steps = num_inference_steps if image is None else denoising_steps(num_inference_steps, strength)
        cfg = self.classifier_free_guidance and guidance_scale > 1
        shape = timing.ImageShape(self.arch, width, height, steps, len(generator), cfg, max_sequence_length)
        call = timing.image_call(shape, self.card, self.tier)
        self.ledger.reserve(f"{self.owner}:call", memory.image_activation_bytes(
            self.arch, width, height, len(generator), cfg, self.dtype, self.vae_slicing, max_sequence_length))
        try:
            time.sleep(call.fixed_s + call.encode_s)
            for step in range(steps):
                time.sleep(call.step_s)
                if callback_on_step_end is not None:
                    callback_on_step_end(self, step, step, {})
            time.sleep(call.decode_s)
        finally:
            self.ledger.release(f"{self.owner}:call")
        return SimpleNamespace(images=np.stack([seed_picture(one.initial_seed(), width, height) for one in generator]))


def load_simulated(family, config, placement) -> SimulatedPipeline:
    """The simulated pipeline of an image entry: its architecture from `config.source`, its weights
    (and this process's CUDA context) held in the GPU's ledger, so a model that cannot fit fails here."""
    arch = counted.architecture_for(config.source)
    card = profile(placement.simulated)
    quantization = config.acceleration.quantization
    ledger = memory.Ledger(memory.gpu_key(card.key), card.memory_bytes, card.key)
    ledger.reserve("cuda-context", memory.CUDA_CONTEXT_BYTES)
    ledger.reserve(f"{config.id}:weights", memory.weight_bytes(arch, placement.dtype_name, quantization))
    return SimulatedPipeline(
        arch=arch, card=card, tier=timing.tier_of(config.acceleration), dtype=placement.dtype_name,
        classifier_free_guidance=family.negative_prompt, vae_slicing=config.vae.slicing, ledger=ledger,
        owner=config.id, class_name=family.pipeline_class, quantization=quantization)

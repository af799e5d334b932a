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


class _OnCard:
    """What both simulated pipelines answer alike (each has `arch`, `card`, `tier`, `ledger`,
    `cold_start` and `weight_bytes()`)."""

    def set_progress_bar_config(self, **_) -> None:
        """Nothing to show: the same switch as a diffusers pipeline's."""

    def describe(self) -> dict:
        """What the replica's info shows: the modelled card, tier and architecture, and its GPU's memory."""
        return {"profile": self.card.key, "card": self.card.name, "tier": self.tier, "architecture": self.arch,
                "weights_gb": round(self.weight_bytes() / 1e9, 2),
                "gpu_used_gb": round(self.ledger.used() / 1e9, 2), "gpu_capacity_gb": self.card.memory_gb,
                "cold_start": None if self.cold_start is None else self.cold_start.describe()}


@dataclass
class SimulatedPipeline(_OnCard):
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
    weights: str = "native"
    cold_start: timing.ColdStart | None = None  # None: the entry skipped it (`simulated_cold_start: false`)

    def weight_bytes(self) -> int:
        return memory.weight_bytes(self.arch, self.dtype, self.quantization, self.weights)

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
        activation = memory.image_activation_bytes(self.arch, width, height, len(generator), cfg, self.dtype,
                                                   self.vae_slicing, max_sequence_length)
        _run_call(self, self.ledger, self.owner, activation, call, steps, callback_on_step_end)
        return SimpleNamespace(images=np.stack([seed_picture(one.initial_seed(), width, height) for one in generator]))


def _run_call(pipeline, ledger: memory.Ledger, owner: str, activation_bytes: int, call, steps: int,
              callback_on_step_end) -> None:
    """One modelled call: hold its activations in the card's ledger, wait its encode, each step (with
    the step callback, as diffusers calls it: progress and cancel) and its decode, then free them."""
    ledger.reserve(f"{owner}:call", activation_bytes)
    try:
        time.sleep(call.fixed_s + call.encode_s)
        for step in range(steps):
            time.sleep(call.step_s)
            if callback_on_step_end is not None:
                callback_on_step_end(pipeline, step, step, {})
        time.sleep(call.decode_s)
    finally:
        ledger.release(f"{owner}:call")


def _held(arch: str, config, placement, quantization: str = "none") -> memory.Ledger:
    """The GPU's ledger, holding this process's CUDA context and this entry's weights (an on-demand
    entry's only while it is on the card: its holder's `LedgerSwap`): a model that cannot fit fails
    here, at load, as on a real card."""
    card = profile(placement.simulated)
    ledger = memory.Ledger(memory.gpu_key(card.key), card.memory_bytes, card.key)
    ledger.reserve("cuda-context", memory.CUDA_CONTEXT_BYTES)
    if config.memory.residency != "on_demand":
        ledger.reserve(f"{config.id}:weights", memory.weight_bytes(arch, placement.dtype_name, quantization,
                                                                   config.memory.weights))
    return ledger


def entry_cold_start(arch: str, config, placement, quantization: str = "none") -> timing.ColdStart | None:
    """Wait an entry's modelled cold start (`timing.ColdStart`); None, at once, where its device says
    `simulated_cold_start: false`. The files are read as stored (the dtype's bytes, or a GGUF/nf4
    file's), the copy is what the card then holds (nothing for an on-demand model: each move in pays
    its own copy)."""
    if not placement.simulated_cold_start:
        return None
    read = memory.weight_bytes(arch, placement.dtype_name, "none", config.memory.weights)
    copy = 0 if config.memory.residency == "on_demand" else memory.weight_bytes(
        arch, placement.dtype_name, quantization, config.memory.weights)
    return timing.wait_cold_start(profile(placement.simulated), read, copy, config.id)


def load_simulated(family, config, placement) -> SimulatedPipeline:
    """The simulated pipeline of an image entry: its architecture from `config.source`."""
    arch = counted.architecture_for(config.source)
    card = profile(placement.simulated)
    quantization = config.acceleration.quantization
    ledger = _held(arch, config, placement, quantization)
    return SimulatedPipeline(
        arch=arch, card=card, tier=timing.tier_of(config.acceleration), dtype=placement.dtype_name,
        classifier_free_guidance=family.negative_prompt, vae_slicing=config.vae.slicing, ledger=ledger,
        owner=config.id, class_name=family.pipeline_class, quantization=quantization, weights=config.memory.weights,
        cold_start=entry_cold_start(arch, config, placement, quantization))


@dataclass
class SimulatedVideoPipeline(_OnCard):
    """A diffusers image-to-video pipeline's call (Stable Video Diffusion's arguments), modelled on
    `card`: the conditioning image's encoder, each step over every frame, the VAE over every frame."""

    arch: str
    card: Profile
    tier: str
    dtype: str
    ledger: memory.Ledger
    owner: str
    weights: str = "native"
    cold_start: timing.ColdStart | None = None

    def weight_bytes(self) -> int:
        return memory.weight_bytes(self.arch, self.dtype, weights=self.weights)

    @property
    def unet(self) -> SimpleNamespace:
        """The denoiser's published config, where a diffusers pipeline exposes it."""
        return SimpleNamespace(config=SimpleNamespace(**counted.architecture(self.arch)["unet"]["config"]))

    def __call__(self, *, width: int, height: int, num_frames: int, num_inference_steps: int, generator,
                 callback_on_step_end=None, decode_chunk_size: int | None = None, max_guidance_scale: float | None = None,
                 **_) -> SimpleNamespace:
        guidance = counted.architecture(self.arch)["guidance_scale"] if max_guidance_scale is None else max_guidance_scale
        cfg = guidance > 1  # diffusers' SVD guides when its max_guidance_scale is above 1
        call = timing.video_call(self.arch, width, height, num_frames, num_inference_steps, cfg, self.card, self.tier)
        activation = memory.video_activation_bytes(self.arch, width, height, num_frames, cfg, self.dtype,
                                                   decode_chunk_size or num_frames)
        _run_call(self, self.ledger, self.owner, activation, call, num_inference_steps, callback_on_step_end)
        picture = seed_picture(generator.initial_seed(), width, height)
        # Each frame the picture moved a little, so a player shows motion.
        frames = np.stack([np.roll(picture, frame * max(1, width // 64), axis=1) for frame in range(num_frames)])
        return SimpleNamespace(frames=[frames])


def load_simulated_video(config, placement) -> SimulatedVideoPipeline:
    """The simulated pipeline of a video entry: its architecture from `config.source`."""
    arch = counted.architecture_for(config.source)
    if "image_encoder" not in counted.architecture(arch):
        raise ValueError(f"source: {config.source!r} is not an image-to-video architecture a simulated device models")
    ledger = _held(arch, config, placement)
    return SimulatedVideoPipeline(arch=arch, card=profile(placement.simulated), tier="eager", dtype=placement.dtype_name,
                                  ledger=ledger, owner=config.id, weights=config.memory.weights,
                                  cold_start=entry_cold_start(arch, config, placement))

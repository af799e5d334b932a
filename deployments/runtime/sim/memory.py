"""The memory plan of a simulated model, and the ledger of each simulated GPU.

Plan (bytes), computed from the published architecture, never measured:
- weights: every component's parameter count (on the meta device) x the dtype's bytes; a quantized
  denoiser (fp8_dynamic, int8_weight_only) keeps its linear layers' weights in 1 byte each;
- activations of one call, the largest of its phases, which run one after another:
  denoiser  12 x batch x tokens x width x dtype bytes, where tokens are the latent patches (plus the
            text tokens for a transformer), width the hidden size (a UNet: its first block's channels
            at 1/8 of the image's size), batch the images (twice under classifier-free guidance).
            12 widths per token: the block's input and its norm, Q, K, V, the attention's output and
            the MLP's 4x expansion alive at once (attention runs as SDPA, whose score matrix is
            never stored);
  VAE       6 x images decoded at once (1 with vae.slicing) x H x W x the decoder's first block's
            channels x dtype bytes: the full-resolution up block's input, its two convolutions'
            outputs, the norm and the residual;
- a CUDA context per process: `CUDA_CONTEXT_BYTES`.

Ledger: one JSON file per simulated GPU (`<ledger dir>/<key>.json`, in /dev/shm where there is one:
`ledger_dir`; the key naming the Ray
node, the profile and the GPU index Ray gave the replica), changed under an exclusive file lock, so
every deployment placed on that GPU draws from the same capacity. Entries belong to a process and
are dropped when it is gone. Going over capacity raises `torch.OutOfMemoryError` with CUDA's
message, so the caller takes the same path as a real CUDA out-of-memory error (a 503 `out_of_memory`
for a request; a failed start for weights that do not fit).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from deployments.runtime.sim import flops as counted

GIB = 2**30
# What a process's CUDA context takes on the card before any tensor (CUDA 12 with lazy module
# loading: 300-600 MiB depending on the kernels touched); the middle of that range.
CUDA_CONTEXT_BYTES = 512 * 2**20
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
TRANSFORMER_WIDTHS_ALIVE = 12
VAE_MAPS_ALIVE = 6


# Bytes of one linear-layer weight of the denoiser, by how `memory.weights` stores it:
# - fp8: float8_e4m3fn, 1 byte (diffusers' layerwise casting upcasts per layer at compute);
# - gguf_q8_0: blocks of 32 weights as 32 int8 plus one fp16 scale, 34 bytes per 32 (ggml's block_q8_0);
# - gguf_q4_0: blocks of 32 as 16 bytes of nibbles plus one fp16 scale, 18 bytes per 32 (ggml's block_q4_0);
# - nf4: 4 bits plus one fp32 absmax per block of 64 (bitsandbytes' default blocksize, no double quant).
# Other parameters (norms, embeddings, biases outside linear layers) keep the dtype's bytes.
LINEAR_BYTES = {"fp8": 1.0, "gguf_q8_0": 34 / 32, "gguf_q4_0": 18 / 32, "nf4": 0.5 + 4 / 64}
# torchao's quantized tiers (`acceleration.quantization`) hold linear weights in 1 byte each.
TORCHAO_LINEAR_BYTES = 1.0


def component_bytes(arch: str, component: str, dtype: str, quantization: str = "none", weights: str = "native") -> int:
    """Bytes of one component's weights; a denoiser's linear weights as `weights` (or torchao) stores them."""
    size = DTYPE_BYTES[dtype]
    params, linear = counted.parameters(arch, component)
    if component not in counted.DENOISERS:
        return params * size
    per_linear = LINEAR_BYTES.get(weights) or (TORCHAO_LINEAR_BYTES if quantization != "none" else size)
    return int(round((params - linear) * size + linear * per_linear))


def weight_bytes(arch: str, dtype: str, quantization: str = "none", weights: str = "native") -> int:
    """Bytes of every component's weights (see `component_bytes`)."""
    return sum(component_bytes(arch, component, dtype, quantization, weights) for component in counted.components(arch))


def image_activation_bytes(arch: str, width: int, height: int, images: int, cfg: bool, dtype: str,
                           vae_slicing: bool, text_tokens: int | None = None) -> int:
    """The activation peak of one image pipeline call (the formula in the module's docstring)."""
    spec = counted.architecture(arch)
    size = DTYPE_BYTES[dtype]
    batch = images * (2 if cfg else 1)
    if "transformer" in spec:
        config = spec["transformer"]["config"]
        tokens = (width // 16) * (height // 16) + (text_tokens or spec.get("max_sequence_length", counted.CLIP_TOKENS))
        hidden = config["num_attention_heads"] * config["attention_head_dim"]
    else:
        tokens = (width // 8) * (height // 8)
        hidden = spec["unet"]["config"]["block_out_channels"][0]
    denoiser = TRANSFORMER_WIDTHS_ALIVE * batch * tokens * hidden * size
    channels = spec["vae"]["config"]["block_out_channels"][0]
    vae = VAE_MAPS_ALIVE * (1 if vae_slicing else images) * width * height * channels * size
    return max(denoiser, vae)


def video_activation_bytes(arch: str, width: int, height: int, frames: int, cfg: bool, dtype: str,
                           decode_chunk: int) -> int:
    """The activation peak of one video pipeline call: the UNet's over every frame (as an image
    UNet's, the frames its batch), the VAE's over `decode_chunk` frames at a time."""
    spec = counted.architecture(arch)
    size = DTYPE_BYTES[dtype]
    latent = (width // 8) * (height // 8)
    denoiser = TRANSFORMER_WIDTHS_ALIVE * frames * (2 if cfg else 1) * latent * spec["unet"]["config"]["block_out_channels"][0] * size
    vae = VAE_MAPS_ALIVE * min(decode_chunk, frames) * width * height * spec["vae"]["config"]["block_out_channels"][0] * size
    return max(denoiser, vae)


def model_activation_bytes(arch: str, tokens: int, batch: int, dtype: str) -> int:
    """The activation peak of a one-model call (the scorer, the LLM): as a transformer denoiser's."""
    config = counted.architecture(arch)["model"]["config"]
    hidden = config.get("hidden_size") or config["vision_config"]["hidden_size"]
    return TRANSFORMER_WIDTHS_ALIVE * batch * tokens * hidden * DTYPE_BYTES[dtype]


def ledger_dir() -> Path:
    """Where the ledgers are: in memory (/dev/shm) where the machine has it, since a ledger only says
    what running processes hold and every simulated call writes it twice (on disk, a write under load
    took milliseconds of the call); under the cache directory when GENSERVE_SIM_CACHE names one (tests
    give each their own), or without /dev/shm."""
    shared = Path("/dev/shm")
    if os.environ.get("GENSERVE_SIM_CACHE") or not shared.is_dir():
        return counted.cache_dir() / "ledger"
    return shared / "genserve-sim-ledger"


def gpu_key(profile_key: str) -> str:
    """Which simulated GPU this process is on: its Ray node, the profile and the GPU index Ray gave it."""
    node, index = "local", "0"
    try:
        import ray

        if ray.is_initialized():
            node = ray.get_runtime_context().get_node_id()[:16]
            ids = ray.get_gpu_ids()
            index = str(ids[0]) if ids else index
    except Exception:  # outside Ray: one simulated GPU per profile on this machine
        pass
    return f"{node}-{profile_key}-gpu{index}"


def out_of_memory(asked: int, used: int, capacity: int, index: str, profile_key: str) -> Exception:
    import torch

    return torch.OutOfMemoryError(
        f"CUDA out of memory. Tried to allocate {asked / GIB:.2f} GiB (GPU {index}; {capacity / GIB:.2f} GiB total "
        f"capacity; {used / GIB:.2f} GiB already allocated; simulated {profile_key})")


@dataclass
class Ledger:
    """The reservations on one simulated GPU, shared by every process placed on it."""

    key: str
    capacity: int
    profile_key: str

    @property
    def path(self) -> Path:
        return ledger_dir() / f"{self.key}.json"

    def reserve(self, owner: str, nbytes: int) -> None:
        """Hold `nbytes` for `owner` (of this process), or raise CUDA's out-of-memory error."""
        with counted._locked(self.path.with_suffix(".lock")):
            entries = self._live()
            name = f"{os.getpid()}:{owner}"
            used = sum(value for key, value in entries.items() if key != name)
            if used + nbytes > self.capacity:
                raise out_of_memory(nbytes, used, self.capacity, self.key.rsplit("gpu", 1)[-1], self.profile_key)
            entries[name] = nbytes
            counted._write(self.path, entries)

    def release(self, owner: str) -> None:
        with counted._locked(self.path.with_suffix(".lock")):
            entries = self._live()
            entries.pop(f"{os.getpid()}:{owner}", None)
            counted._write(self.path, entries)

    def used(self) -> int:
        with counted._locked(self.path.with_suffix(".lock")):
            return sum(self._live().values())

    def _live(self) -> dict[str, int]:
        """The entries whose process still runs."""
        try:
            entries = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        return {key: value for key, value in entries.items() if _alive(int(key.split(":", 1)[0]))}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True

"""The one loading path every model deployment shares.

A model source is a Hugging Face repo id, a local folder, or `tiny`. Repo ids and folders both go
through the library's own `from_pretrained` (safetensors); `tiny` builds a random-weight model of
the same class in process (see `deployments.tiny`). Device and dtype come from what torch really
sees, so logical GPUs declared to Ray on a CPU machine still run on the CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from deployments.config import TINY, DeviceOptions

if TYPE_CHECKING:
    import torch

_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


@dataclass(frozen=True)
class Placement:
    """The device and dtype a replica's model lives on, and the CUDA memory cap applied, if any."""

    device: str
    dtype_name: str
    memory_fraction: float | None = None

    @property
    def dtype(self) -> "torch.dtype":
        import torch

        return getattr(torch, self.dtype_name)


def resolve_placement(options: DeviceOptions) -> Placement:
    """Pick the device and dtype from the options and from what torch sees, and cap CUDA memory.

    `auto` means CUDA only when `torch.cuda.is_available()`; asking for `cuda` where torch sees
    none is an error, not a silent fallback to the CPU. On CUDA, `memory_fraction` caps this
    process's allocations: Ray's fractional `num_gpus` only decides where a replica is scheduled,
    so without the cap one replica could take the memory of every other replica on its card.
    """
    import torch

    if options.torch_threads is not None:
        torch.set_num_threads(options.torch_threads)
    has_cuda = torch.cuda.is_available()
    if options.device == "cuda" and not has_cuda:
        raise RuntimeError("device: 'cuda' was asked for, but torch sees no CUDA device in this replica")
    device = "cuda" if options.device == "cuda" or (options.device == "auto" and has_cuda) else "cpu"
    if options.dtype == "auto":
        dtype_name = "bfloat16" if device == "cuda" else "float32"
    else:
        dtype_name = _DTYPES[options.dtype]
    memory_fraction = cuda_memory_fraction(device, options)
    if memory_fraction is not None:
        # Ray sets CUDA_VISIBLE_DEVICES to the replica's GPU, so the current device is that GPU.
        torch.cuda.set_per_process_memory_fraction(memory_fraction)
    return Placement(device=device, dtype_name=dtype_name, memory_fraction=memory_fraction)


def cuda_memory_fraction(device: str, options: DeviceOptions) -> float | None:
    """The memory cap to apply: `options.memory_fraction` on CUDA; none on the CPU, which Ray does not share out."""
    return options.memory_fraction if device == "cuda" else None


def is_tiny(source: str) -> bool:
    return source == TINY


def pretrained_location(source: str) -> str:
    """What `from_pretrained` is given: a local folder (checked to exist) or a hub repo id."""
    if source.startswith(("/", "./", "../", "~")):
        path = Path(os.path.expanduser(source)).resolve()
        if not path.is_dir():
            raise FileNotFoundError(f"model source folder {source!r} does not exist on this node")
        return str(path)
    return source


def load_diffusers_pipeline(pipeline_class: str, source: str, placement: Placement, build_tiny: Callable[[], Any]):
    """The one loading path of a diffusers pipeline, on the CPU in the placement's dtype.

    A hub repo id or local folder goes through `<pipeline_class>.from_pretrained` (safetensors
    only); `tiny` calls `build_tiny`, which makes the same class with random weights. The caller
    moves it to its device (or sets up offloading).
    """
    if is_tiny(source):
        pipeline = build_tiny().to(dtype=placement.dtype)
    else:
        import diffusers

        pipeline = getattr(diffusers, pipeline_class).from_pretrained(
            pretrained_location(source), dtype=placement.dtype, use_safetensors=True
        )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def seeded_generators(seeds: list[int], device: str) -> list["torch.Generator"]:
    """One torch generator per image, so each image's noise depends on its own seed only."""
    import torch

    return [torch.Generator(device=device).manual_seed(seed) for seed in seeds]


def to_uint8_images(images) -> "object":
    """Float images in [0, 1], shape (N, H, W, 3), to a uint8 numpy array."""
    import numpy as np

    array = np.asarray(images, dtype=np.float32)
    return (np.clip(array, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def check_device_health(placement: Placement) -> None:
    """Raise when the replica's accelerator can no longer run work.

    After a sticky CUDA error (an illegal memory access, say) every later call fails;
    synchronising surfaces it, so Serve's health check replaces the replica. A CPU has no such
    state to check.
    """
    if placement.device == "cuda":
        import torch

        torch.cuda.synchronize()

"""The one loading path every model deployment shares.

A model source is a Hugging Face repo id, a local folder, or `tiny`. Repo ids and folders both go
through the library's own `from_pretrained` (safetensors); `tiny` builds a random-weight model of
the same class in process (see `deployments.runtime.tiny`). Device and dtype come from what torch really
sees, so logical GPUs declared to Ray on a CPU machine still run on the CPU.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from deployments.config import TINY, DeviceOptions, is_local_path, local_path

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)
_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


@dataclass(frozen=True)
class Placement:
    """The device and dtype a replica's model lives on, and the CUDA memory cap applied, if any."""

    device: str
    dtype_name: str
    memory_fraction: float | None = None
    simulated_cold_start: bool = True  # a simulated model waits its modelled load (deployments.runtime.sim.timing)

    @property
    def dtype(self) -> "torch.dtype":
        import torch

        return getattr(torch, self.dtype_name)

    @property
    def torch_device(self) -> str:
        """Where this replica's tensors live: its device, or the CPU for a simulated one (whose
        inputs are prepared as a real run's are, and whose model is modelled)."""
        return "cpu" if self.simulated is not None else self.device

    @property
    def simulated(self) -> str | None:
        """The profile of a simulated device (`sim:<profile>`), None on a real one."""
        from deployments.sim_profiles import simulated_profile

        return simulated_profile(self.device)


def resolve_placement(options: DeviceOptions) -> Placement:
    """Pick the device and dtype from the options and from what torch sees, and cap CUDA memory.

    `auto` means CUDA only when `torch.cuda.is_available()` (a warning says so when Ray gave the
    replica a GPU share anyway); asking for `cuda` where torch sees none is an error naming the
    deployment, its share, what torch reports and the likely cause, not a silent fallback to the CPU. On CUDA, `memory_fraction` caps this
    process's allocations: Ray's fractional `num_gpus` only decides where a replica is scheduled,
    so without the cap one replica could take the memory of every other replica on its card.
    """
    import torch

    if options.torch_threads is not None:
        torch.set_num_threads(options.torch_threads)
    if options.simulated is not None:  # nothing runs on a device: the model is modelled (deployments.runtime.sim)
        dtype_name = "bfloat16" if options.dtype == "auto" else _DTYPES[options.dtype]
        return Placement(device=options.device, dtype_name=dtype_name, memory_fraction=options.memory_fraction,
                         simulated_cold_start=options.simulated_cold_start)
    has_cuda = torch.cuda.is_available()
    if not has_cuda and options.device in ("cuda", "auto"):
        share = _ray_gpu_share()
        if options.device == "cuda":
            raise NoCudaDevice(no_cuda_message(_replica_deployment(), share))
        if share:  # device: auto with a GPU share: runs, but say loudly why it is slow
            logger.warning("%s; running on the CPU because device is 'auto'", no_cuda_message(_replica_deployment(), share))
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


class NoCudaDevice(RuntimeError):
    """A replica configured for CUDA (or given a GPU share) sees no CUDA device."""


def no_cuda_message(deployment: str | None, share: float | None) -> str:
    """Why a replica that should run on CUDA cannot: who it is, what Ray gave it, what torch
    reports, and the likely cause, most specific first."""
    import torch

    who = deployment or "this replica"
    given = f"was given {share:g} of a GPU by Ray" if share else "was given no GPU share by Ray"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    facts = (f"torch {torch.__version__}, torch.version.cuda={torch.version.cuda}, "
             f"torch.cuda.device_count()={torch.cuda.device_count()}, CUDA_VISIBLE_DEVICES={visible!r}")
    if torch.version.cuda is None:
        cause = "this torch is a CPU-only build: install a CUDA build of torch (see docs/gpu.md)"
    elif not share:
        cause = "the deployment reserves no GPU (num_gpus unset or 0), so Ray hid the GPUs from it: set num_gpus"
    elif visible == "":
        cause = "CUDA_VISIBLE_DEVICES is empty in this process"
    else:
        cause = (f"the NVIDIA driver is missing or older than CUDA {torch.version.cuda} needs, or the GPU is not "
                 "mounted into this container (check `nvidia-smi` where the replica runs; "
                 "`genserve doctor CONFIG` checks a node)")
    return f"{who}: device 'cuda', and it {given}, but torch sees no CUDA device ({facts}). Likely cause: {cause}"


def _ray_gpu_share() -> float | None:
    """The GPU share Ray assigned this process (a Serve replica), or None outside Ray."""
    try:
        import ray

        if not ray.is_initialized():
            return None
        return ray.get_runtime_context().get_assigned_resources().get("GPU")
    except Exception:  # not in a Ray worker: nothing was assigned
        return None


def _replica_deployment() -> str | None:
    try:
        from ray import serve

        return serve.get_replica_context().deployment
    except Exception:  # not in a Serve replica (tests, the benchmark, scripts)
        return None


def in_serve_replica() -> bool:
    """Whether this code runs in a Serve replica (not in a test or an in-process benchmark)."""
    return _replica_deployment() is not None


def cuda_memory_fraction(device: str, options: DeviceOptions) -> float | None:
    """The memory cap to apply: `options.memory_fraction` on CUDA; none on the CPU, which Ray does not share out."""
    return options.memory_fraction if device == "cuda" else None


def is_tiny(source: str) -> bool:
    return source == TINY


def pretrained_location(source: str) -> str:
    """What `from_pretrained` is given: a local folder (checked to exist) or a hub repo id."""
    if is_local_path(source):
        path = local_path(source)
        if not path.is_dir():
            raise FileNotFoundError(f"model source folder {source!r} does not exist on this node")
        return str(path)
    return source


def load_diffusers_pipeline(pipeline_class: str, source: str, placement: Placement, build_tiny: Callable[[], Any],
                            variant: str | None = None, **components):
    """The one loading path of a diffusers pipeline, on the CPU in the placement's dtype.

    A hub repo id or local folder goes through `<pipeline_class>.from_pretrained` (safetensors
    only, `variant`'s files when given: see `deployments.runtime.weights.local_variant`); `tiny`
    calls `build_tiny`, which makes the same class with random weights. `components` replace the
    pipeline's own, passed to `from_pretrained` in place of loading them (a quantized denoiser:
    `quantized_denoiser`; Qwen-Image-Edit's processor without its video part). The caller moves it to
    its device (or sets up offloading: `place_pipeline`).
    """
    if is_tiny(source):
        pipeline = build_tiny().to(dtype=placement.dtype)
    else:
        import diffusers

        pipeline = getattr(diffusers, pipeline_class).from_pretrained(
            pretrained_location(source), dtype=placement.dtype, use_safetensors=True, variant=variant, **components
        )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


# Where the initial noise is drawn, whatever device the model runs on (PNG metadata `generator`).
NOISE_GENERATOR = "cpu"


def seeded_generators(seeds: list[int]) -> list["torch.Generator"]:
    """One CPU torch generator per image, so each image's noise depends on its own seed only.

    The noise is drawn on the CPU and moved to the model's device (diffusers' `randn_tensor` does
    that for a CPU generator), as diffusers' reproducibility guide recommends: CUDA's generator
    gives other numbers for the same seed, so a seed drawn there would mean a different starting
    noise on a GPU than on the CPU. A seed thus means the same initial noise on every machine;
    the pixels can still differ across GPUs, dtypes and library versions, since kernels differ.
    """
    import torch

    return [torch.Generator(device=NOISE_GENERATOR).manual_seed(seed) for seed in seeds]


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


def place_pipeline(pipeline, offload: str, placement: Placement):
    """CPU offload tiers apply on CUDA only; elsewhere (and with 'none') the pipeline moves to the device."""
    import logging

    if placement.device == "cuda" and offload == "model":
        pipeline.enable_model_cpu_offload()
        return pipeline
    if placement.device == "cuda" and offload == "sequential":
        pipeline.enable_sequential_cpu_offload()
        return pipeline
    if offload != "none":
        logging.getLogger("ray.serve").warning(
            "offload %r applies to CUDA only; on %s the model already lives in host memory", offload, placement.device)
    return pipeline.to(placement.device)


def gguf_path(memory) -> str:
    """The local path of `memory.gguf_file`: the file itself, or the hub file from the cache (or fetched,
    unless HF_HUB_OFFLINE: `genserve download` fetches it beforehand)."""
    repo, filename = memory.gguf_location()
    if repo is None:
        path = local_path(filename)
        if not path.is_file():
            raise FileNotFoundError(f"memory.gguf_file {filename!r} does not exist on this node")
        return str(path)
    from huggingface_hub import hf_hub_download

    return hf_hub_download(repo, filename)


def quantized_denoiser(denoiser: str, denoiser_class: str, source: str, memory, placement: Placement) -> dict:
    """The denoiser loaded as `memory.weights` stores it, as a component for `from_pretrained`
    ({} for native and fp8 weights, which load as usual and are cast afterwards: `store_weights`).

    - gguf_*: `<denoiser_class>.from_single_file` of the GGUF file, dequantized per layer at compute,
      its config read from `source`'s `<denoiser>/` folder (a local folder keeps it offline);
    - nf4: bitsandbytes 4-bit on load (CUDA only).
    """
    import diffusers

    model_class = getattr(diffusers, denoiser_class)
    if memory.weights.startswith("gguf"):
        if is_tiny(source):
            raise ValueError("memory.weights gguf_*: the denoiser's config comes from `source`, so it must be a "
                             "hub repo id or a local folder, not 'tiny'")
        config = diffusers.GGUFQuantizationConfig(compute_dtype=placement.dtype)
        model = model_class.from_single_file(gguf_path(memory), quantization_config=config, torch_dtype=placement.dtype,
                                             config=pretrained_location(source), subfolder=denoiser)
        return {denoiser: model}
    if memory.weights == "nf4":
        if placement.device != "cuda":
            raise ValueError(f"memory.weights 'nf4' needs a CUDA GPU (bitsandbytes); this replica runs on "
                             f"{placement.device}: use 'fp8' or a GGUF file there")
        config = diffusers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                              bnb_4bit_compute_dtype=placement.dtype)
        model = model_class.from_pretrained(pretrained_location(source), subfolder=denoiser, quantization_config=config,
                                            torch_dtype=placement.dtype)
        return {denoiser: model}
    return {}


def on_demand_in_host(config) -> bool:
    """An on-demand image entry without CPU offload loads into host RAM; its holder
    (deployments.runtime.residency) moves it to the GPU when a request needs it."""
    return config.memory.residency == "on_demand" and config.memory.offload == "none"


def denoiser_of(pipeline) -> str:
    """The attribute holding a pipeline's denoiser: `transformer` (FLUX, LTX) or `unet` (SDXL, SVD)."""
    return "transformer" if getattr(pipeline, "transformer", None) is not None else "unet"


def store_weights(pipeline, denoiser: str, weights: str, placement: Placement) -> None:
    """fp8 storage: the denoiser's weights kept in float8_e4m3fn and upcast layer by layer to the
    replica's dtype for compute (diffusers' layerwise casting: about half the memory of bf16 weights)."""
    if weights != "fp8":
        return
    import torch

    getattr(pipeline, denoiser).enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn,
                                                         compute_dtype=placement.dtype)

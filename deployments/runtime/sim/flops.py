"""FLOPs and parameter counts of the published architectures, counted on the meta device.

Each architecture in `deployments/architectures/` is a set of components (a denoiser, text
encoders, a VAE; or one model for the scorer and the LLM), each a library class and its published
config. A component is built with its parameters on the meta device (no memory, no weights) and
run once under `torch.utils.flop_counter.FlopCounterMode` on meta inputs of one shape: the matmuls,
convolutions and attention (`scaled_dot_product_attention` on meta runs as matmuls, so it is
counted; on a CPU its fused kernel would not be) are counted from their shapes alone.

A count is one forward pass of one image (or one prompt) at one shape; callers multiply by steps,
images and classifier-free guidance. Counting FLUX's 12B transformer takes seconds of CPU, so
counts are looked up in order: the table shipped with genserve (`deployments/architectures/flops.json`,
the default shapes; `python -m deployments.runtime.sim.flops` regenerates it), the node's cache
(`$GENSERVE_SIM_CACHE` or `~/.cache/genserve/sim`, `flops.json`, written under a file lock), and
only then counted, once per architecture, component and shape.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
from functools import cache
from pathlib import Path

ARCHITECTURES = Path(__file__).resolve().parents[2] / "architectures"
SHIPPED = ARCHITECTURES / "flops.json"
# Components of a pipeline architecture, by role; the scorer and LLM architectures have one `model`.
DENOISERS = ("transformer", "unet")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
DIFFUSERS_COMPONENTS = (*DENOISERS, "vae", "controlnet")
CLIP_TOKENS = 77
_lock = threading.Lock()


def cache_dir() -> Path:
    return Path(os.environ.get("GENSERVE_SIM_CACHE") or Path.home() / ".cache" / "genserve" / "sim")


@cache
def architecture(name: str) -> dict:
    return json.loads((ARCHITECTURES / f"{name}.json").read_text())


@cache
def architecture_for(source: str) -> str:
    """The architecture whose published sources include `source` (a hub repo id); ValueError otherwise."""
    names = sorted(path.stem for path in ARCHITECTURES.glob("*.json") if path.name != SHIPPED.name)
    for name in names:
        if source in architecture(name).get("sources", ()):
            return name
    known = [source for name in names for source in architecture(name).get("sources", ())]
    raise ValueError(f"a simulated device models a published architecture, so source must be one of {known}; "
                     f"got {source!r} (add its component configs to deployments/architectures/ to simulate it)")


def shape_key(component: str, **shape) -> str:
    return component + "".join(f"/{name}={value}" for name, value in sorted(shape.items()))


def flops(arch: str, component: str, **shape) -> float:
    """FLOPs of one forward pass of `component` of `arch` at `shape` (see `_inputs` for the shapes)."""
    key = shape_key(component, **shape)
    return _lookup(arch, "flops", key, lambda: _count(arch, component, shape))


def parameters(arch: str, component: str) -> tuple[int, int]:
    """(all parameters, those of linear layers) of `component`: what weights and quantization weigh."""
    return tuple(_lookup(arch, "parameters", component, lambda: _parameters(arch, component)))


def largest_leaf(arch: str, component: str) -> int:
    """Parameters of the largest module of `component` that holds its own parameters: what sequential
    CPU offload has on the GPU at once (accelerate's hooks move one such module at a time)."""
    return _lookup(arch, "largest_leaf", component, lambda: _largest_leaf(arch, component))


def components(arch: str) -> list[str]:
    return [name for name, value in architecture(arch).items() if isinstance(value, dict) and "class" in value]


# Values looked up in this process, by (cache dir, arch, kind, key): every simulated call looks up
# its phases' counts, and reading and parsing the JSON files each time cost the replica's CPU per call.
_seen: dict[tuple, object] = {}


def _lookup(arch: str, kind: str, key: str, compute):
    seen_key = (str(cache_dir()), arch, kind, key)
    if seen_key not in _seen:
        _seen[seen_key] = _stored(arch, kind, key, compute)
    return _seen[seen_key]


def _stored(arch: str, kind: str, key: str, compute):
    shipped = _shipped().get(arch, {}).get(kind, {})
    if key in shipped:
        return shipped[key]
    with _lock, _locked(cache_dir() / "flops.lock"):
        path = cache_dir() / "flops.json"
        stored = _read(path)
        value = stored.get(arch, {}).get(kind, {}).get(key)
        if value is None:
            value = compute()
            stored.setdefault(arch, {}).setdefault(kind, {})[key] = value
            _write(path, stored)
        return value


@cache
def _shipped() -> dict:
    return _read(SHIPPED)


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}


def _write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(f".{os.getpid()}.tmp")
    temporary.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(temporary, path)


@cache
def _module(arch: str, component: str):
    """`component` of `arch` with its parameters on the meta device, in bfloat16."""
    import diffusers
    import torch
    import transformers

    spec = architecture(arch)[component]
    config = spec["config"]
    with torch.device("meta"):
        if component in DIFFUSERS_COMPONENTS:
            module = getattr(diffusers, spec["class"])(**config)
        else:  # text encoders, the scorer's CLIP and the LLM are transformers models
            cls = getattr(transformers, spec["class"])
            module = cls(cls.config_class(**config))
    # Some constructors make a parameter on the CPU whatever the default device (torch.Tensor([...])): move all.
    return module.to(device="meta", dtype=torch.bfloat16).eval()


def _parameters(arch: str, component: str) -> list[int]:
    import torch

    module = _module(arch, component)
    linear = sum(layer.weight.numel() for layer in module.modules() if isinstance(layer, torch.nn.Linear))
    return [sum(parameter.numel() for parameter in module.parameters()), linear]


def _largest_leaf(arch: str, component: str) -> int:
    module = _module(arch, component)
    return max(sum(parameter.numel() for parameter in layer.parameters(recurse=False)) for layer in module.modules())


def _count(arch: str, component: str, shape: dict) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    module = _module(arch, component)
    run = _inputs(architecture(arch)[component]["class"], module, **shape)
    with torch.device("meta"), FlopCounterMode(display=False) as counter, torch.inference_mode():
        run()
    return float(counter.get_total_flops())


def _inputs(cls: str, module, width: int = 0, height: int = 0, tokens: int = 0, part: str = "", frames: int = 0):
    """A call of `module` on meta tensors: one image (or video of `frames` frames) of `width` x
    `height`, or `tokens` tokens."""
    import torch

    bf16 = torch.bfloat16
    if cls == "FluxTransformer2DModel":
        seq = (height // 16) * (width // 16)
        config = module.config
        guidance = config.guidance_embeds
        return lambda: module(
            hidden_states=torch.empty(1, seq, config.in_channels, dtype=bf16),
            encoder_hidden_states=torch.empty(1, tokens, config.joint_attention_dim, dtype=bf16),
            pooled_projections=torch.empty(1, config.pooled_projection_dim, dtype=bf16), timestep=torch.empty(1),
            img_ids=torch.empty(seq, 3), txt_ids=torch.empty(tokens, 3), return_dict=False,
            **({"guidance": torch.empty(1)} if guidance else {}))
    if cls == "UNet2DConditionModel":
        config = module.config
        return lambda: module(
            torch.empty(1, config.in_channels, height // 8, width // 8, dtype=bf16), torch.empty(1),
            encoder_hidden_states=torch.empty(1, CLIP_TOKENS, config.cross_attention_dim, dtype=bf16),
            added_cond_kwargs={"text_embeds": torch.empty(1, 1280, dtype=bf16), "time_ids": torch.empty(1, 6, dtype=bf16)},
            return_dict=False)
    if cls == "UNetSpatioTemporalConditionModel":
        config = module.config
        return lambda: module(
            torch.empty(1, frames, config.in_channels, height // 8, width // 8, dtype=bf16), torch.empty(1),
            encoder_hidden_states=torch.empty(1, 1, config.cross_attention_dim, dtype=bf16),
            added_time_ids=torch.empty(1, 3, dtype=bf16), return_dict=False)
    if cls == "AutoencoderKLTemporalDecoder":
        channels = module.config.latent_channels
        return lambda: module.decode(torch.empty(frames, channels, height // 8, width // 8, dtype=bf16),
                                     num_frames=frames, return_dict=False)
    if cls == "CLIPVisionModelWithProjection":
        size = module.config.image_size
        return lambda: module(pixel_values=torch.empty(1, 3, size, size, dtype=bf16))
    if cls == "AutoencoderKL":
        channels = module.config.latent_channels
        return lambda: module.decode(torch.empty(1, channels, height // 8, width // 8, dtype=bf16), return_dict=False)
    if cls == "CLIPModel" and part == "vision":
        size = module.config.vision_config.image_size
        return lambda: module.get_image_features(pixel_values=torch.empty(1, 3, size, size, dtype=bf16))
    if cls == "CLIPModel":
        return lambda: module.get_text_features(input_ids=torch.zeros(1, tokens, dtype=torch.long))
    # Text encoders and causal LMs: one sequence of `tokens` tokens.
    return lambda: module(input_ids=torch.zeros(1, tokens, dtype=torch.long))


def default_counts() -> dict[str, list[dict]]:
    """The shapes shipped precomputed: each architecture's default size, and the sizes around it a
    service commonly asks for, at its text length; the scorer's image and text, the LLM's tokens."""
    sizes = [(512, 512), (768, 768), (1024, 1024), (1024, 768), (768, 1024)]
    counts = {}
    for arch in ("flux-schnell", "flux-dev", "sdxl"):
        spec = architecture(arch)
        tokens = spec.get("max_sequence_length", CLIP_TOKENS)
        denoiser = next(name for name in DENOISERS if name in spec)
        shapes = [("text_encoder", {"tokens": CLIP_TOKENS}), ("text_encoder_2", {"tokens": tokens})]
        for width, height in sizes:
            extra = {"tokens": tokens} if denoiser == "transformer" else {}
            shapes += [(denoiser, {"width": width, "height": height, **extra}), ("vae", {"width": width, "height": height})]
        counts[arch] = shapes
    video = [(1024, 576, 25), (1024, 576, 14), (512, 512, 14)]
    counts["svd-xt"] = [("image_encoder", {})] + [
        (component, {"width": width, "height": height, "frames": frames})
        for width, height, frames in video for component in ("unet", "vae")]
    counts["clip-vit-large-patch14"] = [("model", {"part": "vision"}), ("model", {"tokens": CLIP_TOKENS})]
    counts["qwen2.5-1.5b-instruct"] = [("model", {"tokens": 1}), ("model", {"tokens": 256})]
    counts["controlnet-sdxl"] = []  # parameters only: a simulated device does not model ControlNets' time
    return counts


def regenerate(only: list[str] | None = None) -> dict:
    """Count every default shape and every component's parameters afresh (the shipped table), of
    every architecture or of `only` those (the others kept as shipped)."""
    table: dict = {} if not only else _read(SHIPPED)
    for arch, shapes in default_counts().items():
        if only and arch not in only:
            continue
        entry = table[arch] = {"flops": {}, "parameters": {}, "largest_leaf": {}}
        for component in components(arch):
            entry["parameters"][component] = _parameters(arch, component)
            entry["largest_leaf"][component] = _largest_leaf(arch, component)
        for component, shape in shapes:
            key = shape_key(component, **shape)
            entry["flops"][key] = _count(arch, component, shape)
            print(f"{arch} {key}: {entry['flops'][key] / 1e12:.3f} TFLOP", flush=True)
        _module.cache_clear()  # meta modules hold no memory, but their Python objects do
    return table


if __name__ == "__main__":
    # python -m deployments.runtime.sim.flops [ARCHITECTURE ...]: all, or only those named.
    import sys

    _write(SHIPPED, regenerate(sys.argv[1:]))
    print(f"wrote {SHIPPED}")

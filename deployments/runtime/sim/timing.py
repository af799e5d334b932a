"""How long a simulated call takes: FLOPs over the card's peak and the tier's calibrated efficiency.

A call's time is `fixed_call_s` (once per call, whatever its images) plus, per component, its FLOPs
over the achieved FLOP/s, floored by the time to stream the component's weights once from memory
(a roofline: only the LLM's one-token decode steps are memory-bound). The denoiser runs at its tier's
efficiency (and at the fp8 peak in the compiled+fp8 tier); text encoders and the VAE at the eager
one. The efficiencies are fitted to published timings (`calibration.yaml`) when first asked for.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from deployments.runtime.sim import flops as counted
from deployments.sim_profiles import Profile, profile

logger = logging.getLogger("ray.serve")
CALIBRATION_FILE = Path(__file__).with_name("calibration.yaml")
TIERS = ("eager", "compiled", "compiled+fp8")
BF16_BYTES = 2


def tier_of(acceleration) -> str:
    """The calibrated tier an entry's `acceleration:` runs as (see calibration.yaml for the rules)."""
    if acceleration.compile == "none":
        return "eager"
    return "compiled+fp8" if acceleration.quantization == "fp8_dynamic" else "compiled"


@dataclass(frozen=True)
class ImageCall:
    """The phases of one simulated image pipeline call, in seconds."""

    fixed_s: float
    encode_s: float
    step_s: float
    steps: int
    decode_s: float

    @property
    def total_s(self) -> float:
        return self.fixed_s + self.encode_s + self.steps * self.step_s + self.decode_s


@dataclass(frozen=True)
class ImageShape:
    """What a call's FLOPs depend on: the architecture, the size, the images, the steps, whether
    classifier-free guidance doubles the denoiser's batch, and the T5 text length (FLUX)."""

    arch: str
    width: int
    height: int
    steps: int
    images: int = 1
    cfg: bool = False
    text_tokens: int | None = None


@cache
def calibration() -> dict:
    import yaml

    return yaml.safe_load(CALIBRATION_FILE.read_text())


def _seconds(flop: float, card: Profile, efficiency: float, fp8: bool = False) -> float:
    return flop / (card.peak_flops(fp8) * efficiency)


def image_flops(shape: ImageShape) -> dict[str, float]:
    """FLOPs of one call by phase: `encode` (every text encoder, per image), `step` (the denoiser,
    all images, doubled under classifier-free guidance) and `decode` (the VAE, per image)."""
    spec = counted.architecture(shape.arch)
    tokens = shape.text_tokens or spec.get("max_sequence_length", counted.CLIP_TOKENS)
    denoiser = next(name for name in counted.DENOISERS if name in spec)
    size = {"width": shape.width, "height": shape.height}
    encode = 0.0
    for name in counted.TEXT_ENCODERS:
        if name in spec:
            length = tokens if spec[name]["class"] == "T5EncoderModel" else counted.CLIP_TOKENS
            encode += counted.flops(shape.arch, name, tokens=length)
    step = counted.flops(shape.arch, denoiser, **size, **({"tokens": tokens} if denoiser == "transformer" else {}))
    return {"encode": encode * shape.images, "step": step * shape.images * (2 if shape.cfg else 1),
            "decode": counted.flops(shape.arch, "vae", **size) * shape.images}


def _stream_s(arch: str, component: str, card: Profile, fp8: bool) -> float:
    """Seconds to read `component`'s weights once from the card's memory: a floor under one pass."""
    total, linear = counted.parameters(arch, component)
    weight_bytes = total * BF16_BYTES - (linear if fp8 else 0)
    return weight_bytes / (card.memory_bandwidth_gbs * 1e9)


def image_call(shape: ImageShape, card: Profile, tier: str, efficiency: dict[str, float] | None = None) -> ImageCall:
    """The simulated time of one pipeline call of `shape` on `card` in `tier`."""
    return _call(shape.arch, image_flops(shape), shape.steps, card, tier, efficiency or efficiencies())


def video_call(arch: str, width: int, height: int, frames: int, steps: int, cfg: bool, card: Profile,
               tier: str) -> ImageCall:
    """The simulated time of one video pipeline call: the conditioning image's encoder once, the
    denoiser over every frame at each step (twice under classifier-free guidance), the VAE over
    every frame."""
    size = {"width": width, "height": height, "frames": frames}
    phases = {"encode": counted.flops(arch, "image_encoder"),
              "step": counted.flops(arch, "unet", **size) * (2 if cfg else 1),
              "decode": counted.flops(arch, "vae", **size)}
    return _call(arch, phases, steps, card, tier, efficiencies())


def _call(arch: str, phases: dict[str, float], steps: int, card: Profile, tier: str,
          efficiency: dict[str, float]) -> ImageCall:
    fp8 = tier == "compiled+fp8"
    denoiser = next(name for name in counted.DENOISERS if name in counted.architecture(arch))
    step_s = max(_seconds(phases["step"], card, efficiency[tier], fp8), _stream_s(arch, denoiser, card, fp8))
    return ImageCall(fixed_s=calibration()["fixed_call_s"], encode_s=_seconds(phases["encode"], card, efficiency["eager"]),
                     step_s=step_s, steps=steps, decode_s=_seconds(phases["decode"], card, efficiency["eager"]))


def point_shape(point: dict) -> ImageShape:
    # The published points are FLUX, whose guidance is embedded: no classifier-free guidance.
    return ImageShape(arch=point["architecture"], width=point["width"], height=point["height"], steps=point["steps"],
                      images=point["images"])


@cache
def efficiencies() -> dict[str, float]:
    """Each tier's efficiency, fitted to its `fitted` point: eager first (it also prices the text
    encoders and the VAE in every tier), then the others from the time their denoiser is left."""
    points = {point["tier"]: point for point in calibration()["points"] if point["fitted"]}
    fixed = calibration()["fixed_call_s"]
    eager = points["eager"]
    shape = point_shape(eager)
    phases = image_flops(shape)
    total = phases["encode"] + phases["step"] * shape.steps + phases["decode"]
    fitted = {"eager": total / ((eager["seconds"] - fixed) * profile(eager["profile"]).peak_flops(False))}
    for tier in TIERS[1:]:
        point = points[tier]
        shape, card = point_shape(point), profile(point["profile"])
        phases = image_flops(shape)
        around = fixed + _seconds(phases["encode"] + phases["decode"], card, fitted["eager"])
        fitted[tier] = phases["step"] * shape.steps / ((point["seconds"] - around) * card.peak_flops(tier == "compiled+fp8"))
    return fitted


def model_call_s(arch: str, card: Profile, passes: list[tuple[dict, int]]) -> float:
    """The simulated time of a one-model call (the scorer, the LLM): `passes` are (shape, count) of
    forward passes of its `model`, each at the eager efficiency, floored by streaming its weights."""
    efficiency = efficiencies()["eager"]
    floor = _stream_s(arch, "model", card, fp8=False)
    seconds = calibration()["fixed_call_s"]
    for shape, count in passes:
        seconds += count * max(_seconds(counted.flops(arch, "model", **shape), card, efficiency), floor)
    return seconds


@dataclass(frozen=True)
class ColdStart:
    """The modelled load of a model at a replica's start: its weight files read from the node's disk
    into host memory, then copied over the card's host-to-device link, one after the other (as
    `from_pretrained` then `.to("cuda")` do). The process start itself (Ray's worker, the imports) is
    not modelled: a simulated replica really starts one."""

    read_bytes: int
    copy_bytes: int
    read_s: float
    copy_s: float

    @property
    def total_s(self) -> float:
        return self.read_s + self.copy_s

    def describe(self) -> dict:
        """What GET /v1/models and the log show of it (simulated seconds)."""
        return {"read_gb": round(self.read_bytes / 1e9, 2), "disk_read_s": round(self.read_s, 2),
                "copy_gb": round(self.copy_bytes / 1e9, 2), "host_to_device_s": round(self.copy_s, 2),
                "total_s": round(self.total_s, 2)}


def cold_start(card: Profile, read_bytes: int, copy_bytes: int) -> ColdStart:
    """The cold start of a model whose files hold `read_bytes` and whose weights take `copy_bytes` on
    the card (none for an on-demand model, which pays the copy at each move in)."""
    return ColdStart(read_bytes, copy_bytes, read_bytes / (card.disk_read_gbs * 1e9),
                     copy_bytes / (card.host_to_device_gbs * 1e9))


def wait_cold_start(card: Profile, read_bytes: int, copy_bytes: int, owner: str) -> ColdStart:
    """Sleep through `owner`'s modelled cold start (the CPU stays free, as a real replica's does while
    its disk and link work) and log it."""
    cold = cold_start(card, read_bytes, copy_bytes)
    time.sleep(cold.total_s)
    logger.info("%s: simulated cold start %.1fs on %s (%.1f GB read from disk in %.1fs, %.1f GB copied to the card "
                "in %.1fs)", owner, cold.total_s, card.key, read_bytes / 1e9, cold.read_s, copy_bytes / 1e9, cold.copy_s)
    return cold

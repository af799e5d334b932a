"""`genserve bench-gpu`: the real FLUX.1-schnell and SDXL architectures, random weights, in process (no Ray).

The architectures come from their published component configs, kept in `deployments/architectures/`
(facts, not weights). Each model is built with its parameters on the meta device (no memory),
then every parameter is materialised on the target device with random values, so nothing is
downloaded and a 12B-parameter transformer costs seconds to make. The tokenizers are genserve's
tiny ones: the encoders still see full-length sequences (CLIP pads to 77 tokens, T5 to
`max_sequence_length`), so the cost is the real one; the images are noise, as the weights are.

Each case applies an acceleration tier through the same `deployments.runtime.acceleration.accelerate`
a replica uses, then times whole pipeline calls (text encoding, denoising, VAE decode): the first
call (compilation included), then the p50 of the rest, and the peak accelerator memory. SDXL's
per-step time is the difference of two step counts, divided by the steps between them.

On a machine without CUDA the same code runs the families' tiny architectures (`build_tiny`) at a
small size, so CI keeps it working; a tier the CPU cannot run (fp8) is reported as skipped, and
compilation is skipped unless `--cpu-compile` (minutes of C++ compilation on a small CPU).
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

ARCHITECTURES = Path(__file__).resolve().parents[2] / "deployments" / "architectures"
FAMILY_OF = {"flux-schnell": "flux", "sdxl": "sdxl"}
TIERS = {"eager": {}, "compiled": {"compile": "repeated_blocks"},
         "compiled+fp8": {"compile": "repeated_blocks", "quantization": "fp8_dynamic"}}


@dataclass
class Case:
    model: str
    tier: str
    batch: int
    steps: int
    first_s: float = float("nan")
    p50_s: float = float("nan")
    peak_bytes: int | None = None
    per_step_s: float | None = None
    skipped: str | None = None


def architecture(name: str) -> dict:
    return json.loads((ARCHITECTURES / f"{name}.json").read_text())


def _materialised(cls, config: dict, device: str, dtype):
    """`cls(config)` with parameters made on the meta device, then filled with random values on `device`."""
    import torch
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device

    with init_empty_weights(include_buffers=False):
        model = cls(config)
    generator = torch.Generator(device=device).manual_seed(0)
    for name, parameter in list(model.named_parameters()):
        value = torch.empty(parameter.shape, dtype=dtype, device=device)
        if parameter.ndim == 1:  # norms' scales 1, biases 0: activations keep a sane range
            value.fill_(1.0 if name.endswith("weight") else 0.0)
        else:
            value.normal_(0.0, 0.02, generator=generator)
        set_module_tensor_to_device(model, name, device, value=value)
    return model.to(device=device).eval()


def build_full(name: str, device: str, dtype):
    """The published architecture `name` as a diffusers pipeline with random weights on `device`."""
    import diffusers
    import transformers
    from diffusers import EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

    from deployments.tiny import tiny_clip_tokenizer, tiny_t5_tokenizer

    spec = architecture(name)
    parts = {}
    for part in ("transformer", "unet", "vae"):
        if part in spec:
            cls = getattr(diffusers, spec[part]["class"])
            parts[part] = _materialised(lambda config, cls=cls: cls(**config), spec[part]["config"], device, dtype)
    for part in ("text_encoder", "text_encoder_2"):
        cls = getattr(transformers, spec[part]["class"])
        config_cls = transformers.T5Config if cls is transformers.T5EncoderModel else transformers.CLIPTextConfig
        parts[part] = _materialised(cls, config_cls(**spec[part]["config"]), device, dtype)
    if "transformer" in spec:
        parts.update(scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0), tokenizer=tiny_clip_tokenizer(),
                     tokenizer_2=tiny_t5_tokenizer())
    else:
        parts.update(scheduler=EulerDiscreteScheduler(), tokenizer=tiny_clip_tokenizer(),
                     tokenizer_2=tiny_clip_tokenizer())
    pipeline = getattr(diffusers, spec["pipeline"])(**parts)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _call(pipeline, name: str, spec: dict, batch: int, steps: int, size: tuple[int, int], device: str) -> float:
    import torch

    from deployments.runtime.loading import seeded_generators

    kwargs = {"max_sequence_length": spec["max_sequence_length"]} if "max_sequence_length" in spec else {}
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    with torch.inference_mode():
        pipeline(prompt=["a lighthouse on a cliff at dusk"] * batch, width=size[0], height=size[1],
                 num_inference_steps=steps, guidance_scale=spec["guidance_scale"], output_type="np",
                 generator=seeded_generators(list(range(batch))), **kwargs)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def run_case(name: str, tier: str, batch: int, repeats: int, device: str, cpu_compile: bool,
             steps: int | None = None, size: tuple[int, int] | None = None) -> Case:
    import torch

    from deployments.config import AccelerationConfig
    from deployments.families import get_family
    from deployments.runtime.acceleration import AccelerationError, accelerate, check_hardware
    from deployments.runtime.loading import Placement

    spec = architecture(name)
    steps = steps or spec["steps"]
    case = Case(name, tier, batch, steps)
    acceleration = AccelerationConfig(**TIERS[tier])
    placement = Placement(device, "bfloat16" if device == "cuda" else "float32")
    try:
        check_hardware(acceleration, placement)
    except AccelerationError as error:
        case.skipped = str(error)
        return case
    if device == "cpu" and acceleration.compile != "none" and not cpu_compile:
        case.skipped = "compilation on the CPU takes minutes (--cpu-compile)"
        return case
    family = get_family(FAMILY_OF[name])
    try:
        if device == "cuda":
            pipeline = build_full(name, device, placement.dtype)
            size = size or tuple(spec["size"])
        else:
            pipeline = family.build_tiny().to(device)
            pipeline.set_progress_bar_config(disable=True)
            size = size or (256, 256)
        accelerate(pipeline, acceleration, family.acceleration, placement)
    except AccelerationError as error:
        case.skipped = str(error)
        return case
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    case.first_s = _call(pipeline, name, spec, batch, steps, size, device)
    case.p50_s = statistics.median(_call(pipeline, name, spec, batch, steps, size, device) for _ in range(repeats))
    if name == "sdxl":  # per step: the difference of two step counts
        half = max(1, steps // 2)
        shorter = statistics.median(_call(pipeline, name, spec, batch, half, size, device) for _ in range(repeats))
        case.per_step_s = (case.p50_s - shorter) / (steps - half) if steps > half else None
    if device == "cuda":
        case.peak_bytes = torch.cuda.max_memory_allocated()
    del pipeline
    if device == "cuda":
        torch.cuda.empty_cache()
    return case


def plan() -> list[tuple[str, str, int]]:
    """(model, tier, batch): FLUX.1-schnell in each tier at batch 1 and 2; SDXL eager and compiled."""
    cases = [("flux-schnell", tier, batch) for tier in TIERS for batch in (1, 2)]
    cases += [("sdxl", tier, 1) for tier in ("eager", "compiled")]
    return cases


def run_gpu_benchmark(repeats: int = 3, cpu_compile: bool = False, only: list[str] | None = None,
                      steps: int | None = None) -> tuple[str, list[Case]]:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    cases = []
    for name, tier, batch in plan():
        if only and name not in only:
            continue
        cases.append(run_case(name, tier, batch, repeats, device, cpu_compile,
                              steps=steps if name == "flux-schnell" or steps is None else max(2, steps)))
    return device, cases


def simulated_s(case: Case, card) -> float | None:
    """What the simulated device models for `case` on `card` (deployments.runtime.sim), at the
    published size: the figure to correct the profile's calibration against."""
    from deployments.runtime.sim import timing

    spec = architecture(case.model)
    width, height = spec["size"]
    shape = timing.ImageShape(case.model, width, height, case.steps, case.batch,
                              cfg="unet" in spec and spec["guidance_scale"] > 1)
    return timing.image_call(shape, card, case.tier).total_s


def _card():
    """The simulated profile of this machine's CUDA card, when one matches its name."""
    import torch

    from deployments.sim_profiles import profile_of_device

    return profile_of_device(torch.cuda.get_device_name()) if torch.cuda.is_available() else None


def format_gpu_table(device: str, cases: list[Case], card=None) -> str:
    """p50, first call (compile included), compile time estimate, peak memory, per-step and ratios to
    eager; on a card that has a simulated profile, the simulated time beside the measured one."""
    card = card if card is not None or device != "cuda" else _card()
    eager = {(case.model, case.batch): case.p50_s for case in cases if case.tier == "eager" and not case.skipped}
    header = (f"{'model':<14}{'tier':<14}{'batch':>6}{'steps':>6}{'p50 s':>9}{'first s':>9}{'compile s':>10}"
              f"{'x eager':>9}{'per step s':>11}{'peak GiB':>10}" + (f"{'sim s':>9}{'sim/p50':>9}" if card else "")
              + "  note")
    title = f"genserve bench-gpu on {device}" + ("" if device == "cuda" else " (tiny architectures)")
    if card is not None:
        title += f"; sim s: the simulated {card.key} profile's time for the same case (docs/simulator.md)"
    lines = [title, header]
    for case in cases:
        if case.skipped:
            lines.append(f"{case.model:<14}{case.tier:<14}{case.batch:>6}{case.steps:>6}{'':>64}  skipped: {case.skipped}")
            continue
        compile_s = case.first_s - case.p50_s if case.tier != "eager" else 0.0
        ratio = eager.get((case.model, case.batch), float("nan")) / case.p50_s
        per_step = f"{case.per_step_s:.4f}" if case.per_step_s is not None else "-"
        peak = f"{case.peak_bytes / 2**30:.1f}" if case.peak_bytes is not None else "-"
        simulated = ""
        if card is not None:
            seconds = simulated_s(case, card)
            simulated = f"{seconds:>9.3f}{seconds / case.p50_s:>9.2f}"
        lines.append(f"{case.model:<14}{case.tier:<14}{case.batch:>6}{case.steps:>6}{case.p50_s:>9.3f}{case.first_s:>9.2f}"
                     f"{compile_s:>10.1f}{ratio:>9.2f}{per_step:>11}{peak:>10}{simulated}")
    return "\n".join(lines)

"""The memory plan of a profile on its card: what each model needs on the GPU, and whether the
profile fits (docs/gpu.md, "Workstation cards").

Offline: parameter counts come from the published architectures in `deployments/architectures/`
(counted on the meta device, shipped in `flops.json`), bytes per parameter from the dtype or the
denoiser's `memory.weights` storage, activations and the CUDA context from the simulator's formulas
(`deployments.runtime.sim.memory`): the same plan the simulated card's ledger holds.

Per model:
- on the GPU at once: every weight (`offload: none`), the largest component (`model`: diffusers
  moves one component at a time), or the largest module with its own parameters (`sequential`);
- activations of one call at the entry's default shape (one image, guidance as its default says);
- one CUDA context per process (each deployment is one process; the scorers share one).

The card fits when the resident models (weights, activations, context) plus the largest on-demand
model (`memory.residency: on_demand`: only one has to fit at a time; the others wait in host RAM)
plus every other on-demand process's context fit in its memory. A model that does not fit the card
by itself, even after its offload, is an error of its own.
"""

from __future__ import annotations

from dataclasses import dataclass

from deployments.runtime.sim import flops as counted
from deployments.runtime.sim import memory

GIB = 2**30
# Tokens of the enhancer's chat (system prompt, advice and the user's idea) and CLIP's image tokens:
# the shapes the plan's activations take for the one-model deployments.
LLM_TOKENS = 768
CLIP_IMAGE_TOKENS = 257
SCORE_BATCH = 4


@dataclass(frozen=True)
class ModelPlan:
    """One deployment's memory on its card (bytes)."""

    name: str
    weights: int
    on_gpu: int
    activations: int
    residency: str
    offload: str
    architectures: tuple[str, ...]
    disk: int = 0

    @property
    def peak(self) -> int:
        """What it holds on the card while it runs, its process's CUDA context included."""
        return self.on_gpu + self.activations + memory.CUDA_CONTEXT_BYTES

    @property
    def host(self) -> int:
        """What it keeps in host RAM besides the card: all its weights unless they stay resident."""
        return self.weights if self.residency == "on_demand" or self.offload != "none" else 0

    def move_s(self, host_to_device_gbs: float | None) -> float | None:
        """Seconds to bring its weights to the GPU over the card's link at its peak (one way): a swap
        in of an on-demand model, or, under offload, what every call moves. An estimate (pinned copies
        reach about 80% of the peak, pageable ones less); None where the card has no profile."""
        moved = self.weights if self.offload != "none" else self.on_gpu
        return None if not host_to_device_gbs else moved / (host_to_device_gbs * 1e9)


@dataclass(frozen=True)
class CardPlan:
    """The models of one profile on its one card."""

    card: str
    capacity: int
    models: tuple[ModelPlan, ...]

    @property
    def needed(self) -> int:
        resident = sum(model.peak for model in self.models if model.residency == "resident")
        demand = [model for model in self.models if model.residency == "on_demand"]
        if not demand:
            return resident
        largest = max(model.peak for model in demand)
        return resident + largest + (len(demand) - 1) * memory.CUDA_CONTEXT_BYTES

    @property
    def host(self) -> int:
        return sum(model.host for model in self.models)

    def on_demand_budget(self) -> int:
        """What the card keeps for on-demand models (the residency broker's room): its memory less the
        resident models' peaks and every on-demand process's CUDA context."""
        demand = sum(1 for model in self.models if model.residency == "on_demand")
        resident = sum(model.peak for model in self.models if model.residency == "resident")
        return self.capacity - resident - demand * memory.CUDA_CONTEXT_BYTES

    @property
    def disk(self) -> int:
        return sum(model.disk for model in self.models)

    @property
    def link_gbs(self) -> float | None:
        """The card's host-to-device bandwidth, where a simulated profile of that name has it."""
        from deployments.sim_profiles import profiles

        card = profiles().get(self.card) or next((card for card in profiles().values()
                                                  if card.key.startswith(f"{self.card}-")), None)
        return card.host_to_device_gbs if card else None

    def problems(self) -> list[str]:
        """Why the profile cannot run on its card; empty when it fits."""
        alone = [f"model {model.name} needs {model.peak / GIB:.1f} GiB on the GPU by itself ({describe(model)}), "
                 f"more than the {self.card}'s {self.capacity / GIB:g} GiB"
                 + ("" if model.offload == "sequential" else ": give it memory.offload (model or sequential) or "
                    "smaller weights (memory.weights)")
                 for model in self.models if model.peak > self.capacity]
        if alone:
            return alone
        if self.needed > self.capacity:
            held = ", ".join(f"{model.name} {model.peak / GIB:.1f} GiB" for model in self.models
                             if model.residency == "resident")
            return [f"the models need {self.needed / GIB:.1f} GiB together, more than the {self.card}'s "
                    f"{self.capacity / GIB:g} GiB (resident: {held or 'none'}; on demand: the largest one at a time): "
                    "set memory.residency: on_demand on some, or offload them"]
        return []

    def rows(self) -> list[str]:
        """A Markdown table of the plan (docs/gpu.md, `genserve doctor`)."""
        link = self.link_gbs
        lines = ["| model | weights GiB | on GPU GiB | activations GiB | peak GiB | residency | offload | move s | counted from |",
                 "|---|---|---|---|---|---|---|---|---|"]
        for model in self.models:
            move = model.move_s(link) if model.residency == "on_demand" or model.offload != "none" else None
            lines.append(f"| {model.name} | {model.weights / GIB:.1f} | {model.on_gpu / GIB:.1f} | "
                         f"{model.activations / GIB:.2f} | {model.peak / GIB:.1f} | {model.residency} | "
                         f"{model.offload} | {'-' if move is None else f'{move:.2f}'} | {', '.join(model.architectures)} |")
        lines.append(f"| **{self.card}: needed {self.needed / GIB:.1f} of {self.capacity / GIB:g}** | "
                     f"host RAM {self.host / GIB:.1f} | | | | | | | disk {self.disk / 1e9:.0f} GB |")
        return lines


def describe(model: ModelPlan) -> str:
    return (f"weights {model.on_gpu / GIB:.1f} GiB on the GPU of {model.weights / GIB:.1f}, activations "
            f"{model.activations / GIB:.2f} GiB, CUDA context {memory.CUDA_CONTEXT_BYTES / GIB:.1f} GiB")


def dtype_name(device) -> str:
    """The plan's dtype: a GPU's default (bfloat16) where the entry says 'auto'."""
    return "bfloat16" if device.dtype == "auto" else device.dtype


def on_gpu_bytes(parts: list[tuple[str, str, int]], offload: str, dtype: str) -> int:
    """Weights on the card at once under `offload`; `parts` are (architecture, component, bytes).
    ControlNets stay on the GPU whatever the offload (the SDXL family moves them there itself)."""
    kept = sum(size for _, component, size in parts if component == "controlnet")
    offloaded = [(arch, component, size) for arch, component, size in parts if component != "controlnet"]
    if offload == "model":
        return kept + max(size for _, _, size in offloaded)
    if offload == "sequential":
        return kept + max(counted.largest_leaf(arch, component) * memory.DTYPE_BYTES[dtype] if component else size
                          for arch, component, size in offloaded)
    return kept + sum(size for _, _, size in offloaded)


def architecture_of(name: str, source: str) -> str:
    """The architecture file of `source`: by its published sources, or (a checkpoint converted at load,
    HPSv2.1's) by the hub repo of its checkpoint."""
    try:
        return counted.architecture_for(source)
    except ValueError:
        pass
    for path in sorted(counted.ARCHITECTURES.glob("*.json")):
        if path != counted.SHIPPED and counted.architecture(path.stem).get("checkpoint", {}).get("repo_id") == source:
            return path.stem
    raise ValueError(f"{name}: the memory plan counts published architectures (deployments/architectures/); "
                         f"source {source!r} is none of them, so this profile's card cannot be checked") from None


def image_plan(entry, family) -> ModelPlan:
    """An image entry: its pipeline's components, and the ControlNets its options name."""
    dtype = dtype_name(entry.device)
    arch = architecture_of(entry.id, entry.source)
    weights = entry.memory.weights
    quantization = entry.acceleration.quantization
    parts = [(arch, component, memory.component_bytes(arch, component, dtype, quantization, weights))
             for component in counted.components(arch)]
    options = family.options_of(entry)
    for source in (getattr(options, "controlnets", None) or {}).values():
        control = architecture_of(f"{entry.id} ControlNet", source)
        parts.append((control, "controlnet", memory.component_bytes(control, "controlnet", dtype)))
    width, height = family.size_default(entry)
    cfg = family.negative_prompt and family.guidance_default(entry) > 1
    activations = memory.image_activation_bytes(arch, width, height, 1, cfg, dtype, entry.vae.slicing,
                                                entry.options.get("max_sequence_length"))
    # On disk: the pipeline as published (the dtype's bytes; a GGUF denoiser's pipeline still has its
    # own), plus the GGUF file.
    disk = sum(counted.parameters(control if component == "controlnet" else arch,
                                  component)[0] for control, component, _ in parts) * memory.DTYPE_BYTES[dtype]
    if weights.startswith("gguf"):
        disk += memory.component_bytes(arch, counted_denoiser(arch), dtype, weights=weights)
    return _plan(entry.id, parts, activations, entry.memory.residency, entry.memory.offload, dtype, disk)


def video_plan(entry, family) -> ModelPlan:
    dtype = dtype_name(entry.device)
    arch = architecture_of(entry.id, entry.source)
    parts = [(arch, component, memory.component_bytes(arch, component, dtype, weights=entry.memory.weights))
             for component in counted.components(arch)]
    options = family.options_of(entry)
    width, height = family.size_default(entry)
    frames = family.frames_default(entry)
    activations = memory.video_activation_bytes(arch, width, height, frames, True, dtype,
                                                getattr(options, "decode_chunk_size", None) or frames)
    disk = memory.weight_bytes(arch, dtype)
    return _plan(entry.id, parts, activations, entry.memory.residency, getattr(options, "offload", "none"), dtype, disk)


def one_model_plan(name: str, entries: list[tuple[str, object]], tokens: int, batch: int) -> ModelPlan:
    """The scorers (one process, every entry loaded) or the enhancer's LLM: (source, device) each."""
    parts, activations, dtype = [], 0, "bfloat16"
    for source, device in entries:
        dtype = dtype_name(device)
        arch = architecture_of(name, source)
        spec = counted.architecture(arch)
        if "model" in spec:
            parts.append((arch, "model", memory.weight_bytes(arch, dtype)))
            activations = max(activations, memory.model_activation_bytes(arch, tokens, batch, dtype))
        else:  # a checkpoint converted at load (HPSv2.1): its published parameter count and vision width
            parts.append((arch, "", spec["parameters"] * memory.DTYPE_BYTES[dtype]))
            width = spec["config"]["vision_cfg"]["width"]
            activations = max(activations, memory.TRANSFORMER_WIDTHS_ALIVE * batch * tokens * width
                              * memory.DTYPE_BYTES[dtype])
    return _plan(name, parts, activations, "resident", "none", dtype, sum(size for _, _, size in parts))


def counted_denoiser(arch: str) -> str:
    return next(name for name in counted.DENOISERS if name in counted.architecture(arch))


def _plan(name: str, parts: list, activations: int, residency: str, offload: str, dtype: str, disk: int) -> ModelPlan:
    return ModelPlan(name=name, weights=sum(size for _, _, size in parts), on_gpu=on_gpu_bytes(parts, offload, dtype),
                     activations=activations, residency=residency, offload=offload,
                     architectures=tuple(dict.fromkeys(arch for arch, _, _ in parts)), disk=disk)

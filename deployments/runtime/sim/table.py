"""The calibration table of docs/simulator.md, made from the data it describes.

    python -m deployments.runtime.sim.table            # print it
    python -m deployments.runtime.sim.table --write    # rewrite it in docs/simulator.md

Per profile and tier: the simulated seconds of the published cases (FLUX.1-dev 28 steps and
FLUX.1-schnell 4 steps at 1024x1024, one image), the published figure where one exists for that
card and tier (fitted, or a check the fit was not given), and the memory plan of FLUX.1 in bf16.
Every number is simulated unless its column says published.
"""

from __future__ import annotations

import sys
from pathlib import Path

from deployments.runtime.sim import memory, timing
from deployments.sim_profiles import profiles

DOC = Path(__file__).resolve().parents[3] / "docs" / "simulator.md"
BEGIN, END = "<!-- sim-table:begin (python -m deployments.runtime.sim.table --write) -->", "<!-- sim-table:end -->"
CASES = (("FLUX.1-dev", "flux-dev", 28), ("FLUX.1-schnell", "flux-schnell", 4))


def _published(points: list[dict], arch: str, card: str, tier: str) -> str:
    found = [point for point in points if (point["architecture"], point["profile"], point["tier"]) == (arch, card, tier)]
    return "; ".join(f"{point['seconds']:g} s ({'fitted' if point['fitted'] else 'check'} [{point['id']}])"
                     for point in found) or "-"


def _memory_gb(arch: str, tier: str) -> float:
    quantization = "fp8_dynamic" if tier == "compiled+fp8" else "none"
    weights = memory.weight_bytes(arch, "bfloat16", quantization)
    activations = memory.image_activation_bytes(arch, 1024, 1024, 1, False, "bfloat16", vae_slicing=True)
    return (weights + activations + memory.CUDA_CONTEXT_BYTES) / 1e9


def rows() -> list[str]:
    points = timing.calibration()["points"]
    header = ("| card | tier | " + " | ".join(f"{name} simulated s | published s" for name, _, _ in CASES)
              + " | FLUX.1 memory GB (of card) |")
    lines = [header, "|" + "---|" * (3 + 2 * len(CASES))]
    for card in profiles().values():
        for tier in timing.TIERS:
            if tier == "compiled+fp8" and card.fp8_tflops is None:
                continue
            cells = []
            for _, arch, steps in CASES:
                shape = timing.ImageShape(arch, 1024, 1024, steps)
                cells += [f"{timing.image_call(shape, card, tier).total_s:.2f}", _published(points, arch, card.key, tier)]
            fits = _memory_gb("flux-dev", tier)
            note = "" if fits <= card.memory_gb else " (does not fit)"
            lines.append(f"| {card.name} | {tier} | " + " | ".join(cells) + f" | {fits:.1f} of {card.memory_gb:g}{note} |")
    return lines


def table() -> str:
    efficiency = timing.efficiencies()
    fitted = ", ".join(f"{tier} {value:.3f}" for tier, value in efficiency.items())
    sources = [f"- `{point['id']}`: {point['source']}" for point in timing.calibration()["points"]]
    cards = [f"- {card.name}: {card.sources['all']}" for card in profiles().values()]
    return "\n".join([
        f"Fitted efficiencies (achieved over peak FLOP/s): {fitted}; fixed cost per call "
        f"{timing.calibration()['fixed_call_s']:g} s. All times simulated, one image, 1024x1024.", "",
        *rows(), "", "Published figures:", *sources, "", "Card figures:", *cards,
    ])


def write(doc: Path = DOC) -> None:
    text = doc.read_text()
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    doc.write_text(text[:start] + "\n" + table() + "\n" + text[end:])


if __name__ == "__main__":
    if "--write" in sys.argv[1:]:
        write()
        print(f"wrote {DOC}")
    else:
        print(table())

"""Residency in process: the broker's LRU moves on-demand models on and off the card, one move at a
time, never over its room.

- Tiny real models on the CPU: a swap moves every parameter and buffer out of the model's working
  set (meta tensors while out, host copies kept) and back; the same seed gives the same image before
  and after a swap.
- The workstation profiles' models on a simulated 24 GB and 16 GB card: FLUX -> SDXL -> video -> FLUX
  never goes over the card's memory in its ledger (which raises CUDA's out-of-memory error past it),
  with the moves the LRU implies.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from deployments.runtime.loading import resolve_placement, seeded_generators
from deployments.runtime.residency import LedgerSwap, ModelHolder, ModuleSwap, ResidencyBroker
from deployments.runtime.types import EnhancedPrompt, GenerationParams
from serve_app.config import ImageModelEntry, app_args_from_config

ROOT = Path(__file__).parents[2]
PROMPT = EnhancedPrompt(prompt="a lighthouse at dusk", negative_prompt=None, style="none", enhancer="none")


def _tiny(family: str):
    options = {"max_sequence_length": 32} if family == "flux" else {}
    entry = ImageModelEntry(id=family, family=family, source="tiny", options=options,
                            device={"device": "cpu", "dtype": "float32"})
    return entry.model_family.load(entry, resolve_placement(entry.device))


def _image(model) -> np.ndarray:
    import torch

    params = GenerationParams(seeds=[7], width=64, height=64, num_inference_steps=2, guidance_scale=0.0)
    with torch.inference_mode():
        return np.asarray(model(params, [PROMPT], None, seeded_generators([7]), None))


def _devices(model) -> set[str]:
    return {tensor.device.type for module in model.pipeline.components.values() if hasattr(module, "parameters")
            for tensor in [*module.parameters(), *module.buffers()]}


def _modules(model) -> list:
    return [module for module in model.pipeline.components.values() if hasattr(module, "parameters")]


def test_two_tiny_models_swap_through_one_slot_and_the_same_seed_gives_the_same_image():
    async def scenario():
        flux, sdxl = _tiny("flux"), _tiny("sdxl")
        broker = ResidencyBroker(budget=100)  # room for one of the two (60 bytes each, as planned)
        holders = {name: ModelHolder(name, 60, ModuleSwap(_modules(model), "cpu"), broker)
                   for name, model in (("flux", flux), ("sdxl", sdxl))}
        for holder in holders.values():
            await holder.start()
        assert _devices(flux) == _devices(sdxl) == {"meta"}, "on-demand models start out of the working set"
        loading = []
        async with holders["flux"].use(lambda: loading.append("flux")):
            assert _devices(flux) == {"cpu"}
            before = await asyncio.to_thread(_image, flux)
        async with holders["sdxl"].use(lambda: loading.append("sdxl")):
            assert _devices(sdxl) == {"cpu"} and _devices(flux) == {"meta"}, "flux moved out for sdxl"
            await asyncio.to_thread(_image, sdxl)
        async with holders["flux"].use(lambda: loading.append("flux")):
            assert _devices(flux) == {"cpu"} and _devices(sdxl) == {"meta"}
            after = await asyncio.to_thread(_image, flux)
        async with holders["flux"].use(lambda: loading.append("again")):  # resident: no move, no loading
            pass
        for holder in holders.values():
            await holder.stop()
        return before, after, loading, broker.status()

    before, after, loading, status = asyncio.run(scenario())
    np.testing.assert_array_equal(before, after)
    assert loading == ["flux", "sdxl", "flux"]
    # 3 moves in, 2 out (flux for sdxl, sdxl for flux).
    assert status["moves"] == 5 and status["resident"] == ["flux"] and status["peak_gib"] <= 100 / 2**30


def test_a_model_in_use_is_never_moved_out_the_mover_waits_for_its_release():
    async def scenario():
        broker = ResidencyBroker(budget=10)
        order = []

        class Recorder:
            def __init__(self, name):
                self.name = name

            def move_in(self):
                order.append(f"in {self.name}")

            def move_out(self):
                order.append(f"out {self.name}")

        first, second = (ModelHolder(name, 10, Recorder(name), broker) for name in ("a", "b"))
        await first.start()
        await second.start()
        assert order == ["out a", "out b"]  # both start out of the card
        order.clear()
        async with first.use():
            waiting = asyncio.ensure_future(second.use().__aenter__())
            await asyncio.sleep(0.05)  # the second waits while the first runs
            assert not waiting.done() and order == ["in a"]
        await waiting
        assert order == ["in a", "out a", "in b"]
        await broker.release("b")
        await first.stop()
        await second.stop()

    asyncio.run(scenario())


@pytest.mark.parametrize(("profile", "card"), [("workstation-24gb.yaml", "rtx-4090"),
                                               ("workstation-16gb.yaml", "rtx-4080-16gb")])
def test_flux_sdxl_video_flux_on_a_simulated_card_stays_within_its_memory(profile, card, tmp_path, monkeypatch):
    from deployments.runtime.sim import memory
    from deployments.sim_profiles import profile as sim_profile

    monkeypatch.setenv("GENSERVE_SIM_CACHE", str(tmp_path))
    plan = app_args_from_config(ROOT / "configs" / profile).memory_plan()
    ledger = memory.Ledger(f"test-{card}", plan.capacity, card)
    for model in plan.models:  # every process's CUDA context; the resident models' weights and activations
        ledger.reserve(f"{model.name}:context", memory.CUDA_CONTEXT_BYTES)
        if model.residency == "resident":
            ledger.reserve(f"{model.name}:weights", model.on_gpu + model.activations)
    models = {model.name: model for model in plan.models if model.residency == "on_demand"}
    link = sim_profile(card).host_to_device_gbs * 1e3  # the link 1000x faster: the test needs no real seconds

    async def scenario():
        broker = ResidencyBroker(plan.on_demand_budget())
        holders = {name: ModelHolder(name, model.on_gpu + model.activations,
                                     LedgerSwap(ledger, name, model.on_gpu, link), broker)
                   for name, model in models.items()}
        for holder in holders.values():
            await holder.start()
        peak = 0
        for name in ("flux-schnell", "sdxl", "svd-xt", "flux-schnell"):
            async with holders[name].use():
                ledger.reserve(f"{name}:call", models[name].activations)  # over the card: OutOfMemoryError
                peak = max(peak, ledger.used())
                ledger.release(f"{name}:call")
        for holder in holders.values():
            await holder.stop()
        return broker.status(), peak

    status, peak = asyncio.run(scenario())
    assert peak <= plan.capacity
    # None of the three fits beside another on these cards: each switch moves one out and one in.
    assert status["moves"] == 7 and status["resident"] == ["flux-schnell"]

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

from deployments.runtime.residency import LedgerSwap, ModelHolder, ResidencyBroker
from deployments.runtime.types import EnhancedPrompt, GenerationParams
from serve_app.config import ImageModelEntry, app_args_from_config

ROOT = Path(__file__).parents[2]
PROMPT = EnhancedPrompt(prompt="a lighthouse at dusk", negative_prompt=None, style="none", enhancer="none")


def _generator(family: str):
    """An on-demand generator of a tiny model on the CPU, its room a little more than one model's."""
    from deployments.image_generator import ImageGenerator

    options = {"max_sequence_length": 32} if family == "flux" else {}
    entry = ImageModelEntry(id=family, family=family, source="tiny", options=options, warmup={"default_shape": False},
                            device={"device": "cpu", "dtype": "float32"},
                            memory={"residency": "on_demand", "room": {"budget_gib": 1.5, "model_gib": 1.0}})
    return ImageGenerator.func_or_class(entry, metrics=False)


def _devices(generator) -> set[str]:
    return {tensor.device.type for module in generator._model.pipeline.components.values()
            if hasattr(module, "parameters") for tensor in [*module.parameters(), *module.buffers()]}


def test_two_tiny_models_swap_through_one_slot_and_the_same_seed_gives_the_same_image(monkeypatch):
    from deployments.runtime import progress, residency
    from deployments.runtime.types import ProgressTarget

    monkeypatch.setattr(residency, "_local_brokers", {})
    stages = []

    class Handle:
        def __init__(self):
            self.record_progress = self

        def remote(self, job_id, attempt, report):
            stages.append((job_id, report["stage"]))

    monkeypatch.setitem(progress._handles, ("app", "JobRunner"), Handle())
    flux, sdxl = _generator("flux"), _generator("sdxl")
    assert _devices(flux) == _devices(sdxl) == {"cpu"}, "an on-demand model loads into host RAM"

    async def generate(generator, job: str):
        target = ProgressTarget("app", "JobRunner", job, attempt=1, stage="generate", min_interval_s=0)
        params = GenerationParams(seeds=[7], width=64, height=64, num_inference_steps=2, guidance_scale=0.0,
                                  progress=target)
        return await generator.generate(params, PROMPT)

    async def scenario():
        first = await generate(flux, "flux-1")
        assert _devices(flux) == {"cpu"}
        await generate(sdxl, "sdxl-1")
        assert _devices(sdxl) == {"cpu"} and _devices(flux) == {"meta"}, "flux moved out for sdxl"
        again = await generate(flux, "flux-2")
        assert _devices(flux) == {"cpu"} and _devices(sdxl) == {"meta"}
        resident = await generate(flux, "flux-3")  # on the card already: no move
        return first, again, resident

    first, again, resident = asyncio.run(scenario())
    np.testing.assert_array_equal(first.images, again.images)
    assert "move_in" in first.timings and "move_in" in again.timings and "move_in" not in resident.timings
    assert [job for job, stage in stages if stage == "loading model"] == ["flux-1", "sdxl-1", "flux-2"]
    # flux: in, out (for sdxl), in; sdxl: in, out (for flux).
    assert flux.info()["residency"] == {"mode": "on_demand", "resident": True, "room_gib": 1.0, "moves": 3,
                                        "move_s": pytest.approx(flux.info()["residency"]["move_s"])}
    assert sdxl.info()["residency"]["moves"] == 2 and not sdxl.info()["residency"]["resident"]


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

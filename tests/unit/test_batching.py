"""Request batching in the generic ImageGenerator and the scorer (Ray Serve's @serve.batch, in
process, no Ray cluster): one call per key, seeds as alone, edits/hires/previews per request,
cancelling one, and the config checks.

Each test builds its own generator: Serve's batch queue lives on the event loop of its first call.
"""

import asyncio
import threading

import numpy as np
import pytest
from pydantic import ValidationError

from deployments.config import ImageModelConfig
from deployments.image_generator import ImageGenerator
from deployments.runtime import progress
from deployments.runtime.progress import BatchMonitor, StepMonitor
from deployments.runtime.types import EditInput, EnhancedPrompt, GenerationParams, HiresPass, ProgressTarget
from serve_app.config import AppArgs, ImageModelEntry

PROMPTS = [EnhancedPrompt(prompt=text, negative_prompt=None, style="none", enhancer="none")
           for text in ("a lighthouse at dusk", "a red fox in snow", "a bowl of ramen")]
# Not bit-identical on the CPU: a larger matmul rounds differently. Measured on the tiny FLUX, float32,
# a batch of 3 vs each image alone: at most 1 level of 255, in 0-3 of 49152 values at 128x128 (2 steps),
# 1-7 of 196608 at 256x256 (4 steps), 0-2 of 49152 for image-to-image at 128x128 (4 steps).
TOLERANCE = 1


@pytest.fixture(autouse=True)
def as_in_a_replica(monkeypatch):
    """Batching runs in Serve replicas only. Here the deployments are told they run in one, and
    Serve's batch queue skips its warning that reads the replica's max_ongoing_requests (the
    config's check keeps max_ongoing_requests >= max_batch_images in Serve)."""
    from ray.serve.batching import _BatchQueue

    import deployments.image_generator
    import deployments.scoring.clip_scorer

    monkeypatch.setattr(_BatchQueue, "_warn_if_max_batch_size_exceeds_max_ongoing_requests", lambda self: None)
    for module in (deployments.image_generator, deployments.scoring.clip_scorer):
        monkeypatch.setattr(module, "in_serve_replica", lambda: True)


def _generator(batching: bool = True, wait_ms: float = 300, max_batch_images: int = 8,
               family: str = "flux") -> ImageGenerator:
    options = {"max_sequence_length": 32} if family == "flux" else {}
    entry = ImageModelConfig(
        id="m", family=family, source="tiny", limits={"max_steps": 4, "max_guidance": 0}, options=options,
        warmup={"default_shape": False},
        batching={"enabled": batching, "wait_ms": wait_ms, "max_batch_images": max_batch_images},
    )
    return ImageGenerator.func_or_class(entry, metrics=False)


def _params(seed: int, steps: int = 2, progress_target=None, **fields) -> GenerationParams:
    return GenerationParams(seeds=[seed], width=128, height=128, num_inference_steps=steps, progress=progress_target,
                            **fields)


class _CountingModel:
    """Wraps the loaded model: counts pipeline calls and their sizes; `entered` is set on each call."""

    def __init__(self, model):
        self.model, self.calls, self.entered = model, [], threading.Event()

    def __call__(self, params, prompts, control, generators, callback):
        self.calls.append(len(prompts))
        self.entered.set()
        return self.model(params, prompts, control, generators, callback)

    def __getattr__(self, name):
        return getattr(self.model, name)


def _alone(seeds_and_prompts, steps: int = 2, **fields) -> list[np.ndarray]:
    generator = _generator(batching=False)

    async def run():
        return [(await generator.generate(_params(seed, steps, **fields), prompt)).images
                for seed, prompt in seeds_and_prompts]

    return asyncio.run(run())


def _close(images: np.ndarray, expected: np.ndarray) -> bool:
    return images.shape == expected.shape and np.abs(images.astype(int) - expected.astype(int)).max() <= TOLERANCE


def _gradient(size: int = 128, flip: bool = False) -> np.ndarray:
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    image = np.stack(np.broadcast_arrays(ramp[None, :], ramp[:, None], 255 - ramp[None, :]), -1).astype(np.uint8)
    return image[::-1].copy() if flip else image


def test_concurrent_requests_share_one_call_and_each_seed_gives_its_image_alone():
    requests = list(zip([11, 12, 13], PROMPTS))
    expected = _alone(requests)
    generator = _generator()
    counting = generator._model = _CountingModel(generator._model)

    async def burst():
        return await asyncio.gather(*(generator.generate(_params(seed), prompt) for seed, prompt in requests))

    outputs = asyncio.run(burst())
    assert counting.calls == [3], "three one-image requests within the wait: one pipeline call of 3 images"
    for output, (seed, _), alone in zip(outputs, requests, expected):
        assert output.seeds == [seed] and output.images.shape == (1, 128, 128, 3)
        assert np.abs(output.images.astype(int) - alone.astype(int)).max() <= TOLERANCE
    assert not np.array_equal(outputs[0].images, outputs[1].images)


def test_different_keys_never_mix_and_the_batch_is_capped_in_images():
    generator = _generator(max_batch_images=2)
    counting = generator._model = _CountingModel(generator._model)

    async def burst():
        return await asyncio.gather(
            generator.generate(_params(1, steps=2), PROMPTS[0]), generator.generate(_params(2, steps=3), PROMPTS[1]),
            generator.generate(_params(3, steps=2), PROMPTS[2]), generator.generate(_params(4, steps=2), PROMPTS[0]),
        )

    outputs = asyncio.run(burst())
    assert [output.seeds for output in outputs] == [[1], [2], [3], [4]]
    # Batches of at most 2 images: [1, 2] split by steps into two calls, then [3, 4] as one.
    assert counting.calls == [1, 1, 2]
    expected = _alone([(2, PROMPTS[1])], steps=3)[0]
    assert np.abs(outputs[1].images.astype(int) - expected.astype(int)).max() <= TOLERANCE


def test_cancelling_one_request_drops_its_result_and_the_others_finish():
    generator = _generator()
    counting = generator._model = _CountingModel(generator._model)

    async def scenario():
        tasks = [asyncio.ensure_future(generator.generate(_params(seed, steps=4), prompt))
                 for seed, prompt in zip([21, 22, 23], PROMPTS)]
        await asyncio.to_thread(counting.entered.wait, 60)  # the batch's pipeline call is running
        tasks[1].cancel()
        return await asyncio.gather(*tasks, return_exceptions=True)

    first, cancelled, third = asyncio.run(scenario())
    assert isinstance(cancelled, asyncio.CancelledError)
    assert counting.calls == [3]
    assert first.seeds == [21] and third.seeds == [23] and first.images.shape == (1, 128, 128, 3)


def test_each_batched_job_gets_its_own_progress(monkeypatch):
    reports = []

    class Handle:
        def __init__(self):
            self.record_progress = self

        def remote(self, job_id, attempt, report):
            reports.append((job_id, report["step"]))

    monkeypatch.setitem(progress._handles, ("app", "JobRunner"), Handle())
    generator = _generator()
    counting = generator._model = _CountingModel(generator._model)

    async def burst():
        targets = [ProgressTarget("app", "JobRunner", f"job-{index}", attempt=1, stage="generate", min_interval_s=0)
                   for index in range(2)]
        return await asyncio.gather(*(generator.generate(_params(seed, steps=3, progress_target=target), prompt)
                                      for seed, prompt, target in zip([31, 32], PROMPTS, targets)))

    asyncio.run(burst())
    assert counting.calls == [2]
    assert sorted(reports) == [("job-0", 1), ("job-0", 2), ("job-0", 3), ("job-1", 1), ("job-1", 2), ("job-1", 3)]


def test_a_request_larger_than_the_batch_runs_alone():
    generator = _generator(max_batch_images=2)
    params = GenerationParams(seeds=[1, 2, 3], width=128, height=128, num_inference_steps=2)
    output = asyncio.run(generator.generate(params, PROMPTS[0]))
    assert output.images.shape == (3, 128, 128, 3) and output.seeds == [1, 2, 3]


def test_edit_and_hires_requests_batch_only_with_their_own_kind_and_match_alone():
    """Two image-to-image requests on the same init image share a call; one on another image, an
    inpainting one and a hires one each run apart, and every result is the one it gets alone."""
    init, other = _gradient(), _gradient(flip=True)
    mask = np.zeros((128, 128), np.uint8)
    mask[32:96, 32:96] = 255
    hires = HiresPass(width=192, height=192, steps=2, strength=0.5)
    fields = [{"edit": EditInput(image=init, strength=0.75)}, {"edit": EditInput(image=init, strength=0.75)},
              {"edit": EditInput(image=other, strength=0.75)}, {"edit": EditInput(image=init, strength=0.75, mask=mask)},
              {"hires": hires}, {}]
    seeds = [41, 42, 43, 44, 45, 46]
    requests = list(zip(seeds, [PROMPTS[0], PROMPTS[1], PROMPTS[0], PROMPTS[2], PROMPTS[1], PROMPTS[2]], fields))
    expected = [_alone([(seed, prompt)], steps=4, **extra)[0] for seed, prompt, extra in requests]
    generator = _generator()
    counting = generator._model = _CountingModel(generator._model)

    async def burst():
        return await asyncio.gather(*(generator.generate(_params(seed, 4, **extra), prompt)
                                      for seed, prompt, extra in requests))

    outputs = asyncio.run(burst())
    # img2img on `init` (2 images), img2img on `other`, inpainting, hires (two passes), plain text-to-image.
    assert counting.calls == [2, 1, 1, 1, 1, 1]
    for output, (seed, _, _), alone in zip(outputs, requests, expected):
        assert output.seeds == [seed] and _close(output.images, alone)
    assert outputs[4].images.shape == (1, 192, 192, 3) and set(outputs[4].timings) == {"first_pass", "hires"}
    # Inpainting kept the init image's pixels outside the mask, in the batch as alone.
    assert np.array_equal(outputs[3].images[0][mask == 0], init[mask == 0])


def test_a_batch_monitor_reports_each_request_its_own_steps_and_first_image():
    """Each request's preview is of its own first image in the shared call, and its steps count on
    across a hires second pass; a cancelled request is no longer reported."""
    async def scenario():
        return [StepMonitor(None, 4) for _ in range(3)]

    monitors = asyncio.run(scenario())
    batch = BatchMonitor(monitors, images=[1, 2, 1])
    assert [monitor.first_image for monitor in monitors] == [0, 1, 3]
    batch.started()
    batch.begin_pass(lambda latents, index: latents[index])
    latents = ["a", "b1", "b2", "c"]
    assert [monitor.preview(latents) for monitor in monitors] == ["a", "b1", "c"]
    for step in range(2):
        batch(None, step, 0, {"latents": latents})
    monitors[2].stop.set()
    batch.begin_pass(None)  # the second pass of a hires batch
    batch(None, 0, 0, {})
    assert [monitor.steps_done for monitor in monitors] == [3, 3, 2]
    for monitor in monitors[:2]:
        monitor.stop.set()
    with pytest.raises(progress.Interrupted):
        batch(None, 1, 0, {})


def test_each_batched_job_gets_previews_of_its_own_image(monkeypatch):
    reports = []

    class Handle:
        def __init__(self):
            self.record_progress = self

        def remote(self, job_id, attempt, report):
            reports.append((job_id, report["step"], report.get("preview")))

    monkeypatch.setitem(progress._handles, ("app", "JobRunner"), Handle())
    generator = _generator(family="sd15")  # SD 1.5's 4-channel latents have preview factors
    counting = generator._model = _CountingModel(generator._model)
    targets = [ProgressTarget("app", "JobRunner", f"job-{index}", attempt=1, stage="generate", min_interval_s=0,
                              preview=True) for index in range(2)]

    async def burst():
        return await asyncio.gather(*(generator.generate(_params(seed, steps=2, progress_target=target), prompt)
                                      for seed, prompt, target in zip([51, 52], PROMPTS, targets)))

    asyncio.run(burst())
    assert counting.calls == [2]
    previews = {job: [preview for name, _, preview in reports if name == job] for job in ("job-0", "job-1")}
    assert all(len(found) == 2 and all(found) for found in previews.values())
    assert previews["job-0"] != previews["job-1"], "each job sees its own image, not the batch's first"


def test_batching_that_a_replica_could_never_fill_fails_at_load_naming_the_fields():
    entry = {"id": "m", "family": "flux", "source": "tiny", "batching": {"enabled": True, "max_batch_images": 8}}
    with pytest.raises(ValidationError, match=r"deployment.max_ongoing_requests \(4\) is below batching.max_batch_images \(8\)"):
        ImageModelEntry(**entry)
    assert ImageModelEntry(**entry, deployment={"max_ongoing_requests": 8}).batching.enabled
    with pytest.raises(ValidationError, match=r"deployments.ClipScorer.max_ongoing_requests \(8\) is below "
                                              r"scores.batching.max_batch_images \(16\)"):
        AppArgs(scores={"batching": {"enabled": True, "max_batch_images": 16}})
    assert AppArgs(scores={"batching": {"enabled": True, "max_batch_images": 16}},
                   deployments={"ClipScorer": {"max_ongoing_requests": 16}}).scoring_config().batching.enabled


def test_outside_a_replica_batching_is_off_and_requests_take_turns(monkeypatch):
    import deployments.image_generator

    monkeypatch.setattr(deployments.image_generator, "in_serve_replica", lambda: False)
    generator = _generator()
    assert generator._batched is None
    output = asyncio.run(generator.generate(_params(1), PROMPTS[0]))
    assert output.seeds == [1] and output.images.shape == (1, 128, 128, 3)


def test_info_reports_batching():
    assert _generator(max_batch_images=4).info()["batching"] == {"enabled": True, "max_batch_images": 4, "wait_ms": 300}
    assert _generator(batching=False).info()["batching"] is None


def test_concurrent_score_calls_share_one_forward_pass_and_score_as_alone():
    from deployments.config import ScorerConfig
    from deployments.scoring.clip_scorer import ClipScorer

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (2, 96, 96, 3), dtype=np.uint8), rng.integers(0, 256, (1, 128, 128, 3), dtype=np.uint8)]
    prompts = ["a red fox in snow", "a bowl of ramen"]
    alone = ClipScorer.func_or_class(ScorerConfig(source="tiny"), metrics=False)
    expected = [asyncio.run(alone.score(batch, prompt)) for batch, prompt in zip(images, prompts)]
    scorer = ClipScorer.func_or_class(ScorerConfig(source="tiny", batching={"enabled": True, "wait_ms": 300}),
                                      metrics=False)
    passes = []
    score = scorer._score
    scorer._score = lambda batch, *rest: passes.append(len(batch)) or score(batch, *rest)

    async def burst():
        return await asyncio.gather(*(scorer.score(batch, prompt) for batch, prompt in zip(images, prompts)))

    results = asyncio.run(burst())
    assert passes == [3], "two calls within the wait: one forward pass of 3 images"
    for result, reference in zip(results, expected):
        assert len(result) == len(reference)
        for got, want in zip(result, reference):
            for metric in ("alignment", "aesthetic", "laion", "combined"):
                assert abs(got[metric] - want[metric]) < 1e-3 * max(1.0, abs(want[metric]))

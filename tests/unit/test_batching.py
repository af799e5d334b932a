"""Request batching in the generic ImageGenerator (Ray Serve's @serve.batch, in process, no Ray cluster).

Each test builds its own generator: Serve's batch queue lives on the event loop of its first call.
"""

import asyncio
import threading

import numpy as np
import pytest

from deployments.config import ImageModelConfig
from deployments.image_generator import ImageGenerator
from deployments.runtime import progress
from deployments.runtime.types import EnhancedPrompt, GenerationParams, ProgressTarget

PROMPTS = [EnhancedPrompt(prompt=text, negative_prompt=None, style="none", enhancer="none")
           for text in ("a lighthouse at dusk", "a red fox in snow", "a bowl of ramen")]
# Not bit-identical on the CPU: a larger matmul rounds differently. Measured on the tiny FLUX, float32,
# a batch of 3 vs each image alone: at most 1 level of 255, in 1-3 of 49152 values at 128x128 (2 steps)
# and 17-86 of 196608 at 256x256 (4 steps).
TOLERANCE = 1


@pytest.fixture(autouse=True)
def outside_a_replica(monkeypatch):
    """Serve's batch queue reads the replica's max_ongoing_requests for a warning; there is no
    replica here (the builder keeps max_ongoing_requests >= max_batch_images in Serve)."""
    from ray.serve.batching import _BatchQueue

    monkeypatch.setattr(_BatchQueue, "_warn_if_max_batch_size_exceeds_max_ongoing_requests", lambda self: None)


def _generator(batching: bool = True, wait_ms: float = 300, max_batch_images: int = 8) -> ImageGenerator:
    entry = ImageModelConfig(
        id="flux-schnell", family="flux", source="tiny", limits={"max_steps": 4, "max_guidance": 0},
        options={"max_sequence_length": 32}, warmup={"default_shape": False},
        batching={"enabled": batching, "wait_ms": wait_ms, "max_batch_images": max_batch_images},
    )
    return ImageGenerator.func_or_class(entry, metrics=False)


def _params(seed: int, steps: int = 2, progress_target=None) -> GenerationParams:
    return GenerationParams(seeds=[seed], width=128, height=128, num_inference_steps=steps, progress=progress_target)


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


def _alone(seeds_and_prompts, steps: int = 2) -> list[np.ndarray]:
    generator = _generator(batching=False)

    async def run():
        return [(await generator.generate(_params(seed, steps), prompt)).images for seed, prompt in seeds_and_prompts]

    return asyncio.run(run())


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


def test_info_reports_the_tier_batching_warmup_and_cold_start():
    entry = ImageModelConfig(id="flux-schnell", family="flux", source="tiny", limits={"max_steps": 4, "max_guidance": 0},
                             options={"max_sequence_length": 32}, default_width=256, default_height=256, default_steps=2,
                             acceleration={"fuse_qkv": True},
                             warmup={"shapes": [{"width": 128, "height": 128, "images": 2}]})
    info = ImageGenerator.func_or_class(entry, metrics=False).info()
    assert info["acceleration"] == {"fuse_qkv": True} and info["batching"] is None
    assert info["warmup_shapes"] == [{"width": 256, "height": 256, "steps": 2, "images": 1},
                                     {"width": 128, "height": 128, "steps": 2, "images": 2}]
    assert info["cold_start"]["load_s"] > 0 and info["cold_start"]["warmup_s"] > 0


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

"""Out of accelerator memory is a clean, retryable error: the replica frees its cache and serves
the next request, the ingress answers 503 `reason: out_of_memory`, a job retries it once.
The error is injected on the CPU (torch raises the same `torch.OutOfMemoryError` on CUDA)."""

import asyncio

import pytest
import torch
from fastapi.testclient import TestClient
from ray.exceptions import RayTaskError

from deployments.config import ImageModelConfig
from deployments.image_generator import ImageGenerator
from deployments.runtime.metrics import ModelMetrics
from deployments.runtime.types import EnhancedPrompt, GenerationParams, ModelOutOfMemory
from serve_app.api.app import build_api
from serve_app.services.health import Readiness
from tests.fakes import FakeGenerator, fake_services
from tests.helpers import LOOPBACK, wait_until_async
from tests.unit.test_job_dispatch import _dispatcher, _state, _submit

OOM = "CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 79.11 GiB total capacity)\nmore detail"
# No warm-up: not under test here (tests/unit/test_acceleration.py covers it).
TINY_FLUX = ImageModelConfig(id="flux-schnell", family="flux", source="tiny", limits={"max_steps": 4, "max_guidance": 0},
                             options={"max_sequence_length": 32}, warmup={"default_shape": False})
PROMPT = EnhancedPrompt(prompt="a red cube", negative_prompt=None, style="none", enhancer="none")


class RunsOutOfMemory:
    """Wraps a loaded model: its next `times` calls raise torch's OutOfMemoryError."""

    def __init__(self, model, times: int):
        self._model, self.times = model, times

    def __call__(self, *args, **kwargs):
        if self.times:
            self.times -= 1
            raise torch.OutOfMemoryError(OOM)
        return self._model(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._model, name)


def test_the_replica_frees_memory_answers_out_of_memory_and_serves_the_next_request():
    generator = ImageGenerator.func_or_class(TINY_FLUX, metrics=False)
    generator._model = RunsOutOfMemory(generator._model, times=1)
    params = GenerationParams(seeds=[3], width=64, height=64, num_inference_steps=2)
    with pytest.raises(ModelOutOfMemory) as raised:
        asyncio.run(generator.generate(params, PROMPT))
    assert raised.value.reason == "out_of_memory" and "Tried to allocate 20.00 GiB" in str(raised.value)
    assert "more detail" not in str(raised.value)
    output = asyncio.run(generator.generate(params, PROMPT))  # the same replica, the next request
    assert output.images.shape == (1, 64, 64, 3)


def test_other_model_errors_pass_through_unchanged():
    with pytest.raises(ValueError):
        with ModelMetrics("m", "cpu", enabled=False).track():
            raise ValueError("not memory")


class OutOfMemoryGenerator(FakeGenerator):
    """As a Serve handle delivers it: the replica's ModelOutOfMemory inside a RayTaskError."""

    def __init__(self, times: int = 10_000):
        super().__init__()
        self.times = times

    async def generate(self, params, prompt):
        if self.times:
            self.times -= 1
            raise RayTaskError("generate", "traceback", ModelOutOfMemory("flux-schnell", OOM.splitlines()[0])
                               ).as_instanceof_cause()
        return await super().generate(params, prompt)


def test_the_ingress_answers_503_out_of_memory_with_retry_after():
    services = fake_services(generator=OutOfMemoryGenerator())
    services.readiness = Readiness(lambda: {})
    app = build_api()
    app.state.services = services
    response = TestClient(app, client=LOOPBACK).post("/v1/images", json={"prompt": "a red cube", "enhance": False})
    assert response.status_code == 503 and response.headers["Retry-After"] == "5"
    assert response.json()["reason"] == "out_of_memory" and "flux-schnell" in response.json()["detail"]


def test_a_job_retries_out_of_memory_once_then_fails_saying_why(store):
    async def scenario():
        dispatcher = _dispatcher(store, OutOfMemoryGenerator(), retry_limit=2)
        dispatcher.start()
        job_id = await _submit(dispatcher, "too big")
        await wait_until_async(lambda: _state(store, job_id) == "failed", 10)
        await dispatcher.stop()
        return store.get(job_id)

    job = asyncio.run(scenario())
    assert job.attempts == 2  # not 3: retry_limit 2, but out of memory is retried once
    assert "ran out of accelerator memory" in job.error and "gave up after 2 attempts" in job.error


def test_a_job_that_fits_on_its_retry_succeeds(store):
    async def scenario():
        dispatcher = _dispatcher(store, OutOfMemoryGenerator(times=1), retry_limit=2)
        dispatcher.start()
        job_id = await _submit(dispatcher, "fits the second time")
        await wait_until_async(lambda: _state(store, job_id) == "succeeded", 10)
        await dispatcher.stop()
        return store.get(job_id)

    assert asyncio.run(scenario()).attempts == 2

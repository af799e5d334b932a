"""OpenAI's streamed images over a real dispatcher and store, without Ray: the unmodified `openai` SDK
reads partial images made from the job's denoising previews, then the image; edits stream as
`image_edit` events; bad stream fields are 400s naming them, and no job is made for them."""

import asyncio
import base64
import io

import httpx2
import numpy as np
import openai
import pytest
from PIL import Image

from deployments.runtime.previews import small_png_data_url
from deployments.runtime.types import ProgressTarget
from serve_app.api.app import build_api
from serve_app.api.openai.streaming import partial_due
from serve_app.jobs import http as jobs_http
from serve_app.jobs.dispatch import JobDispatcher
from serve_app.services.health import Readiness
from serve_app.services.local import LocalHandle
from tests.fakes import FakeGenerator, fake_services
from tests.helpers import image_bytes, wait_until_async
from tests.job_stores import Backend

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def store(tmp_path):
    """SQLite only: the stream follows the job through JobsApi, whose stores are tested against both backends."""
    backend = Backend("sqlite", tmp_path)
    yield backend.open()
    backend.close()


class Watched:
    """The dispatcher as the ingress's handle sees it, noting the newest version a stream has watched from."""

    def __init__(self, dispatcher: JobDispatcher):
        self._dispatcher = dispatcher
        self.seen = 0

    def __getattr__(self, name):
        return getattr(self._dispatcher, name)

    async def watch(self, job_id, after_version, timeout_s):
        self.seen = max(self.seen, after_version)
        return await self._dispatcher.watch(job_id, after_version, timeout_s)


class PreviewingGenerator(FakeGenerator):
    """Reports `steps` denoising steps to the job, as a generator's StepMonitor does through Serve, each
    with a preview (a grey picture, lighter each step) when its target asks for one. Each step waits
    until the stream has seen it, so the test knows which steps a stream had to choose from."""

    def __init__(self, steps: int = 4):
        super().__init__()
        self.steps = steps
        self.runner: Watched | None = None

    async def generate(self, params, prompt):
        target = params.progress
        for step in range(1, self.steps + 1 if target is not None else 1):
            report = {"stage": target.stage, "round": 1, "step": step, "steps": self.steps, "elapsed_s": 0.01 * step}
            if target.preview:
                report["preview"] = small_png_data_url(np.full((8, 8, 3), 40 * step, np.uint8))
            await self.runner.record_progress(target.job_id, target.attempt, report)
            version = self.runner.store.get(target.job_id).version
            await wait_until_async(lambda version=version: self.runner.seen >= version, 5)
        return await super().generate(params, prompt)


def _app(store, generator: PreviewingGenerator):
    services = fake_services(generator=generator)
    dispatcher = JobDispatcher(
        store, services.images, None, {"image": 1}, 2, sweep_interval_s=3600, poll_interval_s=0.05,
        progress_target=lambda job: ProgressTarget(app="genserve", deployment="JobRunner", job_id=job.id,
                                                   attempt=job.attempts, stage="generate", min_interval_s=0))
    generator.runner = Watched(dispatcher)
    services.jobs = jobs_http.JobsApi(LocalHandle(generator.runner), services.images, None, 2)
    services.readiness = Readiness(lambda: {})
    app = build_api()
    app.state.services = services
    return app, dispatcher


def _run(store, scenario, steps: int = 4):
    """`scenario(client, store)` with the SDK's async client on the app in process, the dispatcher running."""
    generator = PreviewingGenerator(steps)
    app, dispatcher = _app(store, generator)

    async def run():
        dispatcher.start()
        http = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://genserve.test")
        try:
            return await scenario(openai.AsyncOpenAI(base_url="http://genserve.test/v1", api_key="unused",
                                                     http_client=http, max_retries=0))
        finally:
            await dispatcher.stop()

    return asyncio.run(run())


async def _events(stream) -> list:
    return [event async for event in stream]


def _grey(b64: str) -> int:
    with Image.open(io.BytesIO(base64.b64decode(b64))) as picture:
        return picture.convert("L").getpixel((0, 0))


def test_the_sdk_streams_partial_images_from_the_previews_then_each_image(store):
    async def scenario(client):
        stream = await client.images.generate(prompt="a lighthouse", n=2, size="256x256", stream=True, partial_images=2,
                                              quality="high", extra_body={"seed": 5})
        return await _events(stream)

    events = _run(store, scenario)
    assert [event.type for event in events] == ["image_generation.partial_image"] * 2 + \
        ["image_generation.completed"] * 2
    partials, completed = events[:2], events[2:]
    # Two of four steps, spread over them: the previews of steps 2 and 3 (grey 80 and 120).
    assert [(event.partial_image_index, _grey(event.b64_json)) for event in partials] == [(0, 80), (1, 120)]
    assert all(event.output_format == "png" and event.size == "8x8" and event.quality == "high" for event in partials)
    assert all(base64.b64decode(event.b64_json).startswith(PNG) for event in completed)
    assert [event.model_extra["genserve"]["images"][index]["seed"] for index, event in enumerate(completed)] == [5, 6]
    assert completed[0].size == "256x256" and completed[0].usage.total_tokens == 0
    assert completed[0].model_extra["revised_prompt"] == "a lighthouse, enhanced"
    job_id = completed[0].model_extra["genserve"]["images"][0]["url"].split("/")[3]
    assert store.get(job_id).state == "succeeded", "the stream's request ran as a durable job"


def test_no_partial_images_asked_for_means_no_previews_made(store):
    async def scenario(client):
        return await _events(await client.images.generate(prompt="a fox", stream=True, extra_body={"seed": 1}))

    events = _run(store, scenario)
    assert [event.type for event in events] == ["image_generation.completed"]
    (job,) = store.list()
    assert store.get(job.id, with_request=True).request["preview"] is False, "no previews made for nothing"


def test_an_edit_streams_image_edit_events(store):
    async def scenario(client):
        stream = await client.images.edit(image=("photo.png", image_bytes(size=(64, 64)), "image/png"),
                                          prompt="a red balloon", stream=True, partial_images=1,
                                          extra_body={"strength": 0.9, "seed": 3})
        return await _events(stream)

    events = _run(store, scenario)
    assert [event.type for event in events] == ["image_edit.partial_image", "image_edit.completed"]
    assert _grey(events[0].b64_json) == 80 and events[1].model_extra["genserve"]["mode"] == "image-to-image"


def test_bad_stream_fields_are_400s_naming_the_field_and_make_no_job(store):
    cases = [({"stream": True, "partial_images": 4}, "partial_images"),
             ({"stream": True, "partial_images": -1}, "partial_images"),
             ({"partial_images": 2}, "partial_images"),
             ({"stream": True, "response_format": "url"}, "response_format")]

    async def scenario(client):
        errors = []
        for fields, _ in cases:
            with pytest.raises(openai.BadRequestError) as caught:
                await client.images.generate(prompt="a fox", **fields)
            errors.append(caught.value)
        return errors

    errors = _run(store, scenario)
    assert [(error.status_code, error.param, error.type) for error in errors] == \
        [(400, param, "invalid_request_error") for _, param in cases], [error.body for error in errors]
    assert "partial_images: Input should be less than or equal to 3 (allowed: 0-3)" in errors[0].message
    assert store.list() == []


def test_partial_images_are_spread_over_the_steps():
    due = [[step for step in range(1, 9) if partial_due({"step": step, "steps": 8}, sent, 3)] for sent in range(4)]
    assert [steps[0] if steps else None for steps in due] == [2, 4, 6, None]
    assert not partial_due({"step": 3}, 0, 1), "no steps known: no partial"

"""The hybrid fallback over fake deployments and a stand-in remote images API on loopback: when a
request that allows it meets back-pressure or a long estimated wait it is served remotely, scored
locally and labelled; otherwise the local answer (or the 503) stands."""

import asyncio
import re

import pytest
from fastapi.testclient import TestClient
from ray.serve.exceptions import BackPressureError

from serve_app.api.app import build_api
from serve_app.config import AppArgs, FallbackConfig
from serve_app.protocol.errors import RequestError
from serve_app.protocol.schemas import ImageRequest
from serve_app.services.facade import Services
from serve_app.services.fallback import FallbackFailed, RemoteImages, WaitEstimator
from serve_app.services.graph import Overloaded
from serve_app.services.media import read_png_meta
from tests.fakes import FakeGenerator, fake_services
from tests.helpers import LOOPBACK, app_settings
from tests.images_server import REMOTE_GREY, FakeImagesServer


class BusyGenerator(FakeGenerator):
    """Rejects as a Serve handle does when the deployment's queue is full, while `busy` is set."""

    def __init__(self):
        super().__init__()
        self.busy = True

    async def generate(self, params, prompt):
        if self.busy:
            raise BackPressureError(num_queued_requests=1, max_queued_requests=1, retry_after_s=2)
        return await super().generate(params, prompt)


@pytest.fixture(scope="module")
def remote():
    with FakeImagesServer() as server:
        yield server


def services(remote_url: str | None, generator=None, **config) -> tuple[Services, object]:
    generator = generator or BusyGenerator()
    fallback = {}
    if remote_url is not None:
        fallback = {"enabled": True, "base_url": remote_url, "model": "remote-xl", "api_key_env": None,
                    "response_format": "b64_json", **config}
    settings = app_settings(policy={"metric": "aesthetic", "threshold": 0.5}, fallback=fallback)
    return fake_services(settings, generator=generator), generator


def test_fallback_is_off_by_default_in_the_config():
    assert AppArgs().fallback.enabled is False


def test_a_request_that_allows_fallback_is_served_remotely_when_the_model_rejects_for_back_pressure(remote):
    service, _ = services(remote.base_url)
    response = asyncio.run(service.generate_images(ImageRequest(prompt="a fox", num_images=2, fallback=True)))
    assert response.backend == "remote" and response.model == "remote-xl"
    assert response.enhanced_prompt == "a fox, as drawn remotely"
    assert len(response.images) == 2 and (response.width, response.height) == (256, 256)
    # Scored locally against the request's gate: the stand-in's grey 200 gives aesthetic 200/255.
    assert response.images[0].scores.aesthetic == pytest.approx(REMOTE_GREY / 255)
    assert response.passed is True
    assert read_png_meta(__import__("base64").b64decode(response.images[0].b64_png))["backend"] == "remote"
    assert any("remote fallback (backpressure)" in warning for warning in response.warnings)
    sent = remote.requests[-1]["body"]
    assert sent == {"model": "remote-xl", "prompt": "a fox", "n": 2, "size": "256x256", "response_format": "b64_json"}


def test_without_the_request_opting_in_back_pressure_stays_a_503(remote):
    service, _ = services(remote.base_url)
    before = len(remote.requests)
    with pytest.raises(Overloaded):  # call_stage turns the BackPressureError into the ingress's 503
        asyncio.run(service.generate_images(ImageRequest(prompt="a fox")))
    assert len(remote.requests) == before  # the prompt never left


def test_over_http_an_opted_in_request_is_served_remotely(remote):
    service, _ = services(remote.base_url)
    api = build_api()
    api.state.services = service
    with TestClient(api, client=LOOPBACK) as client:
        served = client.post("/v1/images", json={"prompt": "a fox", "fallback": True})
    assert served.status_code == 200 and served.json()["backend"] == "remote"


def test_a_service_without_fallback_refuses_requests_that_ask_for_it():
    service, generator = services(None)
    generator.busy = False
    with pytest.raises(RequestError) as caught:
        asyncio.run(service.generate_images(ImageRequest(prompt="a fox", fallback=True)))
    assert caught.value.field == "fallback" and "fallback.enabled is false" in caught.value.message
    local = asyncio.run(service.generate_images(ImageRequest(prompt="a fox")))
    assert local.backend == "local"


def test_requests_with_loras_control_or_references_cannot_ask_for_fallback(remote):
    service, _ = services(remote.base_url)
    request = ImageRequest(prompt="a fox", fallback=True, loras=[{"name": "ink"}])
    with pytest.raises(RequestError) as caught:
        asyncio.run(service.generate_images(request))
    assert caught.value.field == "fallback" and "loras" in caught.value.message
    with pytest.raises(RequestError) as caught:
        asyncio.run(service.generate_images(ImageRequest(prompt="make it night", fallback=True,
                                                         reference_images=["aGk="])))
    assert caught.value.field == "fallback" and "reference_images" in caught.value.message


@pytest.mark.parametrize("field, value", [("candidates", 2), ("quality_percentile", 50)])
def test_best_of_n_and_percentiles_cannot_ask_for_fallback(remote, field, value):
    service, _ = services(remote.base_url)
    with pytest.raises(RequestError) as caught:
        asyncio.run(service.generate_images(ImageRequest(prompt="a fox", fallback=True, **{field: value})))
    assert caught.value.field == "fallback" and field in caught.value.message


def test_an_idle_model_serves_locally_even_when_fallback_is_allowed(remote):
    service, generator = services(remote.base_url, max_estimated_wait_s=1.0)
    generator.busy = False
    response = asyncio.run(service.generate_images(ImageRequest(prompt="a fox", fallback=True)))
    assert response.backend == "local" and response.model == "flux-schnell"


def test_a_long_estimated_wait_sends_the_request_remote_before_trying_locally(remote):
    service, generator = services(remote.base_url, max_estimated_wait_s=5.0)
    generator.busy = False
    estimator = service.fallback.estimator
    estimator.record("flux-schnell", 3.0)  # seconds per request, as sampled when the model was idle
    with estimator.tracking("flux-schnell"), estimator.tracking("flux-schnell"):  # two ahead: 6 s > 5 s
        assert estimator.estimate("flux-schnell") == pytest.approx(6.0)
        response = asyncio.run(service.generate_images(ImageRequest(prompt="a fox", fallback=True)))
    assert response.backend == "remote" and any("estimated_wait" in warning for warning in response.warnings)
    assert generator.calls == []


def test_the_wait_estimate_divides_by_replicas_and_needs_a_sample():
    estimator = WaitEstimator({"m": 2})
    assert estimator.estimate("m") == 0.0
    with estimator.tracking("m") as alone:
        assert alone is True
        assert estimator.estimate("m") is None  # in flight, but no service time known yet
        estimator.record("m", 4.0)
        estimator.record("m", 2.0)  # EWMA: 0.3 * 2 + 0.7 * 4
        assert estimator.estimate("m") == pytest.approx(3.4 / 2)
        with estimator.tracking("m") as second_alone:
            assert second_alone is False
    assert estimator.in_flight["m"] == 0


def test_a_remote_error_is_a_502_with_a_request_id_and_its_text_only_in_the_log(remote, caplog):
    """The remote's error text can quote the caller's key (OpenAI's 401 shows its last characters)."""
    service, _ = services(remote.base_url)
    with caplog.at_level("WARNING", logger="ray.serve"), pytest.raises(FallbackFailed) as caught:
        asyncio.run(service.generate_images(ImageRequest(prompt="crash please", fallback=True)))
    detail = caught.value.detail
    assert caught.value.status == 502 and "500" in detail and "crashed" not in detail
    request_id = re.search(r"request id ([0-9a-f]{12})", detail).group(1)
    logged = [record.getMessage() for record in caplog.records if request_id in record.getMessage()]
    assert logged and "the remote model crashed" in logged[0]


def test_the_remote_key_comes_from_the_named_environment_variable(remote, monkeypatch):
    config = FallbackConfig(enabled=True, base_url=remote.base_url, api_key_env="TEST_REMOTE_KEY")
    with pytest.raises(ValueError, match="TEST_REMOTE_KEY"):
        RemoteImages(config)
    monkeypatch.setenv("TEST_REMOTE_KEY", "sk-test-123")
    asyncio.run(RemoteImages(config).generate("a fox", 1, 256, 256))
    assert remote.requests[-1]["authorization"] == "Bearer sk-test-123"


def test_the_remote_key_can_come_from_a_file_which_wins_over_the_variable(remote, tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_REMOTE_KEY", "sk-from-the-environment")
    key_file = tmp_path / "remote-key"
    config = FallbackConfig(enabled=True, base_url=remote.base_url, api_key_env="TEST_REMOTE_KEY",
                            api_key_file=str(key_file))
    with pytest.raises(ValueError, match="fallback.api_key_file: cannot read"):
        RemoteImages(config)  # read on the replica, when the service is built
    key_file.write_text("sk-from-the-file\n")
    asyncio.run(RemoteImages(config).generate("a fox", 1, 256, 256))
    assert remote.requests[-1]["authorization"] == "Bearer sk-from-the-file"
    key_file.write_text("")
    with pytest.raises(ValueError, match="is empty") as caught:
        RemoteImages(config)
    assert "sk-from" not in str(caught.value)

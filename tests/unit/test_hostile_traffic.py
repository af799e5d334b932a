"""The HTTP app under hostile input and overload, without Ray: the real FastAPI app (build_api)
over fake deployments in-process (LocalHandle)."""

import asyncio
import inspect
import threading

import pytest
from fastapi.testclient import TestClient
from ray.serve.exceptions import BackPressureError

from serve_app.api.app import build_api
from serve_app.config import QualityPolicy
from serve_app.jobs import http as jobs_http
from serve_app.services.health import Readiness
from serve_app.services.local import LocalHandle
from serve_app.services.metrics import OTHER, GraphMetrics, field_label
from tests.fakes import FakeGenerator, fake_services
from tests.helpers import LOOPBACK, app_settings, model_entry, wait_until


class RecordingMetrics:
    def __init__(self):
        self.rejected: list[tuple[str, str]] = []
        self.timeouts: list[str] = []

    def rejection(self, route, fields):
        # The real labelling, without Ray's recorder.
        self.rejected += [(route, field_label(field)) for field in fields]

    def timeout(self, stage):
        self.timeouts.append(stage)

    def image_response(self, response):
        pass


class FullQueueGenerator(FakeGenerator):
    def __init__(self):
        super().__init__()
        self.asked = 0

    async def generate(self, params, prompt):
        self.asked += 1
        raise BackPressureError(num_queued_requests=8, max_queued_requests=8, status_code=503, retry_after_s=2.5)


class SlowGenerator(FakeGenerator):
    def __init__(self, seconds):
        super().__init__()
        self.seconds = seconds
        self.started = self.finished = 0

    async def generate(self, params, prompt):
        self.started += 1
        await asyncio.sleep(self.seconds)
        self.finished += 1
        return await super().generate(params, prompt)


class FakeRunner:
    def __init__(self):
        self.listed = []

    async def list(self, state, limit, before, owner=None):
        self.listed.append(before)
        return []


def _client(generator=None, timeout_s=600.0, policy=None, readiness=None, runner=None):
    services = fake_services(app_settings(request_timeout_s=timeout_s, policy=policy or QualityPolicy()),
                             generator=generator)
    services.jobs = jobs_http.JobsApi(LocalHandle(runner or FakeRunner()), services.images, None, 2)
    services.metrics = RecordingMetrics()
    services.readiness = readiness or Readiness(lambda: {"Ingress": {"status": "HEALTHY", "running": 1}})
    app = build_api()
    app.state.services = services
    return TestClient(app, client=LOOPBACK), services


def test_the_recording_metrics_stand_in_for_the_real_ones():
    """Each method the tests record is one of GraphMetrics's, taking the same parameters."""
    methods = [name for name in vars(RecordingMetrics) if not name.startswith("_")]
    assert methods == ["rejection", "timeout", "image_response"]
    for name in methods:
        recording, real = (inspect.signature(getattr(kind, name)) for kind in (RecordingMetrics, GraphMetrics))
        assert list(recording.parameters) == list(real.parameters), name


def test_an_unknown_non_ascii_key_is_a_422_counted_under_other():
    client, services = _client()
    response = client.post("/v1/images", json={"prompt": "a cat", "ü": 1, "width": 7})
    assert response.status_code == 422
    fields = {label for _, label in services.metrics.rejected}
    assert fields == {OTHER, "width"}
    assert {route for route, _ in services.metrics.rejected} == {"/v1/images"}


def test_job_routes_are_labelled_by_template_never_by_id():
    client, services = _client()
    assert client.get("/v1/jobs", params={"cursor": "x"}).status_code == 422
    assert services.metrics.rejected == [("/v1/jobs", "cursor")]
    assert field_label("request.loras.3.name") == "request.loras.name"
    assert field_label("control.bogus") == "control" and field_label("weird\u00b2") == OTHER


@pytest.mark.parametrize("field, value", [("revise_prompt", 0), ("enhance", "yes"), ("width", "256"),
                                          ("num_images", 1.5), ("seed", True)])
def test_values_of_the_wrong_type_are_refused_not_coerced(field, value):
    client, _ = _client()
    response = client.post("/v1/images", json={"prompt": "a cat", field: value})
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"] == ["body", field]


@pytest.mark.parametrize("cursor", ["\u00b2", "1" * 20, "-1", " 1", "abc"])
def test_a_garbage_job_cursor_is_a_422_naming_the_cursor(cursor):
    client, _ = _client()
    response = client.get("/v1/jobs", params={"cursor": cursor})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["query", "cursor"]


def test_a_valid_cursor_reaches_the_store():
    runner = FakeRunner()
    client, _ = _client(runner=runner)
    assert client.get("/v1/jobs", params={"cursor": "123"}).status_code == 200
    assert runner.listed == [123]


def test_every_route_documents_its_error_statuses_with_the_error_model():
    client, _ = _client()
    paths = client.get("/openapi.json").json()["paths"]
    expected = {
        ("post", "/v1/images"): {"200", "400", "413", "422", "503", "504"},
        ("post", "/v1/jobs"): {"202", "400", "409", "413", "422", "429", "501", "503"},
        ("post", "/v1/jobs/{job_id}/cancel"): {"200", "202", "404", "409", "501", "503"},
        ("get", "/v1/jobs/{job_id}/result"): {"200", "404", "409", "501", "503"},
        ("get", "/readyz"): {"200", "503"},
    }
    for (method, path), statuses in expected.items():
        responses = paths[path][method]["responses"]
        assert statuses <= set(responses), (path, sorted(responses))
    error = paths["/v1/images"]["post"]["responses"]["503"]["content"]["application/json"]["schema"]
    assert error == {"$ref": "#/components/schemas/ErrorBody"}


def test_a_full_queue_is_a_quick_503_with_the_deployments_retry_after():
    generator = FullQueueGenerator()
    client, _ = _client(generator)
    response = client.post("/v1/images", json={"prompt": "a cat", "enhance": False})
    assert generator.asked == 1  # answered at once: the ingress neither retries nor waits for a place
    assert response.status_code == 503 and response.headers["Retry-After"] == "3"  # 2.5 s, rounded up
    assert response.json()["reason"] == "overloaded"


def test_one_deadline_spans_every_round_of_a_request():
    # Each round's generation (0.4 s) is well within the 1 s timeout, but three rounds are not:
    # the deadline does not restart per stage.
    policy = QualityPolicy(metric="aesthetic", threshold=1.0, max_attempts=3)  # nothing passes: three rounds
    generator = SlowGenerator(0.4)
    client, services = _client(generator, timeout_s=1.0, policy=policy)
    response = client.post("/v1/images", json={"prompt": "a cat", "enhance": False, "seed": 1})  # grey 1: fails
    assert response.status_code == 504, response.text
    assert response.headers["Retry-After"] and response.json()["reason"] == "deadline"
    assert "deadline of 1s" in response.json()["detail"]
    # The round running at the deadline was cut, not waited for (a per-stage deadline would have let all
    # three finish and answered 200).
    assert generator.finished == generator.started - 1
    assert services.metrics.timeouts == ["generate"]


def test_a_request_within_its_deadline_is_not_cut_short():
    policy = QualityPolicy(metric="aesthetic", threshold=1.0, max_attempts=2)
    client, _ = _client(SlowGenerator(0.1), timeout_s=10.0, policy=policy)
    # A fixed seed: the fake paints grey = seed % 256, and a random seed ending in 255 would score 1.0 and pass.
    response = client.post("/v1/images", json={"prompt": "a cat", "enhance": False, "seed": 1})
    assert response.status_code == 200 and len(response.json()["attempts"]) == 2


def test_livez_answers_without_any_deployment():
    def unreachable():
        raise AssertionError("liveness must not ask the controller")

    client, _ = _client(readiness=Readiness(unreachable))
    assert client.get("/livez").json() == {"status": "ok"}


def test_readyz_names_what_is_not_ready_and_caches_the_answer():
    calls = []

    def probe():
        calls.append(1)
        return {"FluxSchnellGenerator": {"status": "HEALTHY", "running": 1},
                "SvdGenerator": {"status": "UPDATING", "running": 0}}

    client, _ = _client(readiness=Readiness(probe, cache_s=60))
    first = client.get("/readyz")
    assert first.status_code == 503 and first.json()["status"] == "not_ready"
    assert first.json()["deployments"]["SvdGenerator"]["ready"] is False
    assert first.json()["deployments"]["FluxSchnellGenerator"]["ready"] is True
    assert client.get("/readyz").status_code == 503 and len(calls) == 1  # cached


def test_readyz_is_not_ready_when_the_controller_is_slow_and_says_nothing_internal():
    released = threading.Event()

    def slow():  # a controller that answers only once the test lets it
        released.wait(30)
        return {}

    def broken():
        raise ConnectionError("10.0.0.7:6379 refused; /home/ray/session_latest")

    client, _ = _client(readiness=Readiness(slow, timeout_s=0.1))
    with client:  # one event loop for the test, as on a replica (else closing it waits for the thread)
        response = client.get("/readyz")
        answered_before_the_controller = not released.is_set()
        released.set()
    assert response.status_code == 503 and answered_before_the_controller
    assert response.json()["reason"] == "the Serve controller did not answer (timeout)"
    client, _ = _client(readiness=Readiness(broken))
    body = client.get("/readyz").json()
    assert body["ready"] is False and "ConnectionError" in body["reason"] and "10.0.0.7" not in body["reason"]


def test_readyz_turns_ready_when_the_deployments_are():
    states = {"status": "UPDATING", "running": 0}
    client, _ = _client(readiness=Readiness(lambda: {"SdxlGenerator": dict(states)}, cache_s=0))
    assert client.get("/readyz").status_code == 503
    states.update(status="HEALTHY", running=1)
    wait_until(lambda: client.get("/readyz").status_code == 200, timeout_s=5, what="ready")


def test_a_request_over_the_models_compute_budget_is_a_422_naming_the_fields_and_the_budget():

    from serve_app.protocol.errors import RequestError

    images = fake_services(app_settings(model_entry(max_pixel_steps=256 * 256 * 4 * 2))).images
    from serve_app.protocol.schemas import ImageRequest

    images.plan(ImageRequest(prompt="a cat", num_images=2))  # 256x256 x 4 steps x 2 images x 1 round: at the budget
    with pytest.raises(RequestError) as over:
        images.plan(ImageRequest(prompt="a cat", num_images=2, max_attempts=2))
    message = over.value.detail()[0]["msg"]
    assert "256x256x4x2x2 = 1048576 pixel-steps, over flux-schnell's budget of 524288" in message
    assert over.value.detail()[0]["allowed"].startswith("width x height x num_inference_steps x num_images x max_attempts")


def test_the_budget_is_a_config_field_and_listed_in_the_models_catalogue():
    from serve_app.config import ImageModelEntry
    from serve_app.services.validation import ModelSpec

    entry = ImageModelEntry(id="flux-schnell", family="flux", source="tiny", max_pixel_steps=10**9)
    assert ModelSpec.of(entry).public()["max_pixel_steps"] == 10**9

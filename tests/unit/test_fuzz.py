"""Property-based fuzzing of the whole HTTP contract with schemathesis: every operation in
/openapi.json, generated valid and invalid requests, asserting no 5xx, only documented statuses,
and responses that match their schemas.

In process, without Ray: the real FastAPI app (routers, validation, error handlers, body limit,
the job API over a real SQLite store) over fake model deployments that answer at once, so valid
fuzzed requests stay cheap on 2 cores. `make fuzz` runs the same checks for longer over HTTP
against the dev profile's real deployments.
"""

import os

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import negative_data_rejection, positive_data_acceptance

from deployments.runtime.types import VideoOutput
from serve_app.api.app import build_api
from serve_app.config import AuthConfig
from serve_app.jobs import http as jobs_http
from serve_app.jobs.dispatch import JobDispatcher
from serve_app.jobs.sqlite_store import SqliteJobStore
from serve_app.security.guard import Auth
from serve_app.services.health import Readiness
from tests.fakes import FakeEnhancer, FakeGenerator, FakeScorer, fake_services
from tests.helpers import ActorLoop, app_settings, model_entry

EXAMPLES = int(os.environ.get("GENSERVE_FUZZ_EXAMPLES", "25"))


class FakeSvd:
    """Answers `animate` at once with a few bytes of the asked-for format (the encoding is not under test)."""

    def animate(self, params, image):
        content_type = {"mp4": "video/mp4", "gif": "image/gif", "webp": "image/webp"}[params.output_format]
        return VideoOutput(data=b"fake video", content_type=content_type, num_frames=params.num_frames,
                           fps=params.fps, width=params.width, height=params.height, seed=params.seed,
                           generate_seconds=0.0, encode_seconds=0.0, device="cpu", source_frames=params.num_frames,
                           source_fps=params.fps)


def _with_info(fake):
    """A fake deployment that answers `info` (GET /v1/models, /healthz) as a replica would."""
    fake.info = lambda: {"source": "fake", "device": "cpu"}
    return fake


class _OnThisMachine:
    """The app as called from loopback (Starlette's TestClient names its client "testclient")."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            scope["client"] = ("127.0.0.1", 50000)
        await self.app(scope, receive, send)


@pytest.fixture(scope="module")
def fuzzed_api(tmp_path_factory):
    # A tight budget (256x256, 4 steps, 2 images, 1 round), so valid fuzzed requests stay cheap.
    settings = app_settings(
        model_entry(max_pixel_steps=256 * 256 * 4 * 2), request_timeout_s=3.0, max_input_pixels=512 * 512,
        video_models=[{"id": "svd", "family": "svd", "source": "tiny", "default_width": 256, "default_height": 256}])
    services = fake_services(settings, enhancer=_with_info(FakeEnhancer()), generator=_with_info(FakeGenerator()),
                             scorer=_with_info(FakeScorer()), video_generators={"svd": _with_info(FakeSvd())})
    images, videos = services.images, services.videos
    store = SqliteJobStore(tmp_path_factory.mktemp("fuzz-jobs"))
    # The job runner runs, on its own loop as its Serve replica would (TestClient starts a loop per
    # request), so `response_format: url` and job waits see fuzzed jobs finish on the fake models.
    runner = ActorLoop(JobDispatcher(store, images, videos, {"image": 1, "video": 1}, retry_limit=1))
    runner.call(runner.target.start)
    services.jobs = jobs_http.JobsApi(runner.handle(), images, videos, 1)
    services.readiness = Readiness(lambda: {"Ingress": {"status": "HEALTHY", "running": 1}})
    app = build_api()
    app.state.services = services
    # No keys, called from this machine: the fuzzer probes the API, not the key check
    # (tests/unit/test_security*.py, test_route_walk.py), as the local owner, who has every scope (admin
    # included). So the document it reads declares no security: schemathesis would otherwise expect
    # requests without the declared bearer key to be refused.
    for item in app.openapi()["paths"].values():
        for operation in item.values():
            operation.pop("security", None)
    app.state.auth = Auth.from_config(AuthConfig(), "memory://", metrics=False)
    yield schemathesis.openapi.from_asgi("/openapi.json", _OnThisMachine(app))
    runner.call(runner.target.stop)
    runner.close()
    store.close()


# Listed from the app's own OpenAPI document at collection time; pytest 9 broke schemathesis's
# lazy pytest fixture (it reads `node._nodeid`), so each operation is driven through Hypothesis here.
OPERATIONS = [(method.upper(), path) for path, methods in build_api().openapi()["paths"].items() for method in methods]
# Loading a schema once here, at collection, imports schemathesis's lazily loaded modules while no
# other thread runs: pytest rewrites them (schemathesis is a pytest plugin), and CPython 3.11's AST
# recursion counter is shared between threads ("AST constructor recursion depth mismatch").
schemathesis.openapi.from_dict(build_api().openapi())
# The fixture's path too (an ASGI schema, loaded through Starlette's TestClient in a portal thread).
schemathesis.openapi.from_asgi("/openapi.json", build_api())


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda mode: mode.value)
@pytest.mark.parametrize("method, path", OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_every_operation_answers_only_what_it_documents(fuzzed_api, method, path, mode):
    operation = fuzzed_api[path][method]

    @given(operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def check(case):
        # Model-dependent limits (FLUX: 1-4 steps) live in the config, not the static schema, so a
        # schema-valid body can rightly get 422: the check that all of them succeed does not apply.
        # A multipart form carries text only: a "number" the fuzzer puts in a string field (a
        # negative case for JSON) arrives as the text "5", a valid prompt. So on form bodies the
        # check that negative data is rejected cannot tell type mutations from others; every other
        # check (no 5xx, documented statuses, response schemas) still runs on them.
        excluded = [positive_data_acceptance] + ([negative_data_rejection] if _is_form(operation) else [])
        case.call_and_validate(excluded_checks=excluded)

    if mode is GenerationMode.NEGATIVE and not _has_inputs(operation):
        pytest.skip("nothing to make invalid: the operation takes no parameters or body")
    try:
        check()
    except Unsatisfiable:
        if mode is GenerationMode.POSITIVE:
            raise
        pytest.skip("no invalid input exists: its only inputs are unconstrained path strings")


def _is_form(operation) -> bool:
    content = (operation.definition.raw.get("requestBody") or {}).get("content", {})
    return bool(content) and all(kind.startswith(("multipart/", "application/x-www-form-urlencoded")) for kind in content)


def _has_inputs(operation) -> bool:
    return bool(operation.definition.raw.get("parameters") or operation.definition.raw.get("requestBody"))



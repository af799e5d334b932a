"""GET /healthz through the real app (`build_api`) and the Guard, over fake deployments: it needs a
key, asks each deployment for its info at most once per few seconds however often it is called,
and shows host details (devices, local paths, the LLM backend, loaded LoRAs, the runner's host)
to an admin key only. /livez and /readyz stay public, for probes."""

from __future__ import annotations

from types import SimpleNamespace

from starlette.testclient import TestClient

from serve_app.api.app import build_api
from serve_app.security.guard import Auth
from serve_app.services.health import LOCAL_SOURCE, Readiness
from serve_app.services.local import LocalHandle
from tests.fakes import FakeEnhancer, FakeGenerator, FakeScorer, fake_services
from tests.keys import bearer, write_keys

REMOTE = ("203.0.113.7", 40000)
RUNNER_OWNER = "gpu-node-3.internal:4242:0a1b2c3d"


class Counted:
    """A fake deployment whose `info` is what a real replica would show, counting the calls."""

    def __init__(self, fake, info: dict):
        self.fake, self.info_answer, self.calls = fake, info, 0

    def __getattr__(self, name):
        return getattr(self.fake, name)

    def info(self) -> dict:
        self.calls += 1
        return self.info_answer


def _app(tmp_path):
    keys = write_keys(tmp_path / "keys.yaml", {"reader": ["read"], "admin": ["admin"]})
    generator = Counted(FakeGenerator(), {"id": "m", "source": "/srv/models/secret-finetune", "device": "cuda:1",
                                          "loras_loaded": ["alice-private-style"],
                                          "controlnets": {"canny": "./weights/canny"}, "family": "sdxl"})
    enhancer = Counted(FakeEnhancer(), {"mode": "llm", "llm": {"backend": "vllm", "source": "~/llm"}})
    scorer = Counted(FakeScorer(), {"source": "openai/clip-vit-large-patch14", "device": "cpu",
                                    "laion_head": "/opt/heads/laion.pth"})
    services = fake_services(enhancer=enhancer, generator=generator, scorer=scorer)
    runner = Counted(object(), {"store": "RedisJobStore", "owner": RUNNER_OWNER, "slots": {"image": 1}})
    services.jobs = SimpleNamespace(runner=LocalHandle(runner))  # /healthz asks the JobRunner's handle
    services.readiness = Readiness(lambda: {"Ingress": {"status": "HEALTHY", "running": 1}})
    app = build_api()
    app.state.services = services
    app.state.auth = Auth(str(tmp_path / "keys.yaml"), metrics=False)
    return TestClient(app, client=REMOTE, raise_server_exceptions=False), keys, (generator, enhancer, scorer, runner)


def test_healthz_needs_a_key_while_livez_and_readyz_stay_public(tmp_path):
    client, keys, _ = _app(tmp_path)
    assert client.get("/healthz").status_code == 401
    assert client.get("/livez").status_code == 200
    assert client.get("/readyz").status_code == 200
    assert client.get("/healthz", headers=bearer(keys["reader"])).status_code == 200


def test_repeated_healthz_calls_ask_each_deployment_once_per_cache_period(tmp_path):
    client, keys, fakes = _app(tmp_path)
    for _ in range(5):
        assert client.get("/healthz", headers=bearer(keys["reader"])).status_code == 200
    assert [fake.calls for fake in fakes] == [1, 1, 1, 1]
    client.app.state.services.diagnostics.cache_s = 0.0  # past the cache period: asked again
    client.get("/healthz", headers=bearer(keys["admin"]))
    assert [fake.calls for fake in fakes] == [2, 2, 2, 2]


def test_a_non_admin_key_sees_no_paths_or_host_details_and_an_admin_key_sees_them(tmp_path):
    client, keys, _ = _app(tmp_path)
    shown = client.get("/healthz", headers=bearer(keys["reader"])).text
    for secret in ("/srv/models", "cuda:1", "alice-private-style", "./weights", "vllm", "~/llm", "/opt/heads",
                   "gpu-node-3", "4242"):
        assert secret not in shown, secret
    body = client.get("/healthz", headers=bearer(keys["reader"])).json()["deployments"]
    generator = next(entry for name, entry in body.items() if name.startswith("generator:"))
    assert generator["source"] == LOCAL_SOURCE and generator["family"] == "sdxl"
    assert body["scorer"]["source"] == "openai/clip-vit-large-patch14", "hub ids are not host details"
    assert body["jobs"] == {"ok": True, "store": "RedisJobStore", "slots": {"image": 1}}
    full = client.get("/healthz", headers=bearer(keys["admin"])).text
    for detail in ("/srv/models/secret-finetune", "cuda:1", "alice-private-style", "vllm", RUNNER_OWNER):
        assert detail in full, detail

"""The real app (`build_api`) with API keys, over fake deployments and a job store holding one
finished job with a file: what the route walk and the header tests send requests to. No Ray: the
jobs API talks to a JobDispatcher (not started, so submitted jobs stay queued) in this process."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from starlette.testclient import TestClient

from serve_app.api.app import build_api
from serve_app.jobs.dispatch import JobDispatcher
from serve_app.jobs.http import JobsApi
from serve_app.jobs.results import image_result
from serve_app.jobs.sqlite_store import SqliteJobStore
from serve_app.protocol.schemas import ImageRequest
from serve_app.security.guard import Auth
from serve_app.security.keys import KeyRing
from serve_app.services.health import Readiness
from serve_app.services.local import LocalHandle
from tests.fakes import fake_services
from tests.keys import write_keys

REMOTE = ("203.0.113.7", 40000)
# The keys every test here may use: one per scope and gen (generate and read), and `other`, a
# second owner with gen's scopes.
SCOPES = {"gen": ["generate", "read"], "reader": ["read"], "writer": ["generate"], "admin": ["admin"],
          "other": ["generate", "read"]}
FILE = "image-0.png"  # the job's first image (jobs/results.py names it)


@dataclass
class KeyedApp:
    client: TestClient
    keys: dict[str, str]  # name: key
    job_id: str  # gen's finished job, with the file FILE
    store: SqliteJobStore
    app: object = None

    def close(self) -> None:
        self.client.close()
        self.store.close()


def keyed_app(tmp_path, docs: bool = True) -> KeyedApp:
    keys = write_keys(tmp_path / "keys.yaml", SCOPES)
    owner = KeyRing(tmp_path / "keys.yaml").authenticate(keys["gen"]).id
    services = fake_services()
    store = SqliteJobStore(tmp_path / "jobs", ttl_s=600)
    job = store.create("image", {"prompt": "a fox"}, owner=owner)[0]
    store.claim(["image"])
    # The result and file the runner would store, from the fake models.
    response = asyncio.run(services.generate_images(ImageRequest(prompt="a fox", width=256, height=256)))
    store.save_result(job.id, 1, *image_result(job.id, response))
    services.jobs = JobsApi(LocalHandle(JobDispatcher(store, services.images, None, {"image": 1}, 1)),
                            services.images, None, 1)
    services.readiness = Readiness(lambda: {"Ingress": {"status": "HEALTHY", "running": 1}})
    app = build_api(docs=docs)
    app.state.services = services
    app.state.auth = Auth(str(tmp_path / "keys.yaml"), metrics=False)
    client = TestClient(app, client=REMOTE, raise_server_exceptions=False)
    return KeyedApp(client, keys, job.id, store, app)

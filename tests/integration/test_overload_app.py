"""On real Serve (the shared dev app): health probes, strict input, documented statuses, and
bounded queues that answer 503 with Retry-After at once."""

from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.helpers import wait_until


@pytest.fixture
def client(dev_app):
    return dev_app["client"]


def test_liveness_and_readiness_name_every_deployment(client):
    assert client.get("/livez").json() == {"status": "ok"}
    ready = wait_until(lambda: (r := client.get("/readyz")).status_code == 200 and r.json(), timeout_s=60,
                       what="ready")
    assert {"Ingress", "PromptEnhancer", "ClipScorer", "FluxSchnellGenerator", "JobRunner"} <= set(ready["deployments"])
    assert all(entry["ready"] and entry["running"] >= 1 for entry in ready["deployments"].values())
    assert client.get("/healthz").status_code == 200


def test_hostile_bodies_get_4xx_never_5xx(client):
    assert client.post("/v1/images", json={"prompt": "a cat", "revise_prompt": 0}).status_code == 422
    assert client.post("/v1/jobs", json={"kind": "image", "request": {"prompt": "x"}, "ü": 1}).status_code == 422
    assert client.post("/v1/prompts/enhance", json={"prompt": "x", "\u00fc\u00e9": 1}).status_code == 422
    assert client.get("/v1/jobs", params={"cursor": "\u00b2"}).status_code == 422
    assert client.get("/v1/jobs", params={"cursor": "9" * 20}).status_code == 422


def test_a_full_model_queue_answers_503_with_retry_after(client):
    # flux-schnell in dev: 4 at once, 8 queued per caller; 40 at once overflow it.
    body = {"prompt": "a lighthouse", "enhance": False, "num_images": 4, "num_inference_steps": 4}
    with ThreadPoolExecutor(max_workers=40) as pool:
        responses = list(pool.map(lambda _: client.post("/v1/images", json=body, timeout=300), range(40)))
    statuses = [response.status_code for response in responses]
    assert set(statuses) <= {200, 503}, statuses
    rejected = [response for response in responses if response.status_code == 503]
    assert rejected and statuses.count(200) >= 4
    assert all(r.headers["Retry-After"] == "5" and r.json()["reason"] == "overloaded" for r in rejected)

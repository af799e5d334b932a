"""The quality gate on real Serve (the shared dev app): best-of-N, percentile thresholds from the dev
profile's calibration, and the figures in GET /v1/admin/quality and /v1/models, shared through the
job store by the Ingress and the JobRunner."""

import pytest

from tests.helpers import wait_until
from tests.integration.jobs import submit, wait_finished

pytestmark = pytest.mark.integration


@pytest.fixture
def client(dev_app):
    return dev_app["client"]


def _detail(response) -> dict:
    assert response.status_code == 422, response.text
    return response.json()["detail"][0]


def test_best_of_n_returns_the_best_image_and_lists_every_candidate(client):
    response = client.post("/v1/images", json={"prompt": "a lighthouse", "seed": 5, "candidates": 3, "enhance": False})
    assert response.status_code == 200, response.text
    body = response.json()
    candidates = body["candidates"]
    assert [c["seed"] for c in candidates] == [5, 6, 7] and {c["attempt"] for c in candidates} == {1}
    [chosen] = [c for c in candidates if c["chosen"]]
    assert chosen["scores"]["aesthetic"] == max(c["scores"]["aesthetic"] for c in candidates)
    assert [image["seed"] for image in body["images"]] == [chosen["seed"]]


def test_candidates_fewer_than_num_images_or_over_the_limit_are_refused(client):
    detail = _detail(client.post("/v1/images", json={"prompt": "a fox", "num_images": 2, "candidates": 1}))
    assert detail["loc"] == ["body", "candidates"] and "at least num_images" in detail["msg"]
    detail = _detail(client.post("/v1/images", json={"prompt": "a fox", "candidates": 9}))
    assert detail["loc"] == ["body", "candidates"] and "policy.max_candidates" in detail["msg"]


def test_a_percentile_regenerates_from_the_shipped_calibration(client):
    response = client.post("/v1/images", json={"prompt": "a fox", "quality_percentile": 70, "max_attempts": 3,
                                               "seed": 11, "enhance": False})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["quality_percentile"] == 70 and body["quality_metric"] == "aesthetic"
    assert 0.8 < body["quality_threshold"] < 1  # flux-schnell's tiny aesthetic scores sit near 0.9
    attempts = body["attempts"]
    # Rounds go on while every image fails, and stop at the first that passes.
    assert all(not a["passed"] for a in attempts[:-1])
    assert attempts[-1]["passed"] or len(attempts) == 3
    assert body["passed"] == attempts[-1]["passed"]


def test_a_model_without_a_calibration_is_refused_saying_so(client):
    detail = _detail(client.post("/v1/images", json={"prompt": "a fox", "model": "toy", "quality_percentile": 50}))
    assert detail["loc"] == ["body", "quality_percentile"] and "no calibration" in detail["msg"]
    job = client.post("/v1/jobs", json={"kind": "image", "request": {"prompt": "a fox", "model": "toy",
                                                                      "quality_percentile": 50}})
    assert job.status_code == 422 and job.json()["detail"][0]["loc"] == ["body", "request", "quality_percentile"]


def test_jobs_take_candidates_and_percentiles_too(client):
    job = submit(client, "image", {"prompt": "a fox", "candidates": 2, "quality_percentile": 10, "enhance": False})
    status = wait_finished(client, job["id"])
    assert status["state"] == "succeeded", status
    result = client.get(f"/v1/jobs/{job['id']}/result").json()
    assert len(result["candidates"]) >= 2 and sum(c["chosen"] for c in result["candidates"]) == 1
    assert result["quality_percentile"] == 10


def test_the_openai_route_takes_candidates(client):
    response = client.post("/v1/images/generations", json={"prompt": "a fox", "candidates": 2})
    assert response.status_code == 200, response.text
    assert len(response.json()["data"]) == 1


def _flux_aesthetic(client, path: str) -> dict:
    body = client.get(path).json()
    if path == "/v1/models":
        return next(model for model in body["models"] if model["id"] == "flux-schnell")["quality"]["aesthetic"]
    return body["models"]["flux-schnell"]["aesthetic"]


def test_the_admin_summary_and_the_catalogue_show_the_gate_figures(client):
    before = _flux_aesthetic(client, "/v1/admin/quality")["first_attempt_images"]
    assert client.post("/v1/images", json={"prompt": "a fox", "enhance": False}).status_code == 200
    # Tallied off the request's path, into the job store, read through a short cache.
    figures = wait_until(lambda: (lambda f: f if f["first_attempt_images"] > before else None)(
        _flux_aesthetic(client, "/v1/admin/quality")), timeout_s=30, what="the request tallied")
    assert figures["calibration_images"] == 64  # configs/calibration/dev.json
    assert figures["scored_images"] >= 1 and 0 <= figures["first_attempt_pass_rate"] <= 1
    assert figures["attempts_per_accepted_image"] >= 1 and figures["device_seconds_per_accepted_image"] > 0
    assert set(figures["percentiles"]) == {"10", "50", "70", "90"}
    catalogue = wait_until(lambda: (lambda f: f if f["first_attempt_images"] >= figures["first_attempt_images"]
                                    else None)(_flux_aesthetic(client, "/v1/models")), timeout_s=30,
                           what="the catalogue's figures")
    assert catalogue["calibration_images"] == 64

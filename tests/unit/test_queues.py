"""Every queue is bounded in every profile, and a rejection carries Retry-After (Serve's
BackpressureConfig)."""

from pathlib import Path

import pytest
from ray.serve.config import BackpressureConfig

from serve_app.config import DEFAULT_RETRY_AFTER_S, DeploymentOptions, app_args_from_config

ROOT = Path(__file__).parents[2]
PROFILES = sorted((ROOT / "configs").glob("*.yaml"))
EVERY_DEPLOYMENT = {"Ingress", "PromptEnhancer", "ClipScorer", "JobRunner"}


def _profiles():
    return [path for path in PROFILES if "applications:" in path.read_text()]


@pytest.mark.parametrize("path", _profiles(), ids=lambda path: path.name)
def test_every_deployment_of_every_profile_has_a_bounded_queue_with_retry_after(path):
    args = app_args_from_config(path)
    options = args.all_deployment_options()
    expected = EVERY_DEPLOYMENT | {entry.deployment_name for entry in [*args.served_image_models,
                                                                       *args.served_video_models]}
    assert expected <= set(options), f"{path.name}: no options for {sorted(expected - set(options))}"
    for name in expected:
        queued = options[name].max_queued_requests
        assert queued is not None and queued >= 1, f"{path.name}: {name} has an unbounded queue"
        serve = options[name].serve_options()
        assert serve["max_queued_requests"] == queued
        assert serve["backpressure_config"] == BackpressureConfig(status_code=503, retry_after_s=DEFAULT_RETRY_AFTER_S)


def test_retry_after_is_configurable_and_unbounded_queues_get_no_backpressure_config():
    assert DeploymentOptions(max_queued_requests=4, retry_after_s=12).serve_options()["backpressure_config"] == (
        BackpressureConfig(status_code=503, retry_after_s=12))
    assert "backpressure_config" not in DeploymentOptions(max_queued_requests=-1).serve_options()
    assert "backpressure_config" not in DeploymentOptions().serve_options()


@pytest.mark.parametrize("path", _profiles(), ids=lambda path: path.name)
def test_every_deployment_of_every_profile_has_a_sized_shutdown_grace(path):
    """Shutdown loses nothing: the ingress outlasts the request deadline (a sync request in flight
    is answered, or 504s, before its replica goes), the job runner outlasts an event stream's long
    poll with time to put its running jobs back, and every model sets its own."""
    from serve_app.jobs.http import KEEPALIVE_S

    args = app_args_from_config(path)
    options = args.all_deployment_options()
    names = EVERY_DEPLOYMENT | {entry.deployment_name for entry in [*args.served_image_models, *args.served_video_models]}
    grace = {name: options[name].graceful_shutdown_timeout_s for name in names}
    assert None not in grace.values(), f"{path.name}: unsized: {sorted(n for n, g in grace.items() if g is None)}"
    assert grace["Ingress"] > args.request_timeout_s
    assert grace["JobRunner"] >= KEEPALIVE_S + 30
    assert all(options[name].serve_options()["graceful_shutdown_timeout_s"] == value for name, value in grace.items())

"""`genserve bench --replicas`: its pure parts, in process (the runs themselves are a benchmark)."""

import pytest

from serve_app.bench.concurrency import Level
from serve_app.bench.replicas import (
    ReplicaRun,
    format_replica_table,
    format_role_table,
    ingress_replicas_of,
    logical_cpus,
    roles_per_image,
    scaling_line,
    with_replicas,
)
from serve_app.config import app_args_from_config


def _run(replicas: int, images_per_s: float, roles: dict | None = None) -> ReplicaRun:
    # 10 s of wall time; a tenth of the latencies 9 s (the p95), the rest 4.5 s (the p50).
    count = round(images_per_s * 10)
    seconds = [4.5] * (count - count // 10) + [9.0] * (count // 10)
    return ReplicaRun(replicas, 1, Level("flux-dev", 3 * replicas, seconds, 0, 10.0), roles or {})


def test_the_chosen_model_gets_n_replicas_of_a_whole_gpu_each_and_nothing_else_changes():
    config = app_args_from_config("configs/sim-h200.yaml")
    scaled = with_replicas(config, "flux-dev", 16)
    options = scaled.image_model("flux-dev").deployment
    assert options.num_replicas == 16 and options.num_gpus == 1 and options.autoscaling is None
    assert options.max_ongoing_requests == config.image_model("flux-dev").deployment.max_ongoing_requests
    assert scaled.image_model("flux-schnell").deployment == config.image_model("flux-schnell").deployment
    assert scaled.deployments == config.deployments and ingress_replicas_of(scaled) == 1
    # Every reservation fits the declared CPUs: 16 x 0.25 for the model besides the others'.
    assert logical_cpus(scaled) >= 16 * 0.25 + 0.5 + 0.1 + 0.1 + 0.25 + 0.1


def test_the_ingress_override_fixes_its_replicas_and_drops_its_autoscaling():
    config = app_args_from_config("configs/multi-gpu.yaml")
    assert ingress_replicas_of(config) == config.deployments["Ingress"].autoscaling.min_replicas
    scaled = with_replicas(config, "flux-schnell", 4, ingress_replicas=3, max_ongoing_requests=6)
    ingress = scaled.deployments["Ingress"]
    assert ingress.num_replicas == 3 and ingress.autoscaling is None and ingress_replicas_of(scaled) == 3
    assert ingress.max_ongoing_requests == config.deployments["Ingress"].max_ongoing_requests
    assert scaled.image_model("flux-schnell").deployment.max_ongoing_requests == 6


def test_an_unknown_model_names_the_flag_and_the_served_ones():
    config = app_args_from_config("configs/sim-h200.yaml")
    with pytest.raises(ValueError, match="--model: 'sdxl' .* flux-schnell, flux-dev"):
        with_replicas(config, "sdxl", 2)


def test_the_table_gives_each_n_its_ratio_to_the_first_and_the_line_the_largest_n():
    runs = [_run(1, 2.0), _run(2, 4.0), _run(16, 29.0)]
    rows = format_replica_table(runs).splitlines()
    # N=16: 1 ingress, 48 clients, 290 ok, 0 failed, 29 img/s, 14.5x the first, p50 4.5 s, p95 9 s, no readings.
    assert rows[3].split() == ["16", "1", "48", "290", "0", "29.000", "14.50", "4.50", "9.00", "-", "-"]
    assert scaling_line(runs) == "scaling: 16 replicas 14.5x one"
    assert scaling_line([_run(2, 4.0), _run(8, 14.0)]) == "scaling: 8 replicas 3.5x 2 replicas"


def test_cpu_per_image_by_role_takes_each_roles_idle_rate_off():
    # 10 s run, 20 images: the proxy spent 2 s of which 0.05 cores x 10 s idle; the raylet only its idle rate.
    per_image = roles_per_image({"ProxyActor": 2.0, "raylet": 0.5, "Ingress": 3.0}, {"ProxyActor": 0.05, "raylet": 0.05},
                                wall_s=10.0, images=20)
    assert per_image == pytest.approx({"Ingress": 150.0, "ProxyActor": 75.0, "raylet": 0.0})
    assert list(per_image) == ["Ingress", "ProxyActor", "raylet"]
    table = format_role_table([_run(1, 2.0, {"Ingress": 40.0, "ProxyActor": 20.0, "gcs_server": 1.0}),
                               _run(2, 4.0, per_image)], top=2).splitlines()
    assert table[1].split() == ["Ingress", "40.0", "150.0"] and table[3].split() == ["others", "1.0", "0.0"]


def test_redis_commands_per_job_take_the_idle_polls_off():
    from serve_app.bench.costs import ProxyCost, RedisCost, command_deltas, per_job

    before = {"cmdstat_evalsha": {"calls": 10}, "cmdstat_get": {"calls": 5}}
    after = {"cmdstat_evalsha": {"calls": 70}, "cmdstat_get": {"calls": 25}, "cmdstat_hset": {"calls": 2}}
    run = command_deltas(before, after)
    assert run == {"evalsha": 60, "get": 20, "hset": 2}
    # 10 jobs over twice the idle reading's wall time, which saw 5 claim polls (evalsha): 10 of the 60 are idle.
    commands = per_job(run, {"evalsha": 5}, idle_scale=2.0, jobs=10)
    assert commands == {"evalsha": 5.0, "get": 2.0, "hset": 0.2} and list(commands) == ["evalsha", "get", "hset"]
    assert RedisCost(10, commands).commands_per_job == pytest.approx(7.2)
    assert ProxyCost(1000, 2.0, {"ProxyActor": 0.8, "Ingress": 1.0}).requests_per_proxy_core == pytest.approx(1250)
    assert ProxyCost(1000, 2.0, {}).requests_per_s == 500 and ProxyCost(1000, 2.0, {}).requests_per_proxy_core is None

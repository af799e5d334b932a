"""Device busy time: what a replica records around its model calls, and the benchmark's arithmetic on it."""

import asyncio
import json

import httpx
import numpy as np
import pytest

from deployments.runtime.metrics import ModelMetrics
from serve_app.bench.concurrency import Level, level_json, run_level
from serve_app.bench.device import DeviceUse, cpu_delta, device_use, overhead_ms, utilization
from tests.helpers import wait_until

JSON_KEYS = {"clients", "throughput", "p50_ms", "p95_ms", "utilization", "overhead_ms", "cpu_ms_per_image",
             "rejections", "rejection_p50_ms"}


def test_every_model_call_counts_as_busy_a_failed_one_too():
    metrics = ModelMetrics("m", "cpu", enabled=False)
    with metrics.track():
        sum(range(200_000))  # some CPU inside the call
    with pytest.raises(ValueError), metrics.track():
        raise ValueError("the pipeline failed")
    sample = metrics.device_time()
    assert sample["calls"] == 2 and sample["replica"] == "local" and sample["model"] == "m"
    assert sample["busy_s"] > 0 and sample["cpu_s"] >= 0


def test_a_meter_counts_overlapping_passes_once_and_nothing_between_them(monkeypatch):
    from deployments.runtime import metrics as module

    now = [0.0]
    monkeypatch.setattr(module.time, "perf_counter", lambda: now[0])
    meter = module.BusyMeter()
    with meter.running():  # 0-3: a text pass, and an image pass from 1 to 5 beside it
        now[0] = 1.0
        with meter.running():
            now[0] = 3.0
        now[0] = 5.0
    now[0] = 9.0  # 5-9: CPU work, no pass
    with meter.running():
        now[0] = 10.0
    assert meter.take()[0] == pytest.approx(6.0) and meter.take()[0] == 0.0


def test_the_scorers_device_time_is_its_forward_passes_not_the_resize_before_them():
    import torch

    from deployments.config import ScorerConfig
    from deployments.scoring.clip_scorer import ClipScorer

    scorer = ClipScorer.func_or_class(ScorerConfig(source="openai/clip-vit-large-patch14",
                                                   device={"device": "sim:h200"}), metrics=False)
    tower = scorer._scorers[0].tower
    processor, forward, seen = tower.image_processor, tower.model.get_image_features, []

    class RecordingProcessor:  # the CPU pre-processing: the meter must be closed while it runs
        def __getattr__(self, name):
            return getattr(processor, name)

        def __call__(self, **kwargs):
            seen.append(("processor", tower.meter._open))
            return processor(**kwargs)

    def recording_forward(**kwargs):  # the image pass: the meter must be open while it runs
        seen.append(("image pass", tower.meter._open))
        return forward(**kwargs)

    tower.image_processor, tower.model.get_image_features = RecordingProcessor(), recording_forward
    with torch.inference_mode():  # the image tower alone: no prompt pass beside it
        tower.images([np.zeros((256, 256, 3), dtype=np.uint8)])
    assert seen == [("processor", 0), ("image pass", 1)]
    assert tower.meter is scorer._meter and scorer._meter.take()[0] > 0  # one meter for the scorer's towers
    # Through the deployment: one call recorded, its device time the passes' (simulated here).
    asyncio.run(scorer.score(np.zeros((1, 256, 256, 3), dtype=np.uint8), "a red cube"))
    used = asyncio.run(scorer.device_time())
    assert used["calls"] == 1 and used["busy_s"] > 0, used


def test_utilization_is_busy_over_wall_per_replica_and_their_mean():
    before = {"a": {"busy_s": 10.0}, "b": {"busy_s": 4.0}}
    after = {"a": {"busy_s": 19.0}, "b": {"busy_s": 9.0}, "c": {"busy_s": 2.0}}  # c started during the level
    mean, each = utilization(before, after, wall_s=10.0)
    assert each == pytest.approx({"a": 0.9, "b": 0.5, "c": 0.2}) and mean == pytest.approx(1.6 / 3)
    assert utilization(before, {}, 10.0) == (None, {}) and utilization(before, after, 0.0) == (None, {})


def test_cpu_outside_the_model_is_the_clusters_cpu_minus_the_model_calls():
    generator = ({"a": {"busy_s": 1.0, "cpu_s": 0.5}}, {"a": {"busy_s": 5.0, "cpu_s": 2.5}})
    scorer = ({"s": {"busy_s": 0.0, "cpu_s": 0.0}}, {"s": {"busy_s": 1.0, "cpu_s": 0.5}})
    # pid 1 grew 3 s, pid 2 is new with 2 s, pid 3 ended during the level (not counted).
    cpu = ({(1, 0.0): 10.0, (3, 0.0): 1.0}, {(1, 0.0): 13.0, (2, 5.0): 2.0})
    # With no traffic the cluster spends 0.0625 cores: 0.5 s of the level's 8.
    use = device_use(generator, scorer, cpu, wall_s=8.0, idle_cores=0.0625)
    assert use.utilization == pytest.approx(0.5) and use.device_s == pytest.approx(5.0)
    assert use.model_cpu_s == pytest.approx(2.5) and use.ray_cpu_s == pytest.approx(5.0)
    assert cpu_delta({}, {}) == 0
    # 10 images: (5 - 2.5 - 0.5) CPU seconds outside the model and the idle cluster, 200 ms each.
    row = level_json(Level("m", 1, seconds=[0.6] * 10, wall_s=8.0, device=use))
    assert row["cpu_ms_per_image"] == pytest.approx(200.0) and row["idle_cpu_cores"] == pytest.approx(0.0625)
    # The enhancer's LLM is on the device too: its calls add to the device time and the model CPU,
    # never to the generator's utilization.
    enhancer = ({"e": {"busy_s": 0.0, "cpu_s": 0.0}}, {"e": {"busy_s": 2.0, "cpu_s": 0.25}})
    with_llm = device_use(generator, scorer, cpu, wall_s=8.0, idle_cores=0.0625, enhancer=enhancer)
    assert with_llm.device_s == pytest.approx(7.0) and with_llm.model_cpu_s == pytest.approx(2.75)
    assert with_llm.utilization == pytest.approx(0.5)


def test_overhead_is_mean_latency_minus_device_time_at_one_client_only():
    assert overhead_ms([0.5, 0.7], device_s=1.0) == pytest.approx(100.0) and overhead_ms([], 1.0) is None
    use = DeviceUse(0.8, {"a": 0.8}, device_s=1.0)
    one = level_json(Level("m", 1, seconds=[0.5, 0.7], wall_s=1.25, device=use))
    eight = level_json(Level("m", 8, seconds=[0.5, 0.7], wall_s=1.25, device=use))
    assert one["overhead_ms"] == pytest.approx(100.0) and eight["overhead_ms"] is None
    assert one["device_ms_per_request"] == pytest.approx(500.0) and one["utilization_per_replica"] == {"a": 0.8}


def test_a_level_is_one_json_object_with_the_operators_fields():
    level = Level("batching off", 8, seconds=[0.1, 0.2, 0.3], wall_s=0.5, rejections=2,
                  rejection_seconds=[0.01, 0.03])
    row = json.loads(json.dumps(level_json(level)))
    assert JSON_KEYS <= row.keys()
    assert row["clients"] == 8 and row["throughput"] == pytest.approx(6.0) and row["p50_ms"] == pytest.approx(200.0)
    assert row["rejections"] == 2 and row["rejection_p50_ms"] in (10.0, 30.0)
    assert row["utilization"] is None and row["cpu_ms_per_image"] is None  # not read: null, never a made-up 0


def test_a_storm_sends_a_rejected_request_again_at_once_and_times_each_rejection():
    from tests.unit.test_client import IMAGE

    sent = []

    def server(request: httpx.Request) -> httpx.Response:
        seed = json.loads(request.content)["seed"]
        sent.append(seed)
        if sent.count(seed) <= 3:  # each request is turned away three times, with a long Retry-After
            return httpx.Response(503, headers={"Retry-After": "60"}, json={"detail": "queue full"})
        return httpx.Response(200, json=IMAGE)

    level = asyncio.run(run_level("http://genserve.test", {"prompt": "a fox"}, "m", clients=2, requests=2,
                                  transport=httpx.MockTransport(server), storm=True))
    assert len(level.seconds) == 2 and level.rejections == 6 and len(level.rejection_seconds) == 6
    assert level.storm and level.wall_s < 30  # waiting out one Retry-After alone would take 60 s


def test_a_ray_process_is_named_by_its_title_or_its_program():
    from serve_app.bench.device import cpu_by_role, process_role

    assert process_role(["ray::ServeReplica:genserve:Ingress"]) == "Ingress"
    assert process_role(["ray::ServeReplica:genserve:FluxDevGenerator.handle_request_with_rejection()"]) == \
        "FluxDevGenerator"
    assert process_role(["ray::ProxyActor", "", ""]) == "ProxyActor"
    assert process_role(["ray::ServeController.listen_for_change()"]) == "ServeController"
    assert process_role(["/venv/lib/python3.11/site-packages/ray/core/src/ray/gcs/gcs_server", "--port=0"]) == \
        "gcs_server"
    assert process_role(["/venv/bin/python", "-u", "/venv/ray/_private/log_monitor.py", "--x"]) == "log_monitor"
    assert process_role([]) == "other"
    # Two replicas of a role add up; a process new since the first reading counts from 0.
    before = {(1, 0.0): ("Ingress", 1.0), (2, 0.0): ("raylet", 5.0)}
    after = {(1, 0.0): ("Ingress", 1.5), (2, 0.0): ("raylet", 5.25), (3, 1.0): ("Ingress", 0.5)}
    assert cpu_by_role(before, after) == {"Ingress": 1.0, "raylet": 0.25}


def test_a_metered_call_that_adds_nothing_is_counted_without_an_increment_of_zero():
    """Two score calls at once share the replica's meter: the second to end may take nothing, and
    Ray's counters refuse inc(0) (it failed the call with a 500)."""
    from deployments.runtime.metrics import BusyMeter

    metrics = ModelMetrics("clip", "cpu", enabled=True)
    with metrics.track(BusyMeter()):
        pass  # no forward pass ran
    assert metrics.device_time()["calls"] == 1 and metrics.device_time()["busy_s"] == 0


def test_a_clock_step_between_two_readings_leaves_each_process_the_same(monkeypatch):
    """psutil's create_time follows the wall clock (boot time + time since boot): NTP stepping a
    fresh machine's clock between a level's two readings made every process look new, and the level
    counted their whole CPU. The readings key a process by its start since boot."""
    import subprocess
    import sys

    from psutil import _psplatform

    from serve_app.bench.device import cluster_cpu_seconds

    # A child that waits until its stdin closes.
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        def mine(readings: dict) -> list:
            return [key for key in readings if key[0] == child.pid]

        before = wait_until(lambda: mine(cluster_cpu_seconds()) and cluster_cpu_seconds(), timeout_s=10,
                            what="the child process listed")
        booted = _psplatform.boot_time()
        monkeypatch.setattr(_psplatform, "boot_time", lambda: booted + 5.0)  # the clock stepped 5 s forward
        after = cluster_cpu_seconds()
        assert mine(after) == mine(before) != []
    finally:
        child.stdin.close()
        child.wait(timeout=30)

"""`genserve bench-autoscale`'s pure parts, in process: the phase schedule, the sliding window, the
summary of the samples, the plot and the CSV (the run itself is a benchmark, not a test)."""

import csv

import pytest

from serve_app.bench.autoscale import (
    Done,
    Phase,
    Sample,
    autoscaled,
    clients_at,
    format_summary,
    parse_phases,
    plot,
    summarize,
    window_stats,
    write_requests,
    write_samples,
)
from serve_app.config import AutoscalingOptions, app_args_from_config

OPTIONS = AutoscalingOptions(min_replicas=1, max_replicas=8, target_ongoing_requests=1, upscale_delay_s=3,
                             downscale_delay_s=20)


def test_phases_parse_as_clients_and_seconds_and_a_bad_one_is_named():
    assert parse_phases(["1:30", "32:150", "1:150"]) == [Phase(1, 30), Phase(32, 150), Phase(1, 150)]
    with pytest.raises(ValueError, match="'32-150' is not CLIENTS:SECONDS"):
        parse_phases(["32-150"])
    with pytest.raises(ValueError, match="seconds > 0"):
        parse_phases(["4:0"])


def test_the_schedule_steps_at_each_phase_and_ends_with_no_clients():
    phases = parse_phases(["1:30", "32:150", "1:150"])
    assert [clients_at(phases, t) for t in (0, 29.9, 30, 179.9, 180, 329.9, 330)] == [1, 1, 32, 32, 1, 1, 0]


def test_the_window_counts_only_successes_that_ended_in_it():
    done = [Done(1, 4.0, True), Done(8, 5.0, True), Done(9, 9.0, False), Done(12, 6.0, True), Done(20, 7.0, True)]
    throughput, p95 = window_stats(done, now=15, window_s=10)
    assert throughput == pytest.approx(2 / 10) and p95 == 6.0
    assert window_stats(done, now=2, window_s=10) == (pytest.approx(1 / 2), 4.0), "the window is shorter at the start"
    assert window_stats([], now=5, window_s=10) == (0.0, None)


def _run() -> tuple[list[Sample], list[Done]]:
    """1 client to 10 s, 32 to 40 s, 1 after: the pool decides at 13 s, has 8 running at 25 s and is
    back to 1 at 52 s; each started replica spends 4 s STARTING."""
    samples = []
    for t in range(60):
        clients = 1 if t < 10 or t >= 40 else 32
        starting = 7 if 13 <= t < 17 else 0
        running = 1 if t < 17 else 4 if t < 25 else 8 if t < 45 else 3 if t < 52 else 1
        if 17 <= t < 21:
            starting = 4
        samples.append(Sample(t, clients, running, starting, 5 if 45 <= t < 52 else 0, clients, 1.0, 5.0))
    done = [Done(12, 20.0, True), Done(24, 30.0, True), Done(30, 9.0, True), Done(31, 4.0, True), Done(35, 5.0, True),
            Done(36, 1.0, False)]
    return samples, done


def test_the_summary_reads_the_scale_up_the_ramp_the_peak_and_the_scale_down():
    samples, done = _run()
    summary = summarize(samples, done, parse_phases(["1:10", "32:30", "1:20"]), OPTIONS, rejections=3)
    assert (summary.step_up_at, summary.step_down_at) == (10, 40)
    assert (summary.decided_s, summary.scale_up_s, summary.scale_down_s) == (3, 15, 12)
    assert summary.ramp_p95_s == 30.0 and summary.peak_p95_s == 5.0, "the peak's p95: requests sent once full"
    assert summary.peak_throughput == pytest.approx(3 / 15)
    assert (summary.replicas_started, summary.peak_replicas) == (7, 8)
    assert summary.replica_start_s == pytest.approx((7 * 4 + 4 * 4) / 7)
    assert (summary.ok, summary.failed, summary.rejections) == (5, 1, 3)
    text = format_summary(summary)
    assert "8 replicas running after 15.0 s" in text and "back to 1 after 12.0 s" in text


def test_a_pool_that_never_reaches_its_maximum_says_so():
    samples = [Sample(t, 32, 2, 0, 0, 32, 0.5, 9.0) for t in range(20)]
    summary = summarize(samples, [], [Phase(32, 20)], OPTIONS)
    assert summary.scale_up_s is None and summary.step_down_at is None and summary.scale_down_s is None
    assert "running after - (peak 2)" in format_summary(summary)


def test_the_plot_and_the_samples_are_written(tmp_path):
    samples, done = _run()
    plot(samples, str(tmp_path / "autoscaling.png"), "flux-dev (simulated h200)", 8)
    assert (tmp_path / "autoscaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    write_samples(samples, str(tmp_path / "samples.csv"))
    rows = list(csv.DictReader(open(tmp_path / "samples.csv")))
    assert len(rows) == 60 and rows[30]["running"] == "8" and rows[30]["clients"] == "32"
    write_requests(done, str(tmp_path / "requests.csv"))
    assert [row["latency_s"] for row in csv.DictReader(open(tmp_path / "requests.csv"))][:2] == ["20.0", "30.0"]


def test_the_pool_autoscales_one_logical_gpu_a_replica_and_keeps_its_other_settings():
    args = app_args_from_config("configs/sim-h200.yaml")
    deployment = autoscaled(args, "flux-dev", OPTIONS, 0.1).image_model("flux-dev").deployment
    assert deployment.autoscaling == OPTIONS and deployment.num_replicas is None
    assert (deployment.num_gpus, deployment.num_cpus, deployment.max_ongoing_requests) == (1, 0.1, 2)
    assert autoscaled(args, "flux-dev", OPTIONS, 0.1).image_model("flux-schnell") == args.image_model("flux-schnell")


def test_clients_follow_the_schedule_and_each_second_is_sampled():
    """Through genserve's own client against a stub: 1 client, then 3; a 503 is waited out and counted."""
    import asyncio
    import json

    import httpx

    from serve_app.bench.autoscale import drive
    from tests.unit.test_client import IMAGE

    seeds = []

    async def server(request: httpx.Request) -> httpx.Response:
        seeds.append(json.loads(request.content)["seed"])
        await asyncio.sleep(0.02)  # a request takes time, as a real one does: the sampler gets its turns
        if len(seeds) == 3:
            return httpx.Response(503, headers={"Retry-After": "0"}, json={"detail": "queue full"})
        return httpx.Response(200, json=IMAGE)

    samples, done, rejections = asyncio.run(drive("http://genserve.test", {"prompt": "a fox"}, parse_phases(
        ["1:0.4", "3:0.4"]), lambda: (1, 0, 0), interval_s=0.1, window_s=0.3, transport=httpx.MockTransport(server)))
    assert rejections == 1 and all(one.ok for one in done) and len(done) == len(seeds) - 1
    assert [sample.clients for sample in samples][:2] == [1, 1] and samples[-1].clients == 3
    assert max(sample.in_flight for sample in samples if sample.t < 0.35) <= 1
    assert max(sample.in_flight for sample in samples) >= 2 and samples[-1].throughput > 0

"""Metrics checked against a real Prometheus: every dashboard query parses and returns data.

On the shared dev app, whose Ray runs the dashboard (it writes the service-discovery file that
configs/prometheus.yml reads): starts Prometheus on loopback, sends traffic with a rejection, a
regeneration and a video, waits for the scrape, then runs each PromQL expression of
configs/grafana/genserve.json through Prometheus's HTTP API.
"""

import math
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import free_port, wait_until
from tests.integration.apps import ROOT
from tests.metrics_dashboard import dashboard_queries

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("prometheus") is None,
                       reason="the prometheus binary is not installed (.ci/run installs Debian's prometheus)"),
]

# First of the shared dev app's tests: the counts asserted below are this module's traffic alone.
DEV_APP_TURN = "first"
# Queries that may rightly be empty after this traffic, and why.
MAY_BE_EMPTY = {
    "ray_genserve_replica_peak_accelerator_memory_bytes": "recorded on CUDA only; absent on CPU",
    "ray_genserve_request_peak_accelerator_memory_bytes": "recorded on CUDA only; absent on CPU",
    "ray_genserve_model_errors_total": "no model call fails in this traffic",
    "ray_genserve_stage_timeouts_total": "no stage times out in this traffic",
    "ray_genserve_enhancer_fallbacks_total": "the dev profile enhances with templates; created in llm mode only",
}


def _send_traffic(client: httpx.Client) -> None:
    for seed in range(3):
        assert client.post("/v1/images", json={"prompt": "a lighthouse", "seed": seed}).status_code == 200
    regenerated = client.post("/v1/images", json={"prompt": "a fox", "quality_metric": "alignment",
                                                  "quality_threshold": 100, "max_attempts": 2})
    assert regenerated.status_code == 200 and len(regenerated.json()["attempts"]) == 2
    assert client.post("/v1/images", json={"prompt": "a fox", "width": 100}).status_code == 422
    # Gated by percentile, from the dev profile's calibration of sdxl: up to three rounds.
    gated = client.post("/v1/images", json={"prompt": "a fox", "model": "sdxl", "quality_percentile": 70,
                                            "max_attempts": 3})
    assert gated.status_code == 200 and gated.json()["quality_percentile"] == 70
    video = client.post("/v1/videos", json={"prompt": "a boat", "num_frames": 2, "num_inference_steps": 1})
    assert video.status_code == 200


@pytest.fixture(scope="module")
def prometheus(dev_app, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("prometheus")
    config = yaml.safe_load((ROOT / "configs" / "prometheus.yml").read_text())
    sd_file = Path(dev_app["ray_dir"]) / "prom_metrics_service_discovery.json"
    config["scrape_configs"][0]["file_sd_configs"][0]["files"] = [str(sd_file)]  # this test's Ray temp dir
    config["global"]["scrape_interval"] = "1s"
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    wait_until(sd_file.exists, timeout_s=60, what="Ray writing the service-discovery file")
    port = free_port()
    log = open(workdir / "prometheus.log", "wb")
    process = subprocess.Popen(
        ["prometheus", f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"

    def query(expr: str) -> dict:
        return httpx.get(f"{base}/api/v1/query", params={"query": expr}, timeout=10).json()

    try:
        wait_until(lambda: query('up{job="ray"} == 1')["data"]["result"], timeout_s=60,
                   what="Prometheus scraping Ray's targets")
        # Two rounds of traffic: the first creates every series (a counter first seen at 1 shows
        # no increase), the second makes the rates real. Ray exports metrics some seconds after
        # they are recorded, Serve's proxy metrics later than the replicas' own.
        _send_traffic(dev_app["client"])
        wait_until(lambda: [name for name in _metric_names() if not query(name)["data"]["result"]] == [],
                   timeout_s=120, what="every metric the dashboard uses scraped once")
        _send_traffic(dev_app["client"])
        wait_until(lambda: _unexpectedly_empty(query) == [], timeout_s=120,
                   what="every dashboard query answering with data")
        yield query
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def _may_be_empty(expr: str) -> bool:
    return any(name in expr for name in MAY_BE_EMPTY)


def _metric_names() -> set[str]:
    """Every metric the dashboard reads, except those that may rightly have no data."""
    names = {name for _, expr in dashboard_queries() for name in re.findall(r"\bray_[a-z_]+", expr)}
    return {name for name in names if not _may_be_empty(name)}


def _unexpectedly_empty(query) -> list[str]:
    """Dashboard queries that fail to parse, or answer with no finite value where data is expected."""
    empty = []
    for title, expr in dashboard_queries():
        answer = query(expr)
        assert answer["status"] == "success", f"{title}: {expr}: {answer}"
        values = [float(series["value"][1]) for series in answer["data"]["result"]]
        if not any(math.isfinite(value) for value in values) and not _may_be_empty(expr):
            empty.append(expr)
    return empty


def test_every_dashboard_query_parses_and_returns_data(prometheus):
    assert _unexpectedly_empty(prometheus) == []
    for name in MAY_BE_EMPTY:  # those still parse
        assert prometheus(name)["status"] == "success"


def _value(query, expr: str) -> float:
    [series] = query(expr)["data"]["result"]
    return float(series["value"][1])


def test_traffic_shows_up_with_the_right_labels(prometheus):
    rejected = prometheus('ray_genserve_validation_rejections_total{route="/v1/images", field="width"}')
    assert rejected["data"]["result"] and float(rejected["data"]["result"][0]["value"][1]) >= 1
    passed = prometheus('sum by (passed) (ray_genserve_images_total{model="flux-schnell"})')["data"]["result"]
    assert {series["metric"]["passed"] for series in passed} == {"true", "false"}
    # Two rounds of traffic, each on flux-schnell: three requests in one generation round, one regenerated once.
    flux = '{model="flux-schnell"}'
    wait_until(lambda: _value(prometheus, f"sum(ray_genserve_attempts_per_request_count{flux})") == 8, timeout_s=60,
               what="all eight flux-schnell image requests exported")
    mean = _value(prometheus, f"sum(ray_genserve_attempts_per_request_sum{flux}) / "
                              f"sum(ray_genserve_attempts_per_request_count{flux})")
    assert mean == pytest.approx(1.25)
    stages = prometheus("sum by (stage) (ray_genserve_stage_seconds_count)")["data"]["result"]
    assert {series["metric"]["stage"] for series in stages} >= {"enhance", "generate", "score", "encode", "keyframe", "video"}


def test_raw_exposition_names_types_and_labels(dev_app, prometheus):
    text = httpx.get(f"http://127.0.0.1:{dev_app['metrics_port']}/metrics", timeout=10).text
    families = {family.name: family for family in text_string_to_metric_families(text)}
    expected = {
        "ray_genserve_stage_seconds": ("histogram", {"stage", "model", "deployment", "application", "replica"}),
        "ray_genserve_images": ("counter", {"model", "passed", "deployment"}),
        "ray_genserve_videos": ("counter", {"model", "mode", "passed"}),
        "ray_genserve_attempts_per_request": ("histogram", {"model"}),
        "ray_genserve_aesthetic_score": ("histogram", {"model"}),
        "ray_genserve_alignment_score": ("histogram", {"model"}),
        "ray_genserve_hps_score": ("histogram", {"model"}),  # the dev profile's preference scorers
        "ray_genserve_pickscore_score": ("histogram", {"model"}),
        "ray_genserve_validation_rejections": ("counter", {"route", "field"}),
        "ray_genserve_model_cold_start_seconds": ("gauge", {"model", "deployment"}),
        "ray_genserve_gate_first_round_images": ("counter", {"model", "metric", "passed"}),
        "ray_genserve_gate_generated_images": ("counter", {"model", "metric"}),
        "ray_genserve_gate_accepted_images": ("counter", {"model", "metric"}),
        "ray_genserve_gate_device_seconds": ("counter", {"model", "metric"}),
        "ray_genserve_gate_score_fraction": ("histogram", {"model", "metric"}),
        "ray_genserve_model_busy_seconds": ("counter", {"model", "deployment", "replica"}),
        "ray_genserve_model_call_cpu_seconds": ("counter", {"model", "deployment", "replica"}),
    }
    for name, (kind, labels) in expected.items():
        assert name in families, f"{name} missing from the exposition"
        family = families[name]
        assert family.type == kind, (name, family.type)
        sample_labels = set().union(*(sample.labels for sample in family.samples))
        assert labels <= sample_labels, (name, labels - sample_labels)
    # On a CPU the accelerator-memory metrics are absent, not zero.
    assert not any("accelerator_memory" in name for name in families)
    buckets = [s.labels["le"] for s in families["ray_genserve_stage_seconds"].samples if s.name.endswith("_bucket")]
    assert "600.0" in buckets and "0.01" in buckets


def _first_round(query, model: str) -> dict[tuple[str, str], float]:
    answer = query(f'sum by (metric, passed) (ray_genserve_gate_first_round_images_total{{model="{model}"}})')
    return {(s["metric"]["metric"], s["metric"]["passed"]): float(s["value"][1]) for s in answer["data"]["result"]}


def test_the_gate_metrics_show_pass_rates_per_model_and_metric(prometheus):
    # flux-schnell, per traffic round: three requests and the video's keyframe pass on aesthetic at
    # the dev threshold 0; the regenerated request's first image fails alignment >= 100.
    wait_until(lambda: _first_round(prometheus, "flux-schnell") == {("aesthetic", "true"): 8, ("alignment", "false"): 2},
               timeout_s=60, what="the flux-schnell gate counts exported")
    rate = prometheus('sum(ray_genserve_gate_first_round_images_total{model="flux-schnell", metric="aesthetic", '
                      'passed="true"}) / sum(ray_genserve_gate_first_round_images_total{model="flux-schnell", '
                      'metric="aesthetic"})')["data"]["result"]
    assert float(rate[0]["value"][1]) == 1.0
    # sdxl's percentile-gated request: one first-round image per traffic round, passed or not.
    wait_until(lambda: sum(_first_round(prometheus, "sdxl").values()) == 2, timeout_s=60,
               what="the sdxl gate counts exported")
    generated = _value(prometheus, 'sum(ray_genserve_gate_generated_images_total{model="sdxl"})')
    assert 2 <= generated <= 6  # up to three rounds each
    assert _value(prometheus, 'sum(ray_genserve_gate_device_seconds_total{model="sdxl"})') > 0
    assert _value(prometheus, 'sum(ray_genserve_gate_score_fraction_count{model="sdxl"})') == generated

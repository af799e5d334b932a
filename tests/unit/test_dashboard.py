"""The Grafana dashboard's structure: importable, datasource as a variable, rows in reading order."""

from tests.metrics_dashboard import dashboard_queries, load_dashboard


def test_datasource_is_a_variable_never_a_fixed_uid():
    dashboard = load_dashboard()
    [variable] = [v for v in dashboard["templating"]["list"] if v["type"] == "datasource"]
    assert variable["query"] == "prometheus"
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"


def test_rows_read_traffic_quality_capacity_errors_top_to_bottom():
    panels = load_dashboard()["panels"]
    rows = [panel for panel in panels if panel["type"] == "row"]
    assert [row["title"] for row in rows] == ["Traffic", "Quality", "Capacity", "Errors"]
    ys = [panel["gridPos"]["y"] for panel in panels]
    assert ys == sorted(ys)
    assert len({panel["id"] for panel in panels}) == len(panels)


def test_every_panel_queries_and_custom_metrics_follow_conventions():
    queries = dashboard_queries()
    assert len(queries) >= 20
    for title, expr in queries:
        assert "$" not in expr, f"{title}: unsubstituted Grafana variable in {expr}"
    text = " ".join(expr for _, expr in queries)
    for name in ["ray_genserve_stage_seconds_bucket", "ray_genserve_images_total", "ray_genserve_videos_total",
                 "ray_genserve_attempts_per_request", "ray_genserve_aesthetic_score_bucket",
                 "ray_genserve_alignment_score_bucket", "ray_genserve_validation_rejections_total",
                 "ray_genserve_model_errors_total", "ray_genserve_replica_peak_accelerator_memory_bytes",
                 "ray_serve_num_http_requests_total", "ray_serve_http_request_latency_ms_bucket",
                 "ray_serve_deployment_replica_healthy", "ray_serve_deployment_queued_queries"]:
        assert name in text, name


def test_every_gate_score_has_a_histogram_whose_buckets_rise_to_the_top_of_its_range():
    from deployments.names import SCORE_RANGES
    from serve_app.services.metrics import SCORE_BUCKETS

    assert set(SCORE_BUCKETS) == set(SCORE_RANGES)
    for name, bounds in SCORE_BUCKETS.items():
        low, high = SCORE_RANGES[name]
        assert bounds == sorted(set(bounds)) and low < bounds[0] and bounds[-1] == high, name
    # The series dashboards already read keep their buckets.
    assert SCORE_BUCKETS["aesthetic"] == SCORE_BUCKETS["combined"] == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]

"""Reading the Grafana dashboard's queries, for the tests."""

import json
from pathlib import Path

DASHBOARD = Path(__file__).parents[1] / "configs" / "grafana" / "genserve.json"
# Grafana's own variables, replaced the way Grafana would before sending a query to Prometheus.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "5m"}


def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL with Grafana variables substituted) for every target."""
    queries = []
    for panel in load_dashboard()["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            queries.append((panel["title"], expr))
    return queries

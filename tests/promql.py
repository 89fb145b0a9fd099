"""Every PromQL expression that ships (dashboard panels, alert rules) and the metric names
they use, for the deploy and end-to-end Prometheus tests."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from raft_stream.metrics import RaftMetrics

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "raft-stream.json"
RULES = ROOT / "deploy" / "prometheus" / "rules.yaml"

# Grafana's macros and variables, replaced by what Grafana would send.
GRAFANA_SUBSTITUTIONS = {"$__rate_interval": "1m", "$namespace": ".*"}
METRIC_NAME = re.compile(r"\b(raft_stream_[a-z0-9_]+)\b")
SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "info": ("_info",),
}


def dashboard_queries() -> dict[str, str]:
    """Panel title and refId -> PromQL, with Grafana's variables substituted."""
    board = json.loads(DASHBOARD.read_text())
    queries = {}
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for macro, value in GRAFANA_SUBSTITUTIONS.items():
                expr = expr.replace(macro, value)
            queries[f"{panel['title']} [{target['refId']}]"] = expr
    return queries


def rule_queries() -> dict[str, str]:
    """Alert name -> PromQL."""
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {rule["alert"]: rule["expr"] for group in groups for rule in group["rules"]}


def all_queries() -> dict[str, str]:
    return {**dashboard_queries(), **rule_queries()}


def variable_queries() -> list[str]:
    """The dashboard's templating queries (label_values(...), not PromQL)."""
    board = json.loads(DASHBOARD.read_text())
    return [v["query"] for v in board["templating"]["list"] if v["type"] == "query"]


def exported_families() -> dict[str, str]:
    """Family name -> type of every metric a fresh RaftMetrics exposes (from its exposition;
    the ``_created`` timestamps that the text format lists as gauges belong to their family)."""
    text = generate_latest(RaftMetrics(CollectorRegistry()).registry).decode()
    return {
        family.name: family.type
        for family in text_string_to_metric_families(text)
        if not family.name.endswith("_created")
    }


def exported_names() -> set[str]:
    """Every series name a fresh RaftMetrics can expose."""
    return {
        name + suffix for name, kind in exported_families().items() for suffix in SUFFIXES[kind]
    }


def used_names(expr: str) -> set[str]:
    return set(METRIC_NAME.findall(expr))

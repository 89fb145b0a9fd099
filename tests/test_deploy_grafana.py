"""The Grafana dashboard: built by code, committed fresh, importable, and complete."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import Dashboard

from tests.promql import DASHBOARD, ROOT


def _board() -> dict[str, Any]:
    board: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return board


def test_derived_files_are_fresh() -> None:
    """The dashboard JSON (and the chart's copies, plain manifests, topics) match their
    sources; run ``python deploy/render_manifests.py`` after changing one."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "deploy" / "render_manifests.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_survives_a_round_trip_through_the_sdk() -> None:
    """from_json drops unknown keys silently: a lossless round trip means every key is one
    Grafana's schema knows."""
    board = _board()
    again = json.loads(json.dumps(Dashboard.from_json(board), cls=JSONEncoder))
    assert again == board


def test_dashboard_has_a_prometheus_datasource_variable_used_by_every_query() -> None:
    board = _board()
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}


def test_dashboard_covers_every_required_view() -> None:
    queries = " ".join(t["expr"] for p in _board()["panels"] for t in p.get("targets", []))
    for needle in (
        "raft_stream_reward_mean",
        "histogram_quantile(0.9, sum by (le, adapter) (rate(raft_stream_reward_bucket",
        "raft_stream_samples_rejected_total",
        "raft_stream_samples_kept_total",
        "raft_stream_generation_distinct2",
        "raft_stream_buffer_samples",
        "histogram_quantile(0.9, sum by (le) (rate(raft_stream_sample_staleness_versions_bucket",
        'raft_stream_buffer_evicted_total{namespace=~"$namespace", reason="stale"}',
        "raft_stream_training_loss",
        "raft_stream_training_duration_seconds_bucket",
        "max by (pod, instance) (raft_stream_adapter_version_served",
        "raft_stream_adapter_swap_seconds_bucket",
        "raft_stream_generation_tokens_total",
        "raft_stream_consumer_lag_messages",
        "raft_stream_dead_letter_total",
    ):
        assert needle in queries, needle


def test_panels_have_unique_ids_and_do_not_overlap() -> None:
    panels = _board()["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    cells = set()
    for p in panels:
        g = p["gridPos"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, p["title"]
                cells.add((x, y))
        assert g["x"] + g["w"] <= 24

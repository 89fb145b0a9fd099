"""A real Prometheus on 127.0.0.1 scrapes a running raft-stream process: every dashboard
query returns data, every alert rule loads, evaluates and reads only scraped series.

The scrape target is a MetricsServer process fed with real updates (tests/metrics_feeder.py);
``scrape_target`` is the one place to point it at the daemon instead.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.promql import ROOT, RULES, dashboard_queries, rule_queries, used_names

INSTALL = "apt-get update && apt-get install -y prometheus"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait(predicate: Any, timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            result = predicate()
        except OSError:
            result = None
        if result:
            return result
        time.sleep(0.25)
    pytest.fail(f"timed out after {timeout_s} s waiting for {what}")


@dataclass
class Prometheus:
    """A Prometheus server started by ``start_prometheus``."""

    url: str
    process: subprocess.Popen[bytes]

    def api(self, path: str, **params: str) -> Any:
        """GET /api/v1/<path>; returns ``data`` or raises with Prometheus' error."""
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=10) as resp:
            body = json.load(resp)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's result vector (or matrix/scalar as Prometheus returns it)."""
        data = self.api("query", query=expr)
        result: list[dict[str, Any]] = (
            data["result"] if data["resultType"] in ("vector", "matrix") else [data]
        )
        return result


def start_prometheus(target: str, workdir: Path, rule_files: list[Path]) -> Prometheus:
    """Start Prometheus on a free 127.0.0.1 port scraping ``target`` (host:port) every second,
    with its data in ``workdir``; returns once /-/ready answers. Stop its process when done."""
    exe = shutil.which("prometheus")
    if exe is None:
        pytest.fail(f"prometheus is not installed; CI installs it with `{INSTALL}`")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(p) for p in rule_files],
        "scrape_configs": [{"job_name": "raft-stream", "static_configs": [{"targets": [target]}]}],
    }
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    url = f"http://127.0.0.1:{_free_port()}"
    process = subprocess.Popen(
        [
            exe,
            f"--config.file={workdir / 'prometheus.yml'}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address={url.removeprefix('http://')}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=(workdir / "prometheus.log").open("wb"),
    )
    _wait(lambda: urllib.request.urlopen(f"{url}/-/ready", timeout=1).status == 200, 30, "ready")
    return Prometheus(url, process)


@pytest.fixture(scope="module")
def scrape_target() -> Iterator[str]:
    """host:port of a running raft-stream metrics endpoint."""
    feeder = subprocess.Popen(
        [sys.executable, "-m", "tests.metrics_feeder"], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    assert feeder.stdout is not None
    port = feeder.stdout.readline().split()[-1]
    yield f"127.0.0.1:{port}"
    feeder.terminate()
    feeder.wait(timeout=10)


@pytest.fixture(scope="module")
def prometheus(
    scrape_target: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Prometheus]:
    server = start_prometheus(scrape_target, tmp_path_factory.mktemp("prometheus"), [RULES])
    try:
        # rate() needs two scrapes inside its window, a new adapter version a few seconds.
        _wait(
            lambda: server.query("rate(raft_stream_adapter_swap_seconds_count[1m]) > 0"),
            30,
            "rates",
        )
        yield server
    finally:
        server.process.terminate()
        server.process.wait(timeout=10)


def test_prometheus_scrapes_the_target(prometheus: Prometheus) -> None:
    (up,) = prometheus.query('up{job="raft-stream"}')
    assert up["value"][1] == "1"


@pytest.mark.parametrize("panel", sorted(dashboard_queries()))
def test_dashboard_query_returns_data(prometheus: Prometheus, panel: str) -> None:
    assert prometheus.query(dashboard_queries()[panel]), panel


def test_alert_rules_load_and_evaluate_healthy(prometheus: Prometheus) -> None:
    def evaluated() -> list[dict[str, Any]]:
        rules = [r for g in prometheus.api("rules")["groups"] for r in g["rules"]]
        return rules if all(r.get("lastEvaluation", "").startswith("2") for r in rules) else []

    rules = _wait(evaluated, 10, "a rule evaluation")
    assert {r["name"] for r in rules} == set(rule_queries())
    assert {r["health"] for r in rules} == {"ok"}, [r.get("lastError") for r in rules]


@pytest.mark.parametrize("alert", sorted(rule_queries()))
def test_alert_rule_reads_only_scraped_series(prometheus: Prometheus, alert: str) -> None:
    expr = rule_queries()[alert]
    prometheus.query(expr)  # valid against the live server (may be empty: no alert)
    for name in used_names(expr):
        assert prometheus.query(f"count({name})"), f"{alert}: no series {name}"

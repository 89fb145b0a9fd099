"""A real Prometheus on 127.0.0.1 scrapes a running raft-stream process: every dashboard
query returns data, every alert rule loads, evaluates and reads only scraped series.

The scrape target is the real all-in-one daemon (``raft-stream run``) on the tiny model,
against the test broker, learning from a steady stream of prompts.
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from raft_stream.data.prompts import write_prompts_jsonl
from raft_stream.data.tiny_model import tiny_prompts
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


def _canary_prompts(workdir: Path) -> Path:
    path = workdir / "canary.jsonl"
    write_prompts_jsonl(tiny_prompts("eval")[:4], path)
    return path


def _daemon_config(workdir: Path, bootstrap: str, name: Callable[[str], str], port: int) -> Path:
    config = {
        "model": {"name_or_path": "tiny"},  # and its preset, under these settings
        "generation": {"sampling": {"k": 4, "max_new_tokens": 16}},
        "ranking": {"min_response_tokens": 1},
        "buffer": {"capacity": 32, "batch_size": 8},
        "training": {"batch_size": 8, "learning_rate": 1e-3},
        "store": {"root": str(workdir / "adapters")},
        # The gate judges every version (its panels need data) but promotes them all, so
        # versions keep coming at the test's pace.
        "gate": {
            "canary_prompts": str(_canary_prompts(workdir)),
            "samples_per_prompt": 2,
            "reward_margin": 10.0,
            "min_distinct2_ratio": 0.0,
        },
        "kafka": {
            "bootstrap_servers": bootstrap,
            "topics": {
                "prompts": name("prompts"),
                "samples": name("samples"),
                "adapters": name("adapters"),
                "dead_letter": name("dead"),
                "partitions": 1,
            },
            "generator_group": name("generators"),
            "trainer_group": name("trainer"),
            "session_timeout_ms": 6000,
            "heartbeat_interval_ms": 2000,
            "poll_max_records": 8,
        },
        "server": {"host": "127.0.0.1", "port": port},
        "daemon": {"state_dir": str(workdir / "state"), "grace_period_s": 20},
    }
    path = workdir / "daemon.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _served_version(url: str) -> float:
    with urllib.request.urlopen(f"{url}/metrics", timeout=2) as resp:
        text = resp.read().decode()
    for line in text.splitlines():
        if line.startswith("raft_stream_adapter_version_served "):
            return float(line.split()[-1])
    return 0.0


@pytest.fixture(scope="module")
def scrape_target(
    kafka_broker: str,
    unique_name: Callable[[str], str],
    tiny_model_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[str]:
    """host:port of a running all-in-one daemon (tiny model, real broker, real vLLM), fed
    a steady stream of prompts (and a few malformed messages) so every series moves."""
    from raft_stream.config import load_config
    from raft_stream.data.tiny_model import tiny_prompts
    from tests.roles_support import produce_prompts, produce_raw

    # tiny_model_dir: the model is built before the daemon starts (its name is "tiny").
    workdir = tmp_path_factory.mktemp("daemon")
    port = _free_port()
    config_path = _daemon_config(workdir, kafka_broker, unique_name, port)
    kafka = load_config(config_path).kafka
    prompts = tiny_prompts("train")
    produce_prompts(kafka, [(f"p{i}", prompts[i % len(prompts)].prompt) for i in range(3000)])
    produce_raw(kafka, [b"not json", b'{"id": "x"}', b"\xff\xfe"])
    log = (workdir / "daemon.log").open("wb")
    daemon = subprocess.Popen(
        [sys.executable, "-m", "raft_stream.cli", "run", "--config", str(config_path)],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        # Two adapter versions served: training, swaps and rewards per version all moved.
        _wait(lambda: daemon.poll() is None and _served_version(url) >= 2, 420, "2 adapters")
        yield f"127.0.0.1:{port}"
    finally:
        daemon.terminate()
        try:
            daemon.wait(timeout=60)
        except subprocess.TimeoutExpired:
            daemon.kill()
        log.close()


@pytest.fixture(scope="module")
def prometheus(
    scrape_target: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Prometheus]:
    server = start_prometheus(scrape_target, tmp_path_factory.mktemp("prometheus"), [RULES])
    try:
        # rate() needs two scrapes inside its window, a new adapter version a few seconds.
        _wait(
            lambda: server.query("rate(raft_stream_adapter_swap_seconds_count[1m]) > 0"),
            60,
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

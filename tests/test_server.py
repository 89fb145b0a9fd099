"""MetricsServer over real HTTP: /metrics, /healthz, /readyz, port 0 and stop()."""

from __future__ import annotations

import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry

from raft_stream.metrics import RaftMetrics
from raft_stream.server import MetricsServer
from tests.promtool import promtool


class Readiness:
    """A readiness callback the test flips."""

    def __init__(self) -> None:
        self.answer: tuple[bool, str] = (False, "engine not loaded")

    def __call__(self) -> tuple[bool, str]:
        return self.answer


@pytest.fixture
def readiness() -> Readiness:
    return Readiness()


@pytest.fixture
def server(readiness: Readiness) -> Iterator[MetricsServer]:
    srv = MetricsServer(
        RaftMetrics(CollectorRegistry()), "127.0.0.1", 0, readiness, liveness_max_age_s=0.5
    )
    with srv:
        yield srv


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, str, str]:
    """(status, content type, body) of a GET, errors included."""
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.headers["Content-Type"], err.read().decode()


def test_port_zero_binds_a_free_port(server: MetricsServer) -> None:
    assert server.port > 0
    assert server.url == f"http://127.0.0.1:{server.port}"


def test_metrics_serves_an_exposition_that_promtool_accepts(server: MetricsServer) -> None:
    server.metrics.prompts_consumed_total.inc(5)
    server.metrics.observe_rewards([0.5], adapter_version=1)
    status, content_type, body = get(server.url + "/metrics")
    assert status == 200
    assert content_type.startswith("text/plain; version=0.0.4")
    assert "raft_stream_prompts_consumed_total 5.0" in body
    assert 'raft_stream_reward_count{adapter="current"} 1.0' in body
    result = promtool("check", "metrics", stdin=body.encode())
    assert result.returncode == 0, result.stdout + result.stderr


def test_metrics_negotiates_openmetrics(server: MetricsServer) -> None:
    status, content_type, body = get(
        server.url + "/metrics", {"Accept": "application/openmetrics-text; version=1.0.0"}
    )
    assert status == 200
    assert content_type.startswith("application/openmetrics-text")
    assert body.endswith("# EOF\n")


def test_readyz_follows_the_callback_and_sets_the_gauge(
    server: MetricsServer, readiness: Readiness
) -> None:
    assert get(server.url + "/readyz")[::2] == (503, "engine not loaded\n")
    assert "raft_stream_ready 0.0" in get(server.url + "/metrics")[2]
    readiness.answer = (True, "ok")
    assert get(server.url + "/readyz")[::2] == (200, "ok\n")
    assert "raft_stream_ready 1.0" in get(server.url + "/metrics")[2]


def test_readyz_is_503_when_the_callback_raises(
    server: MetricsServer, readiness: Readiness
) -> None:
    def broken() -> tuple[bool, str]:
        raise ConnectionError("broker 10.0.0.1:9092 unreachable")

    server.readiness = broken
    status, _, body = get(server.url + "/readyz")
    assert status == 503
    assert "broker 10.0.0.1:9092 unreachable" in body


def test_healthz_fails_until_the_first_heartbeat(server: MetricsServer) -> None:
    # A startup probe must not pass while the engine is still loading.
    status, _, body = get(server.url + "/healthz")
    assert (status, body) == (503, "starting: no heartbeat yet (engine or clients not up)\n")
    server.heartbeat()
    assert get(server.url + "/healthz")[0] == 200


def test_healthz_fails_when_heartbeats_stop(server: MetricsServer) -> None:
    server.heartbeat()
    assert get(server.url + "/healthz")[::2] == (200, "ok\n")
    time.sleep(0.7)
    status, _, body = get(server.url + "/healthz")
    assert status == 503
    assert body.startswith("no heartbeat for")
    server.heartbeat()
    assert get(server.url + "/healthz")[0] == 200


def test_unknown_path_is_404(server: MetricsServer) -> None:
    assert get(server.url + "/nope")[0] == 404


def test_stop_releases_the_port(readiness: Readiness) -> None:
    srv = MetricsServer(RaftMetrics(CollectorRegistry()), "127.0.0.1", 0, readiness).start()
    port = srv.port
    srv.stop()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2)

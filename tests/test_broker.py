"""The embedded broker: starts, serves Kafka, freezes, and stops cleanly."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from raft_stream.stream.broker import BrokerError, EmbeddedBroker, run_broker

pytestmark = pytest.mark.kafka


def _accepts(bootstrap: str) -> bool:
    host, port = bootstrap.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=1).close()
    except OSError:
        return False
    return True


def test_broker_starts_on_a_free_port_logs_and_stops(tmp_path: Path) -> None:
    log_path = tmp_path / "broker.log"
    with EmbeddedBroker(log_path=log_path) as broker:
        assert broker.port != 0
        assert broker.running()
        assert _accepts(broker.bootstrap)
        pid = broker.pid
    assert not broker.running()
    assert not _accepts(broker.bootstrap)
    assert pid is not None
    with pytest.raises(ProcessLookupError):  # reaped, not a zombie or an orphan
        os.kill(pid, 0)
    assert "memory://" in log_path.read_text()


def test_broker_raises_error_when_its_port_is_taken(kafka_broker: str) -> None:
    # Tansu itself would not exit (a worker thread panics): it must be caught before.
    port = int(kafka_broker.rsplit(":", 1)[1])
    with pytest.raises(BrokerError, match="cannot listen"):
        EmbeddedBroker(port=port).start()


def test_broker_stops_while_frozen() -> None:
    broker = EmbeddedBroker().start()
    broker.freeze()
    started = time.monotonic()
    broker.stop()
    assert time.monotonic() - started < 5
    assert not broker.running()
    with pytest.raises(BrokerError, match="not running"):
        broker.thaw()


def test_run_broker_serves_until_sigterm(tmp_path: Path) -> None:
    # The handler runs in this (main) thread; a timer sends the signal.
    before = signal.getsignal(signal.SIGTERM)
    threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM)).start()
    started = time.monotonic()
    assert run_broker("127.0.0.1", 0, log_path=tmp_path / "broker.log") == 0
    assert time.monotonic() - started < 5
    assert signal.getsignal(signal.SIGTERM) is before


# A process that starts a recorded broker, says its pid and port, then waits to be killed.
_OWNER = """
import sys, time
from pathlib import Path
from raft_stream.stream.broker import EmbeddedBroker
broker = EmbeddedBroker(state_file=Path(sys.argv[1])).start()
print(broker.pid, broker.port, flush=True)
time.sleep(600)
"""


def test_a_recorded_broker_outlives_its_killed_owner_and_is_adopted_with_its_topics(
    tmp_path: Path,
) -> None:
    from kafka.admin import KafkaAdminClient, NewTopic

    state_file = tmp_path / "broker.json"
    owner = subprocess.Popen(
        [sys.executable, "-c", _OWNER, str(state_file)], stdout=subprocess.PIPE, text=True
    )
    assert owner.stdout is not None
    pid, port = map(int, owner.stdout.readline().split())
    admin = KafkaAdminClient(bootstrap_servers=f"127.0.0.1:{port}")
    admin.create_topics([NewTopic("kept", 1, 1)])
    admin.close()
    owner.kill()  # as kill -9 or the exit watchdog would
    owner.wait()

    # Without adoption the next start fails with "cannot listen" on the taken port.
    broker = EmbeddedBroker(port=port, state_file=state_file).start()
    try:
        assert broker.adopted and broker.pid == pid and broker.running()
        admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
        assert "kept" in admin.list_topics()
        admin.close()
    finally:
        broker.stop()
    assert not broker.running()
    assert not state_file.exists()
    assert not _accepts(f"127.0.0.1:{port}")


def test_a_stale_record_is_ignored_and_replaced(tmp_path: Path) -> None:
    state_file = tmp_path / "broker.json"
    state_file.write_text('{"pid": 1, "host": "127.0.0.1", "port": 1}')  # pid 1 is no broker

    with EmbeddedBroker(state_file=state_file) as broker:
        assert not broker.adopted
        assert json.loads(state_file.read_text())["pid"] == broker.pid


def test_the_daemon_fails_when_its_broker_dies(tmp_path: Path) -> None:
    from raft_stream.roles.all_in_one import watch_broker
    from raft_stream.roles.lifecycle import Shutdown

    broker = EmbeddedBroker(log_path=tmp_path / "broker.log").start()
    assert broker.pid is not None
    os.kill(broker.pid, signal.SIGKILL)
    with pytest.raises(BrokerError, match="exited under the running daemon"):
        watch_broker(broker, Shutdown(grace_period_s=1), every_s=0.05)
    broker.stop()

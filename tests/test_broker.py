"""The embedded broker: starts, serves Kafka, freezes, and stops cleanly."""

from __future__ import annotations

import os
import signal
import socket
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

"""Readiness for /readyz: the role's model is loaded and the broker answers.

The broker check is a metadata request made by a background thread every few seconds, so
a probe never waits on a slow or frozen broker: /readyz reads the cached answer.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

from kafka import KafkaAdminClient

from raft_stream.config import KafkaConfig
from raft_stream.stream.kafka import kafka_client_kwargs

__all__ = ["BrokerProbe", "all_ready"]

log = logging.getLogger(__name__)

Check = Callable[[], tuple[bool, str]]


class BrokerProbe:
    """Asks the broker for cluster metadata every ``interval_s`` in a daemon thread.

    Reachable means an answer within the last ``3 * interval_s`` seconds.
    """

    def __init__(self, cfg: KafkaConfig, interval_s: float = 5.0) -> None:
        self.cfg = cfg
        self.interval_s = interval_s
        self._last_ok: float | None = None
        self._last_error = "no answer yet"
        self._stop = threading.Event()
        self._admin: KafkaAdminClient | None = None
        self._thread = threading.Thread(
            target=self._run, name="raft-stream-broker-probe", daemon=True
        )

    def start(self) -> BrokerProbe:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval_s)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._probe()
            self._stop.wait(self.interval_s)
        self._close()

    def _probe(self) -> None:
        timeout_ms = int(self.interval_s * 1000)
        try:
            if self._admin is None:
                self._admin = KafkaAdminClient(
                    **kafka_client_kwargs(self.cfg),
                    request_timeout_ms=timeout_ms,
                    bootstrap_timeout_ms=timeout_ms,
                )
            self._admin.describe_cluster()
            self._last_ok = time.monotonic()
        except Exception as exc:  # any failure just means "not reachable now"
            self._last_error = repr(exc)
            self._close()

    def _close(self) -> None:
        if self._admin is not None:
            try:
                self._admin.close()
            except Exception:  # closing a broken client must not kill the probe
                log.debug("closing the probe's admin client failed", exc_info=True)
            self._admin = None

    def check(self) -> tuple[bool, str]:
        if self._last_ok is None:
            return False, f"broker not reached yet: {self._last_error}"
        age = time.monotonic() - self._last_ok
        if age > 3 * self.interval_s:
            return False, f"broker unreachable for {age:.0f} s: {self._last_error}"
        return True, "broker reachable"


def all_ready(checks: Sequence[Check]) -> tuple[bool, str]:
    """Ready when every check is; the reason lists each check's answer."""
    results = [check() for check in checks]
    return all(ok for ok, _ in results), "; ".join(reason for _, reason in results)

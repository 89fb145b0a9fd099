"""HTTP endpoints for Prometheus and Kubernetes probes, served on a background thread.

- ``GET /metrics``: the exposition of ``RaftMetrics.registry`` (text or OpenMetrics, by the
  Accept header).
- ``GET /healthz``: 503 until the first ``heartbeat()`` (the loops beat once their engine
  and clients are up, so a startup probe passes only then); afterwards 200 while a
  heartbeat came within ``liveness_max_age_s`` seconds, else 503 (the kubelet then
  restarts the pod). The daemon derives that window from the configured work
  (``DaemonConfig.liveness_window_s``).
- ``GET /readyz``: 200 when the readiness callback answers ``(True, reason)``, else 503 with
  the reason (engine not loaded, broker unreachable, ...). Also sets ``raft_stream_ready``.

Example:
    >>> from prometheus_client import CollectorRegistry
    >>> metrics = RaftMetrics(CollectorRegistry())
    >>> with MetricsServer(metrics, "127.0.0.1", 0, readiness=lambda: (True, "ok")) as srv:
    ...     srv.port > 0
    True
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client.exposition import choose_encoder

from raft_stream.metrics import RaftMetrics

__all__ = ["MetricsServer", "Readiness"]

log = logging.getLogger(__name__)

Readiness = Callable[[], tuple[bool, str]]
"""Returns (ready, reason); the reason is the body of /readyz."""


class MetricsServer:
    """/metrics, /healthz and /readyz on ``host:port``; port 0 picks a free port."""

    def __init__(
        self,
        metrics: RaftMetrics,
        host: str,
        port: int,
        readiness: Readiness,
        liveness_max_age_s: float = 60.0,
    ) -> None:
        self.metrics = metrics
        self.host = host
        self.readiness = readiness
        self.liveness_max_age_s = liveness_max_age_s
        self._last_beat: float | None = None
        self._httpd = ThreadingHTTPServer((host, port), _handler_for(self))
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port (the one picked when 0 was asked for)."""
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:9400``."""
        return f"http://{self.host}:{self.port}"

    def heartbeat(self) -> None:
        """Tell /healthz the process loop is alive; call it from the loop."""
        self._last_beat = time.monotonic()

    def liveness(self) -> tuple[bool, str]:
        """(alive, reason) from the age of the last heartbeat."""
        if self._last_beat is None:
            return False, "starting: no heartbeat yet (engine or clients not up)"
        age = time.monotonic() - self._last_beat
        if age > self.liveness_max_age_s:
            return False, f"no heartbeat for {age:.1f} s (limit {self.liveness_max_age_s} s)"
        return True, "ok"

    def check_ready(self) -> tuple[bool, str]:
        """Ask the readiness callback (an exception means not ready) and set the gauge."""
        try:
            ready, reason = self.readiness()
        except Exception as exc:  # a probe must answer, whatever the callback does
            ready, reason = False, f"readiness check failed: {exc!r}"
        self.metrics.ready.set(1 if ready else 0)
        return ready, reason

    def start(self) -> MetricsServer:
        """Serve on a daemon thread; returns self."""
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.1},  # stop() waits at most this long
            name="raft-stream-metrics",
            daemon=True,
        )
        self._thread.start()
        log.info("metrics and probes on %s", self.url)
        return self

    def stop(self) -> None:
        """Stop serving and release the port."""
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
            self._thread = None
        self._httpd.server_close()

    def __enter__(self) -> MetricsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _handler_for(server: MetricsServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                server.check_ready()
                encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
                self._send(200, encoder(server.metrics.registry), content_type)
            elif path == "/healthz":
                self._send_check(server.liveness())
            elif path == "/readyz":
                self._send_check(server.check_ready())
            else:
                self._send(404, b"not found: try /metrics, /healthz or /readyz\n")

        def _send_check(self, result: tuple[bool, str]) -> None:
            ok, reason = result
            self._send(200 if ok else 503, f"{reason}\n".encode())

        def _send(self, code: int, body: bytes, content_type: str = "text/plain") -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            log.debug("%s %s", self.address_string(), format % args)

    return Handler

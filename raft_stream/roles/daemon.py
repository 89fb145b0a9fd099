"""The process around the roles: signals, the exit watchdog, /metrics, /healthz, /readyz,
and the ``raft-stream generator`` and ``raft-stream trainer`` entry points.

Exit status: 0 after a drain, 1 when a role failed (the supervisor restarts the process;
uncommitted work is redone), 3 when the watchdog ended a drain that overran the grace period.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Self

from raft_stream.config import RaftConfig
from raft_stream.metrics import RaftMetrics
from raft_stream.roles.health import BrokerProbe, Check, all_ready
from raft_stream.roles.lifecycle import (
    STOP_SIGNALS,
    Heartbeats,
    Shutdown,
    children_die_with_parent,
    install_signal_handlers,
    start_exit_watchdog,
)
from raft_stream.server import MetricsServer

__all__ = ["Daemon", "run_generator", "run_trainer"]

log = logging.getLogger(__name__)


class Daemon:
    """What every daemon process sets up once: the shutdown flag (signals, watchdog), the
    metrics and probe server, heartbeats and readiness checks.

    Use from the main thread: ``with Daemon(cfg) as daemon: daemon.run("generator", fn)``.
    """

    def __init__(self, cfg: RaftConfig, metrics: RaftMetrics | None = None) -> None:
        """``metrics``: default, on prometheus_client's global registry (one per process)."""
        self.cfg = cfg
        self.shutdown = Shutdown(cfg.daemon.grace_period_s)
        self.metrics = metrics if metrics is not None else RaftMetrics()
        self.checks: list[Check] = []
        self.failed = False
        self.server = MetricsServer(
            self.metrics,
            cfg.server.host,
            cfg.server.port,
            readiness=self._ready,
            liveness_max_age_s=cfg.liveness_window_s,
        )
        self.heartbeats = Heartbeats(self.server.heartbeat)
        self.probe = BrokerProbe(cfg.kafka)
        self.checks.append(self.probe.check)

    def _ready(self) -> tuple[bool, str]:
        return all_ready(self.checks)

    def add_check(self, name: str, is_ready: Callable[[], bool]) -> None:
        """Readiness of one part, e.g. ``("generator", lambda: role.ready)``."""
        self.checks.append(
            lambda: (True, f"{name} ready") if is_ready() else (False, f"{name} starting")
        )

    def __enter__(self) -> Self:
        install_signal_handlers(self.shutdown)
        children_die_with_parent()
        start_exit_watchdog(self.shutdown)
        self.server.start()
        self.probe.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.probe.stop()
        self.server.stop()

    def run(self, name: str, body: Callable[[], None]) -> None:
        """Run ``body`` here; an exception fails the process and stops every other loop,
        unless a stop signal came first: the signal may have reached the process's children
        too (Ctrl-C in a terminal, ``timeout``, a runtime signalling the process group), and
        an engine starting or sampling dies of it. That is the stop asked for, logged, and
        the exit status stays 0."""
        try:
            body()
        except Exception:
            if self.shutdown.reason in STOP_SIGNALS:
                log.warning(
                    "%s ended with an error after %s; stopping",
                    name,
                    self.shutdown.reason,
                    exc_info=True,
                )
                return
            log.exception("%s failed; shutting the process down", name)
            self.failed = True
            self.shutdown.request(f"{name} failed")

    def start_thread(self, name: str, body: Callable[[], None]) -> threading.Thread:
        """Run ``body`` on a thread with the same failure handling as ``run``."""
        # A daemon thread: one still draining at the deadline must not hold the exit up.
        thread = threading.Thread(
            target=self.run, args=(name, body), name=f"raft-stream-{name}", daemon=True
        )
        thread.start()
        return thread

    @property
    def exit_status(self) -> int:
        return 1 if self.failed else 0


def run_generator(cfg: RaftConfig) -> int:
    """``raft-stream generator``: prompts -> samples until SIGTERM."""
    from raft_stream.data.models import resolve_model
    from raft_stream.roles.generator import GeneratorRole

    with Daemon(cfg) as daemon:
        model_path = resolve_model(cfg.model.name_or_path)
        role: GeneratorRole | None = None
        # Before the engine exists: /readyz must say "starting" until it serves.
        daemon.add_check("generator", lambda: role is not None and role.ready)

        def serve() -> None:
            nonlocal role
            role = GeneratorRole.from_config(
                cfg,
                model_path,
                daemon.metrics,
                daemon.shutdown,
                daemon.heartbeats.register("generator"),
            )
            try:
                role.run()
            finally:
                role.generator.close()
                role.sampler.reward.close()

        daemon.run("generator", serve)
    return daemon.exit_status


def run_trainer(cfg: RaftConfig) -> int:
    """``raft-stream trainer``: samples -> adapter versions until SIGTERM."""
    from raft_stream.data.models import resolve_model
    from raft_stream.roles.trainer import TrainerRole

    with Daemon(cfg) as daemon:
        model_path = resolve_model(cfg.model.name_or_path)
        role = TrainerRole(
            cfg, model_path, daemon.metrics, daemon.shutdown, daemon.heartbeats.register("trainer")
        )
        daemon.add_check("trainer", lambda: role.ready)
        daemon.run("trainer", role.run)
    return daemon.exit_status

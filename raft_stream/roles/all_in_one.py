"""``raft-stream run``: the generator and the trainer in one process on one model.

The generator loop runs on the main thread, the trainer loop on a thread of its own (its
training rounds on a third), and they talk only through the topics, exactly as separate
processes would: the same code paths run on a laptop and on Kubernetes. Without
``kafka.bootstrap_servers`` the embedded broker is started on 127.0.0.1:9092 (so
``raft-stream produce`` and ``tail`` find it), stopped on a drained exit, adopted by the
next run after a crash (see ``BROKER_STATE_FILE``), and its death fails the daemon.
State lives under ``daemon.state_dir``: ``buffer.jsonl``, ``broker.json`` and ``adapters/``
(``store.root`` when set).
"""

from __future__ import annotations

import logging
from pathlib import Path

from raft_stream.config import RaftConfig
from raft_stream.roles.cpu_split import bind_generation, split_cores
from raft_stream.roles.daemon import Daemon
from raft_stream.roles.lifecycle import Shutdown
from raft_stream.stream.broker import BrokerError, EmbeddedBroker

__all__ = [
    "BROKER_STATE_FILE",
    "EMBEDDED_BOOTSTRAP",
    "run_all_in_one",
    "watch_broker",
    "with_bootstrap",
]

log = logging.getLogger(__name__)

EMBEDDED_HOST = "127.0.0.1"
EMBEDDED_PORT = 9092
EMBEDDED_BOOTSTRAP = f"{EMBEDDED_HOST}:{EMBEDDED_PORT}"
"""Where the all-in-one mode's embedded broker listens (Kafka's usual port)."""
BROKER_STATE_FILE = "broker.json"
"""Under ``daemon.state_dir``: the embedded broker's pid and address. After a crash (``kill
-9``, the exit watchdog) the broker lives on and the next ``raft-stream run`` adopts it, so
prompts waiting in it and committed offsets survive; a drained stop ends it."""


def with_bootstrap(cfg: RaftConfig, bootstrap: str) -> RaftConfig:
    """A copy of ``cfg`` pointing at ``bootstrap`` (configs are frozen)."""
    kafka = cfg.kafka.model_copy(update={"bootstrap_servers": bootstrap})
    return cfg.model_copy(update={"kafka": kafka})


def run_all_in_one(cfg: RaftConfig) -> int:
    """Run both roles until SIGTERM/SIGINT; returns the exit status."""
    broker: EmbeddedBroker | None = None
    if cfg.kafka.bootstrap_servers is None:
        state_dir = Path(cfg.daemon.state_dir)
        state_dir.mkdir(parents=True, exist_ok=True)
        broker = EmbeddedBroker(
            EMBEDDED_HOST,
            EMBEDDED_PORT,
            log_path=state_dir / "broker.log",
            state_file=state_dir / BROKER_STATE_FILE,
        )
        broker.start()
        cfg = with_bootstrap(cfg, broker.bootstrap)
    try:
        return _serve(cfg, broker)
    finally:
        if broker is not None:
            broker.stop()


def watch_broker(broker: EmbeddedBroker, shutdown: Shutdown, every_s: float = 1.0) -> None:
    """Return on shutdown; raise BrokerError as soon as the broker is gone.

    Run on a daemon thread (``Daemon.start_thread``): the error fails the process, which
    exits non-zero, instead of waiting for a broker that will never come back.
    """
    while not shutdown.wait(every_s):
        if not broker.running():
            raise BrokerError(
                f"the embedded broker (pid {broker.pid}) exited under the running daemon; "
                f"its log is {broker.log_path}"
            )


def _share_the_cpu(cfg: RaftConfig) -> tuple[int, ...] | None:
    """With vLLM on the CPU: bind its worker to some cores, training to the others."""
    import torch

    if cfg.generation.backend != "vllm" or torch.cuda.is_available():
        return None
    split = split_cores(cfg.training.cpu_cores)
    if split is None:
        return None
    bind_generation(split)
    log.info(
        "cores split between generation and training",
        extra={"generation_cores": split.generation, "training_cores": split.training},
    )
    return split.training


def _serve(cfg: RaftConfig, broker: EmbeddedBroker | None) -> int:
    from raft_stream.data.models import resolve_model
    from raft_stream.roles.generator import GeneratorRole
    from raft_stream.roles.trainer import TrainerRole

    with Daemon(cfg) as daemon:
        model_path = resolve_model(cfg.model.name_or_path)
        trainer = TrainerRole(
            cfg, model_path, daemon.metrics, daemon.shutdown, daemon.heartbeats.register("trainer")
        )
        trainer.training_cores = _share_the_cpu(cfg)
        daemon.add_check("trainer", lambda: trainer.ready)
        # The trainer loads its model and starts consuming while the engine starts.
        trainer_thread = daemon.start_thread("trainer", trainer.run)
        if broker is not None:
            daemon.start_thread("broker", lambda: watch_broker(broker, daemon.shutdown))
        generator: GeneratorRole | None = None

        def serve() -> None:
            nonlocal generator
            generator = GeneratorRole.from_config(cfg, model_path, daemon.metrics, daemon.shutdown)
            # Registered once the engine is up: liveness covers the loop, not the start.
            generator.beat = daemon.heartbeats.register("generator")
            try:
                generator.run()
            finally:
                generator.generator.close()
                generator.sampler.reward.close()

        daemon.add_check("generator", lambda: generator is not None and generator.ready)
        daemon.run("generator", serve)
        # The generator returns only on shutdown (or failure, which requested it).
        daemon.shutdown.request("generator stopped")
        trainer_thread.join(daemon.shutdown.remaining_s())
        if trainer_thread.is_alive():
            log.warning("the trainer did not drain within the grace period")
    return daemon.exit_status

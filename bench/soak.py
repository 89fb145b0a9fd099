"""Soak: the all-in-one daemon under slow, failing and hung work for half an hour or more,
and what survived it (issue 8).

``raft-stream run`` (tiny model, vLLM backend) against a broker that outlives it, fed by a
producer the whole time (``--rate`` prompts a second), while:

- the reward (bench/soak_reward.py, a user's python reward in worker processes) raises on
  ``--raise-share`` of its calls and hangs on ``--hang-share`` (killed after
  ``reward.timeout_s``; a batch that failed as a whole is scored again, then dead-lettered
  ``reward_failed``);
- the broker is frozen (SIGSTOP) for ``--freeze-s`` every ``--freeze-every-s``;
- the daemon is SIGKILLed ``--kills`` times at random moments (one in each equal slot of
  the first ``--kill-window`` share of the run) and restarted at once, as Kubernetes would.

Then the producer stops, a last run drains the backlog, and the soak counts: prompts
produced, processed (their samples are on the samples topic), dead-lettered (by reason),
lost (neither: must be 0) and processed more than once (duplicates, allowed by
at-least-once), restarts (kills and any exit of its own), engine processes that outlived
their daemon (orphans), and every stored adapter version verified. Resident memory and open
file descriptors of the daemon's process group (daemon, engine, reward workers) are sampled
every ``--sample-every-s`` and plotted to docs/img/soak.png.

    python bench/soak.py                        # 35 min of chaos, then the drain (~45 min)
    python bench/soak.py --minutes 5 --kills 2  # a quick check

Results go to bench/results/soak.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from crash_trials import (  # bench/crash_trials.py
    DaemonProcess,
    SampleCounter,
    daemon_config,
    live_group_members,
    verify_versions,
)
from soak_reward import HANG_SHARE_ENV, RAISE_SHARE_ENV  # bench/soak_reward.py

from raft_stream.config import KafkaConfig, RaftConfig, TopicsConfig
from raft_stream.data.tiny_model import ensure_tiny_model, tiny_prompts
from raft_stream.roles.adapters import adapter_store_root
from raft_stream.stream.broker import EmbeddedBroker
from raft_stream.stream.kafka import JsonConsumer, StreamProducer, ensure_topics
from raft_stream.stream.schema import DeadLetter, decode_dead_letter

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "soak.json"
PLOT = ROOT / "docs" / "img" / "soak.png"


@dataclass
class Life:
    """One run of the daemon, from start to its end."""

    started_s: float
    pid: int
    serving_after_s: float | None = None
    ended_s: float | None = None
    end: str = "running"
    """killed, exit <status>, or stopped <status> (the SIGTERM at the end)."""


@dataclass
class Probe:
    """The daemon's process group at one moment."""

    t_s: float
    life: int
    rss_mib: float
    fds: int
    processes: int


@dataclass
class SoakReport:
    minutes: float
    produced: int = 0
    processed: int = 0
    dead_lettered: dict[str, int] = field(default_factory=dict)
    lost: int = 0
    lost_ids: list[str] = field(default_factory=list)
    duplicates: int = 0
    kills: int = 0
    own_exits: list[str] = field(default_factory=list)
    orphans: int = 0
    freezes: list[tuple[float, float]] = field(default_factory=list)
    producer_retries: int = 0
    versions_stored: int = 0
    versions_verified: int = 0
    drain_s: float = 0.0
    wall_s: float = 0.0
    lives: list[Life] = field(default_factory=list)
    probes: list[Probe] = field(default_factory=list)


def group_usage(pgid: int) -> tuple[float, int, int]:
    """(resident MiB, open fds, processes) summed over the live members of ``pgid``."""
    rss_kib = fds = 0
    members = live_group_members(pgid)
    for pid in members:
        with contextlib.suppress(OSError):
            status = Path(f"/proc/{pid}/status").read_text()
            rss_kib += next(
                int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")
            )
            fds += len(os.listdir(f"/proc/{pid}/fd"))
    return rss_kib / 1024, fds, len(members)


def kill_moments(rng: random.Random, kills: int, start_s: float, end_s: float) -> list[float]:
    """One random moment in each of ``kills`` equal slots of [start_s, end_s], kept off the
    slot edges so two kills are at least half a slot apart."""
    slot = (end_s - start_s) / max(kills, 1)
    return [start_s + slot * (i + rng.uniform(0.25, 0.75)) for i in range(kills)]


class DeadLetterCounter:
    """The prompt ids dead-lettered from the prompts topic, by reason (read without a group)."""

    def __init__(self, kafka: KafkaConfig) -> None:
        ensure_topics(kafka, [kafka.topics.dead_letter])
        self.prompts_topic = kafka.topics.prompts
        self.by_id: Counter[str] = Counter()
        self.reasons: Counter[str] = Counter()
        self._reader: JsonConsumer[DeadLetter] = JsonConsumer(
            kafka, kafka.topics.dead_letter, lambda v, _: decode_dead_letter(v), group_id=None
        )

    def update(self, timeout_s: float = 0.1) -> None:
        for record in self._reader.poll(timeout_s).records:
            letter = record.value
            self.reasons[letter.reason] += 1
            if letter.topic != self.prompts_topic or letter.value is None:
                continue  # a training batch's letter carries samples, not a prompt
            with contextlib.suppress(ValueError, AttributeError):
                self.by_id[str(json.loads(letter.value)["id"])] += 1

    def close(self) -> None:
        self._reader.close()


class Producer(threading.Thread):
    """Sends one prompt every 1/rate seconds until stopped; an id counts as produced once
    the broker acknowledged it (a send that failed, e.g. while frozen, is sent again)."""

    def __init__(self, kafka: KafkaConfig, rate: float) -> None:
        super().__init__(daemon=True, name="soak-producer")
        self.kafka, self.interval_s = kafka, 1 / rate
        self.ids: list[str] = []
        self.retries = 0
        self.stop = threading.Event()
        self.texts = [p.prompt for p in tiny_prompts("train")]

    def run(self) -> None:
        with StreamProducer(self.kafka) as producer:
            while not self.stop.is_set():
                ident = f"soak-{len(self.ids)}"
                value = {"id": ident, "prompt": self.texts[len(self.ids) % len(self.texts)]}
                try:
                    producer.send_and_wait(self.kafka.topics.prompts, [(ident, value)], 60)
                except Exception:  # a frozen broker: send it again
                    self.retries += 1
                    self.stop.wait(1.0)
                    continue
                self.ids.append(ident)
                self.stop.wait(self.interval_s)


class Freezer(threading.Thread):
    """Freezes the broker for ``freeze_s`` every ``every_s`` until stopped (thawed then)."""

    def __init__(self, broker: EmbeddedBroker, every_s: float, freeze_s: float, t0: float):
        super().__init__(daemon=True, name="soak-freezer")
        self.broker, self.every_s, self.freeze_s, self.t0 = broker, every_s, freeze_s, t0
        self.spans: list[tuple[float, float]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(self.every_s):
            start = time.monotonic() - self.t0
            self.broker.freeze()
            try:
                self.stop.wait(self.freeze_s)
            finally:
                self.broker.thaw()
            self.spans.append((round(start, 1), round(time.monotonic() - self.t0, 1)))


class Soak:
    """The supervisor: restarts the daemon whenever it ends, kills it on schedule, probes
    its process group, and reads what it published."""

    def __init__(self, cfg: RaftConfig, work_dir: Path, report: SoakReport, sample_every_s: float):
        config_path = work_dir / "daemon.yaml"
        config_path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
        self.cfg, self.report, self.sample_every_s = cfg, report, sample_every_s
        self.daemon = DaemonProcess(config_path, work_dir / "daemon.log")
        self.samples = SampleCounter(cfg.kafka)
        self.letters = DeadLetterCounter(cfg.kafka)
        self.t0 = time.monotonic()
        self._next_probe = 0.0

    def now(self) -> float:
        return time.monotonic() - self.t0

    def start(self) -> None:
        self.daemon.start()
        self.report.lives.append(Life(started_s=round(self.now(), 1), pid=self.daemon.pid))

    def _end_life(self, end: str) -> None:
        life = self.report.lives[-1]
        life.ended_s, life.end = round(self.now(), 1), end
        print(f"{self.now():7.1f} s  life {len(self.report.lives)} ended: {end}", flush=True)

    def kill(self) -> None:
        self.report.orphans += self.daemon.kill_daemon_only()
        self.report.kills += 1
        self._end_life("killed")
        self.start()

    def tick(self) -> None:
        """One supervision step (about a second)."""
        process = self.daemon.process
        assert process is not None
        if process.poll() is not None:
            end = f"exit {process.returncode}"
            self.report.own_exits.append(end)
            self.daemon.close()
            self._end_life(end)
            self.start()
        life = self.report.lives[-1]
        if life.serving_after_s is None:
            lines = self.daemon.log_lines()
            if any(str(line.get("msg", "")).startswith("generator serving") for line in lines):
                life.serving_after_s = round(self.now() - life.started_s, 1)
        if self.now() >= self._next_probe:
            rss, fds, processes = group_usage(self.daemon.pid)
            probe = Probe(
                round(self.now(), 1), len(self.report.lives), round(rss, 1), fds, processes
            )
            self.report.probes.append(probe)
            self._next_probe = self.now() + self.sample_every_s
        self.samples.update(0.5)
        self.letters.update(0.1)

    def seen(self) -> set[str]:
        return set(self.samples.counts) | set(self.letters.by_id)

    def close(self) -> None:
        self.daemon.close()
        self.samples.close()
        self.letters.close()


def run_soak(
    cfg: RaftConfig,
    broker: EmbeddedBroker,
    work_dir: Path,
    args: argparse.Namespace,
) -> SoakReport:
    rng = random.Random(args.seed)
    report = SoakReport(minutes=args.minutes)
    chaos_s = args.minutes * 60
    kills = kill_moments(rng, args.kills, 60.0, chaos_s * args.kill_window)
    soak = Soak(cfg, work_dir, report, args.sample_every_s)
    producer = Producer(cfg.kafka, args.rate)
    freezer = Freezer(broker, args.freeze_every_s, args.freeze_s, soak.t0)
    try:
        soak.start()
        producer.start()
        freezer.start()
        while soak.now() < chaos_s:
            if kills and soak.now() >= kills[0]:
                kills.pop(0)
                soak.kill()
            soak.tick()
        producer.stop.set()
        freezer.stop.set()
        producer.join()
        freezer.join()
        produced = set(producer.ids)
        drain_started = soak.now()
        print(f"{soak.now():7.1f} s  chaos over: {len(produced)} produced; draining", flush=True)
        quiet_until = None
        while soak.now() - drain_started < args.drain_timeout_s:
            soak.tick()
            if produced <= soak.seen():
                # Wait a little longer: duplicates of the last batches show up too.
                quiet_until = quiet_until or soak.now() + 10
                if soak.now() >= quiet_until:
                    break
        report.drain_s = round(soak.now() - drain_started, 1)
        status, _ = soak.daemon.terminate(cfg.daemon.grace_period_s + 10)
        soak._end_life(f"stopped {status}")
        soak.samples.read_to_end(set(), timeout_s=5)
        soak.letters.update(1.0)
    finally:
        producer.stop.set()
        freezer.stop.set()
        soak.close()
    report.freezes = freezer.spans
    report.producer_retries = producer.retries
    report.produced = len(producer.ids)
    processings = soak.samples.processed(cfg.generation.sampling.k) + soak.letters.by_id
    report.processed = sum(1 for i in producer.ids if soak.samples.counts[i] > 0)
    report.dead_lettered = dict(soak.letters.reasons)
    report.lost_ids = [i for i in producer.ids if processings[i] == 0]
    report.lost = len(report.lost_ids)
    report.duplicates = sum(processings[i] - 1 for i in producer.ids if processings[i] > 1)
    report.wall_s = round(soak.now(), 1)
    return report


def life_table(report: SoakReport) -> list[dict[str, Any]]:
    """Per life: serving after, length, the group's memory and fds at its first and last
    probe after serving (what 'memory flat' is judged on)."""
    rows = []
    for number, life in enumerate(report.lives, start=1):
        ready = life.started_s + (life.serving_after_s or 0)
        probes = [p for p in report.probes if p.life == number and p.t_s >= ready]
        row: dict[str, Any] = {
            "life": number,
            "serving_after_s": life.serving_after_s,
            "length_s": round((life.ended_s or 0) - life.started_s, 1),
            "end": life.end,
        }
        if len(probes) >= 2:
            row |= {
                "rss_first_mib": probes[0].rss_mib,
                "rss_last_mib": probes[-1].rss_mib,
                "fds_first": probes[0].fds,
                "fds_last": probes[-1].fds,
            }
            if probes[-1].t_s - probes[0].t_s >= 300:
                fit = statistics.linear_regression(
                    [p.t_s / 60 for p in probes], [p.rss_mib for p in probes]
                )
                row["rss_slope_mib_per_min"] = round(fit.slope, 2)
        rows.append(row)
    return rows


def plot(report: SoakReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (rss_ax, fd_ax) = plt.subplots(2, 1, sharex=True, figsize=(10, 6))
    minutes = [p.t_s / 60 for p in report.probes]
    rss_ax.plot(minutes, [p.rss_mib for p in report.probes], lw=1)
    fd_ax.plot(minutes, [p.fds for p in report.probes], lw=1, color="tab:green")
    for ax in (rss_ax, fd_ax):
        for life in report.lives:
            if life.end == "killed" and life.ended_s is not None:
                ax.axvline(life.ended_s / 60, color="tab:red", lw=0.8, alpha=0.6)
        for start, end in report.freezes:
            ax.axvspan(start / 60, end / 60, color="tab:blue", alpha=0.15)
    rss_ax.set_ylabel("resident memory (MiB)")
    fd_ax.set_ylabel("open file descriptors")
    fd_ax.set_xlabel("minutes (red: kill -9, blue: broker frozen)")
    rss_ax.set_title(
        f"raft-stream soak: {report.produced} prompts, {report.lost} lost, "
        f"{report.kills} kills, {len(report.freezes)} freezes (daemon + engine + reward workers)"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=35.0, help="of chaos and production")
    parser.add_argument("--rate", type=float, default=0.5, help="prompts a second")
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument(
        "--kill-window", type=float, default=0.75, help="share of the run the kills fall in"
    )
    parser.add_argument("--freeze-every-s", type=float, default=300.0)
    parser.add_argument("--freeze-s", type=float, default=20.0)
    parser.add_argument("--raise-share", type=float, default=0.05)
    parser.add_argument("--hang-share", type=float, default=0.01)
    parser.add_argument("--reward-timeout-s", type=float, default=5.0)
    parser.add_argument("--sample-every-s", type=float, default=5.0)
    parser.add_argument("--drain-timeout-s", type=float, default=900.0)
    parser.add_argument("--backend", choices=["vllm", "transformers"], default="vllm")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--plot", type=Path, default=PLOT)
    args = parser.parse_args()

    os.environ |= {RAISE_SHARE_ENV: str(args.raise_share), HANG_SHARE_ENV: str(args.hang_share)}
    model_dir = ensure_tiny_model()
    broker = EmbeddedBroker().start()
    run = f"soak-{int(time.time())}"
    kafka = KafkaConfig(
        bootstrap_servers=broker.bootstrap,
        topics=TopicsConfig(
            prompts=f"{run}.prompts",
            samples=f"{run}.samples",
            adapters=f"{run}.adapters",
            dead_letter=f"{run}.dead-letter",
            partitions=2,
        ),
        generator_group=f"{run}.generators",
        trainer_group=f"{run}.trainer",
        session_timeout_ms=6000,
        heartbeat_interval_ms=2000,
    )
    ensure_topics(kafka, [kafka.topics.prompts, kafka.topics.samples, kafka.topics.dead_letter])
    work_dir = Path(tempfile.mkdtemp(prefix="raft-stream-soak-"))
    base = daemon_config(kafka, work_dir / "state", model_dir, args.backend)
    cfg = RaftConfig.model_validate(
        base.model_dump()
        | {
            "reward": base.reward.model_dump()
            | {
                "kind": "python",
                "function": "bench.soak_reward:flaky_reward",
                "timeout_s": args.reward_timeout_s,
            }
        }
    )
    try:
        report = run_soak(cfg, broker, work_dir, args)
        report.versions_stored, report.versions_verified = verify_versions(
            adapter_store_root(cfg), model_dir
        )
    finally:
        broker.stop()
    lives = life_table(report)
    summary = {k: v for k, v in asdict(report).items() if k not in ("probes", "lives")}
    print(json.dumps({k: v for k, v in summary.items() if k != "lost_ids"}, indent=2))
    for row in lives:
        print(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            summary
            | {
                "lives": lives,
                "probes": [asdict(p) for p in report.probes],
                "backend": args.backend,
                "work_dir": str(work_dir),
                "cpus": os.cpu_count(),
                "args": {k: str(v) for k, v in vars(args).items()},
            },
            indent=2,
        )
        + "\n"
    )
    plot(report, args.plot)
    print(f"wrote {args.out} and {args.plot}")
    ok = report.lost == 0 and report.orphans == 0
    return 0 if ok and report.versions_verified == report.versions_stored else 1


if __name__ == "__main__":
    sys.exit(main())

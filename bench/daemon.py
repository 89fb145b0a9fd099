"""The streaming daemon against its plain alternatives, on the same model and prompts.

1. raw vLLM: the same engine settings sampling the prompts in the daemon's batch size,
   one batch at a time (``LLM.generate``), and, as the ceiling, all in one call;
2. serial RAFT: generate a batch, then (when a streaming batch fills) train before the
   next batch — what a loop without background training does;
3. the all-in-one daemon (``raft-stream run``) against the embedded broker: from the first
   prompt produced to the last prompt's samples on the samples topic, three ways: with
   training paused (``buffer.batch_size`` and ``capacity`` 100000, so no round starts)
   one batch at a time (``generation.max_prompts_in_flight`` = ``kafka.poll_max_records``:
   the loop before the pipeline) and pipelined (the default); then pipelined with training,
   serving adapters through vLLM's LoRA path and merged into the weights.

Everything but the LoRA-path daemon runs with the default ``generation.adapter_serving``
(``auto``: merged on the CPU, so an engine without LoRA, as plain vLLM runs).

Reports samples/s and tokens/s of each (the median of ``--repeats`` rounds: raw vLLM moves
by ±20% from run to run on a shared 2-core machine), the daemon/raw ratios (and, for
the paused daemons, the median of each round's ratio to a raw vLLM round run just before
it, the daemon waiting, so the machine's drift over the minutes between the opening raw
figure and a daemon's run stays out of the ratio), streaming/serial wall time, and
adapter swap latency: stored → the engine finished the first prompt's samples on it (the
sample record's ``created_at``), and stored → those samples reached a consumer of the
samples topic (scored, ranked and delivered with their batch).

    python bench/daemon.py                 # tiny model, 512 prompts, K=4
    python bench/daemon.py --model demo --prompts 64
    python bench/daemon.py --only pipelined --set generation.max_prompts_in_flight=64
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table

from raft_stream.buffer import RewardBuffer
from raft_stream.config import RaftConfig, load_config
from raft_stream.data.models import resolve_model
from raft_stream.data.tiny_model import tiny_prompts
from raft_stream.generation.base import SamplingParams
from raft_stream.generation.engine_dtype import cpu_identity
from raft_stream.generation.vllm_backend import VLLMGenerator
from raft_stream.prompting import PromptFormatter
from raft_stream.raft import RaftSampler
from raft_stream.rewards.registry import build_safe_reward
from raft_stream.roles.cpu_split import BIND_ENV, bind_generation, split_cores
from raft_stream.stream.broker import EmbeddedBroker
from raft_stream.stream.kafka import JsonConsumer, StreamProducer, ensure_topics
from raft_stream.training.lora_trainer import LoRATrainer
from raft_stream.training.store import AdapterStore
from raft_stream.types import PromptRecord

PY_SPY = shutil.which("py-spy") or "py-spy"
PY_SPY_FLAGS = ["--subprocesses", "--threads", "--format", "raw"]
"""Every process and thread, waits included, as collapsed stacks (one line a stack)."""


def bench_config(model: str, bootstrap: str, workdir: Path, port: int) -> RaftConfig:
    """``model``: a name or folder; a built-in model's name brings its preset."""
    return load_config(
        overrides={
            "model.name_or_path": model,
            "model.max_model_len": 256,
            "generation.sampling.k": 4,
            "ranking.min_response_tokens": 1,
            "buffer.capacity": 64,
            "buffer.batch_size": 32,
            "kafka.bootstrap_servers": bootstrap,
            "kafka.poll_max_records": 16,
            "kafka.publish_rejected": True,
            "kafka.topics.partitions": 1,
            "store.root": str(workdir / "adapters"),
            "daemon.state_dir": str(workdir / "state"),
            "server.host": "127.0.0.1",
            "server.port": port,
        }
    )


def batches(prompts: list[PromptRecord], size: int) -> list[list[PromptRecord]]:
    return [prompts[i : i + size] for i in range(0, len(prompts), size)]


CAPTION = (
    "daemon: from the first prompt sent to the last prompt's samples received, the group "
    "joined before; the all-in-one daemon binds vLLM to its generation cores and keeps the "
    "others for training (roles/cpu_split.py), even while training is paused"
)


def raw_round(
    generator: VLLMGenerator, prompts: list[PromptRecord], size: int, params: SamplingParams
) -> dict[str, float]:
    """Raw vLLM samples ``prompts`` once, in batches of ``size``: seconds, tokens, samples."""
    started = time.perf_counter()
    tokens = samples = 0
    for batch in batches(prompts, size):
        outputs = generator.generate([p.text for p in batch], params)
        tokens += sum(c.num_tokens for row in outputs for c in row)
        samples += sum(len(row) for row in outputs)
    return {"s": time.perf_counter() - started, "tokens": tokens, "samples": samples}


def sample_raw(
    generator: VLLMGenerator,
    prompts: list[PromptRecord],
    size: int,
    params: SamplingParams,
    repeats: int,
) -> dict[str, float]:
    """Raw vLLM: the prompts in batches of ``size``, after one batch to warm the engine;
    the median of ``repeats`` rounds."""
    generator.generate([p.text for p in prompts[:size]], params)
    rounds = [raw_round(generator, prompts, size, params) for _ in range(repeats)]
    return sorted(rounds, key=lambda r: r["s"])[len(rounds) // 2]


def run_raw(
    cfg: RaftConfig,
    model_path: str,
    prompts: list[PromptRecord],
    repeats: int,
    generator: VLLMGenerator,
) -> dict[str, Any]:
    """Raw vLLM (``generator``, vLLM's default binding), one batch at a time and all
    prompts in one call, and one batch at a time on the cores the all-in-one daemon gives
    generation (``roles.cpu_split``, an engine of its own)."""
    params = SamplingParams.from_config(cfg.generation.sampling)
    size = cfg.kafka.poll_max_records
    split = split_cores(cfg.training.cpu_cores)
    raw_split = None
    if split is not None:
        bind_generation(split)  # read by the engine's worker when it starts
        on_cores = VLLMGenerator(model_path, cfg.model, cfg.generation)
        try:
            raw_split = sample_raw(on_cores, prompts, size, params, repeats)
        finally:
            on_cores.close()
            del os.environ[BIND_ENV]
    raw = sample_raw(generator, prompts, size, params, repeats)
    # The ceiling: every prompt in one call, the engine's batch as full as it gets.
    raw_one_call = sample_raw(generator, prompts, len(prompts), params, repeats)
    return {
        "raw_s": raw["s"],
        "raw_tokens": raw["tokens"],
        "raw_samples": raw["samples"],
        "raw_one_call_s": raw_one_call["s"],
        "raw_one_call_tokens": raw_one_call["tokens"],
        "raw_generation_cores": None if split is None else list(split.generation),
        "raw_on_generation_cores_s": None if raw_split is None else raw_split["s"],
        "raw_on_generation_cores_tokens": None if raw_split is None else raw_split["tokens"],
    }


def run_serial(
    cfg: RaftConfig,
    model_path: str,
    prompts: list[PromptRecord],
    workdir: Path,
    generator: VLLMGenerator,
) -> dict[str, Any]:
    """The serial generate-then-train loop on ``generator`` (its adapters change the
    engine's weights when served merged: run it last)."""
    params = SamplingParams.from_config(cfg.generation.sampling)
    size = cfg.kafka.poll_max_records
    sampler = RaftSampler(generator, build_safe_reward(cfg.reward), cfg.ranking, params)
    trainer = LoRATrainer(model_path, cfg.training)
    shutil.rmtree(workdir / "serial-adapters", ignore_errors=True)  # versions from 1
    store = AdapterStore(workdir / "serial-adapters", base_model=model_path)
    buffer = RewardBuffer(cfg.buffer.capacity, cfg.buffer.batch_size)
    adapter = None
    started = time.perf_counter()
    for batch in batches(prompts, size):
        buffer.add(sampler.run(batch, adapter).selection.kept)
        if buffer.batch_ready():
            trained = buffer.peek_batch()
            trainer.train(trained)
            adapter = store.write(trainer.save, {})
            buffer.remove(trained)
    serial_s = time.perf_counter() - started
    return {"serial_s": serial_s, "serial_versions": adapter.version if adapter else 0}


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/readyz", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def daemon_variant(cfg: RaftConfig, name: str, workdir: Path, **settings: Any) -> RaftConfig:
    """``cfg`` with topics, groups and state of its own (each run starts afresh) and
    ``settings`` (dotted keys)."""
    topics = cfg.kafka.topics
    overrides: dict[str, Any] = {
        **cfg.model_dump(mode="json"),
        "kafka.topics.prompts": f"{topics.prompts}.{name}",
        "kafka.topics.samples": f"{topics.samples}.{name}",
        "kafka.topics.adapters": f"{topics.adapters}.{name}",
        "kafka.topics.dead_letter": f"{topics.dead_letter}.{name}",
        "kafka.generator_group": f"{cfg.kafka.generator_group}.{name}",
        "kafka.trainer_group": f"{cfg.kafka.trainer_group}.{name}",
        "store.root": str(workdir / name / "adapters"),
        "daemon.state_dir": str(workdir / name / "state"),
        **settings,
    }
    return load_config(overrides=overrides)


def run_daemon(
    cfg: RaftConfig,
    prompts_file: Path,
    workdir: Path,
    repeats: int,
    paired: Callable[[], dict[str, float]] | None = None,
    profile: Path | None = None,
) -> dict[str, Any]:
    """Start the daemon, stream the prompts through it ``repeats`` times (medians count)
    and stop it. ``paired``: a raw vLLM round run just before each of the daemon's, the
    daemon idle (it waits for prompts), so each round has its own raw figure on the
    machine as it was then. ``profile``: record the daemon and its engine process with
    py-spy into this file (collapsed stacks by thread: ``py-spy record --format raw``)."""
    shutil.rmtree(workdir, ignore_errors=True)  # no store or state of an earlier run
    workdir.mkdir(parents=True)
    config_path = workdir / "daemon.yaml"
    config_path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    kafka = cfg.kafka
    ensure_topics(kafka, [kafka.topics.prompts, kafka.topics.samples, kafka.topics.adapters])
    log = (workdir / "daemon.log").open("wb")
    daemon = subprocess.Popen(
        [sys.executable, "-m", "raft_stream.cli", "run", "--config", str(config_path)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{cfg.server.port}"
    spy: subprocess.Popen[bytes] | None = None
    try:
        deadline = time.monotonic() + 600
        while not _ready(url):
            if daemon.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the daemon did not get ready; see {workdir}/daemon.log")
            time.sleep(0.5)
        if profile is not None:  # the streaming part only, not the engine's start
            spy = subprocess.Popen(
                [PY_SPY, "record", "--pid", str(daemon.pid), *PY_SPY_FLAGS, "-o", str(profile)],
                stdout=subprocess.DEVNULL,
            )
            time.sleep(1.0)  # attached
        first_on: dict[int, float] = {}
        delivered: dict[int, float] = {}
        prompts = [json.loads(line) for line in prompts_file.read_bytes().splitlines()]
        rounds: list[dict[str, float]] = []
        with (  # both connected before the clock starts: the bench's costs, not the daemon's
            StreamProducer(kafka) as producer,
            JsonConsumer(
                kafka, kafka.topics.samples, lambda v, _w: json.loads(v), group_id=None
            ) as consumer,
        ):
            for n in range(repeats):  # the same prompts under new ids each round
                raw = paired() if paired is not None else None
                batch = [{**p, "id": f"{p['id']}~{n}"} for p in prompts]
                round_ = stream_round(
                    producer, consumer, kafka.topics.prompts, batch, first_on, delivered
                )
                if raw is not None:
                    round_["raw_tokens_per_s"] = raw["tokens"] / raw["s"]
                rounds.append(round_)
        with JsonConsumer(
            kafka, kafka.topics.adapters, lambda v, _w: json.loads(v), group_id=None
        ) as consumer:
            messages = [a.value for a in consumer.poll(5.0).records]
        announced = {m["version"]: m["created_at"] for m in messages if "action" not in m}
        rollbacks = sum(m.get("action") == "rollback" for m in messages)
    finally:
        if spy is not None:
            spy.send_signal(signal.SIGINT)  # py-spy writes what it recorded
            spy.wait(timeout=60)
        daemon.terminate()
        daemon.wait(timeout=120)
        log.close()
    swaps = [first_on[v] - created for v, created in announced.items() if v in first_on]
    to_delivered = [delivered[v] - c for v, c in announced.items() if v in delivered]
    loaded = swap_loads(workdir / "daemon.log")
    return {
        "rounds": rounds,
        "daemon_s": statistics.median(r["s"] for r in rounds),
        "daemon_tokens_per_s": statistics.median(r["tokens"] / r["s"] for r in rounds),
        "first_sample_s": statistics.median(r["first_sample_s"] for r in rounds),
        "daemon_samples_per_s": statistics.median(r["samples"] / r["s"] for r in rounds),
        "paired_over_raw": (
            statistics.median(r["tokens"] / r["s"] / r["raw_tokens_per_s"] for r in rounds)
            if paired is not None
            else None
        ),
        "daemon_versions": max(first_on, default=0),
        "rollbacks": rollbacks,
        "swap_latency_s": swaps,
        "swap_to_delivered_s": to_delivered,
        "swap_to_loaded_s": [loaded[v] for v in announced if v in loaded and v in first_on],
    }


def swap_loads(log_path: Path) -> dict[int, float]:
    """Adapter version -> seconds from stored to loaded, from the daemon's log lines
    "serving an adapter version" (``since_stored_s``)."""
    loads: dict[int, float] = {}
    for line in log_path.read_text(errors="replace").splitlines():
        if '"serving an adapter version"' not in line:
            continue
        try:  # vLLM's processes write to the same file: a line may be cut into
            entry = json.loads(line)
            loads.setdefault(entry["adapter_version"], entry["since_stored_s"])
        except (ValueError, KeyError):
            continue
    return loads


def stream_round(
    producer: StreamProducer,
    consumer: JsonConsumer[Any],
    topic: str,
    prompts: list[dict[str, Any]],
    first_on: dict[int, float],
    delivered: dict[int, float],
) -> dict[str, float]:
    """Send ``prompts`` and wait for every one's samples: seconds from the first sent to
    the last received, tokens, samples, and seconds to the first sample generated;
    ``first_on`` gets when the engine first finished a sample on each adapter version,
    ``delivered`` when one first reached this consumer."""
    wanted = {p["id"] for p in prompts}
    seen: set[str] = set()
    tokens = samples = 0
    first_sample: float | None = None
    started = time.time()
    producer.wait_all((producer.send_json(topic, p) for p in prompts), 60)
    while seen != wanted:
        if time.time() - started > 1800:
            raise RuntimeError("the daemon did not finish the prompts in 30 minutes")
        for record in consumer.poll(1.0).records:
            sample = record.value
            if sample["prompt_id"] not in wanted:
                continue  # a late duplicate of an earlier round (at least once)
            created = sample["created_at"]  # when the engine finished it
            first_sample = min(first_sample or created, created)
            seen.add(sample["prompt_id"])
            tokens += sample["response_tokens"]
            samples += 1
            version = sample["adapter_version"]
            first_on[version] = min(first_on.get(version, created), created)
            delivered.setdefault(version, time.time())
    return {
        "s": time.time() - started,
        "tokens": tokens,
        "samples": samples,
        "first_sample_s": (first_sample or started) - started,
    }


PAUSED = {"buffer.batch_size": 100_000, "buffer.capacity": 100_000}
"""No training round ever starts."""


@dataclass(frozen=True)
class Variant:
    name: str
    """What ``--only`` picks it by, and its folder under the workdir."""
    settings: dict[str, Any]
    paired: bool
    """Paused: each round is paired with a raw vLLM round (a daemon that trains may still
    be training when that round would run)."""


def daemon_variants(one_batch: int) -> dict[str, Variant]:
    """Label -> variant; ``one_batch``: ``kafka.poll_max_records``."""
    return {
        "one batch, paused": Variant(
            "serial", {**PAUSED, "generation.max_prompts_in_flight": one_batch}, paired=True
        ),
        "pipelined, paused": Variant("pipelined", PAUSED, paired=True),
        "pipelined, training, LoRA path": Variant(
            "training", {"generation.adapter_serving": "lora"}, paired=False
        ),
        "pipelined, merged, training": Variant(
            "merged", {"generation.adapter_serving": "merged"}, paired=False
        ),
        # A new version's first batch waits for the batches ahead of it: one at a
        # time trades throughput for the shortest swap.
        "one batch, merged, training": Variant(
            "merged-one-batch",
            {"generation.adapter_serving": "merged", "generation.max_prompts_in_flight": one_batch},
            paired=False,
        ),
    }


VARIANT_NAMES = tuple(v.name for v in daemon_variants(1).values())


def setting(text: str) -> tuple[str, Any]:
    """``--set KEY=VALUE``: a dotted config key and a YAML value."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    return key, yaml.safe_load(value)


def run_daemons(
    cfg: RaftConfig,
    prompts_file: Path,
    workdir: Path,
    args: argparse.Namespace,
    paired_round: Callable[[], dict[str, float]],
    console: Console,
) -> dict[str, dict[str, Any]]:
    """Each daemon variant (``--only``: some) with ``--set`` applied (a variant's own
    settings win); the paused ones paired with ``paired_round``."""
    runs = {}
    for label, variant in daemon_variants(cfg.kafka.poll_max_records).items():
        if args.only and variant.name not in args.only:
            continue
        console.print(f"all-in-one daemon: {label} ...")
        variant_cfg = daemon_variant(
            cfg, variant.name, workdir, **{**dict(args.set), **variant.settings}
        )
        profile = workdir / f"{variant.name}.profile.txt" if args.profile else None
        runs[label] = run_daemon(
            variant_cfg,
            prompts_file,
            workdir / variant.name,
            args.repeats,
            paired_round if variant.paired else None,
            profile,
        )
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--prompts", type=int, default=512)
    parser.add_argument(
        "--repeats", type=int, default=3, help="rounds of the prompts; medians count"
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/daemon.json"))
    parser.add_argument("--workdir", type=Path, default=Path("runs/bench-daemon"))
    parser.add_argument(
        "--only",
        action="append",
        choices=VARIANT_NAMES,
        help="run only these daemon variants; repeatable",
    )
    parser.add_argument(
        "--set",
        action="append",
        type=setting,
        default=[],
        metavar="KEY=VALUE",
        help="a config setting (dotted key, YAML value) for every daemon, e.g. "
        "generation.max_prompts_in_flight=64; a variant's own settings win",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="record each daemon with py-spy "
        "(pip install py-spy) into WORKDIR/NAME.profile.txt (collapsed stacks, by thread)",
    )
    args = parser.parse_args()
    console = Console(width=160)  # the table whole, in a log too
    workdir = args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    model_path = resolve_model(args.model)
    with EmbeddedBroker(log_path=workdir / "broker.log") as broker:
        cfg = bench_config(args.model, broker.bootstrap, workdir, port=9477)
        daemon_variant(cfg, "check", workdir, **dict(args.set))  # a bad --set fails now
        formatter = PromptFormatter.from_model(model_path, cfg.model)
        pool = tiny_prompts("train")
        records = [
            formatter.format(PromptRecord(id=f"b{i}", prompt=pool[i % len(pool)].prompt))
            for i in range(args.prompts)
        ]
        prompts_file = workdir / "prompts.jsonl"
        prompts_file.write_text(
            "".join(json.dumps({"id": r.id, "prompt": r.prompt}) + "\n" for r in records)
        )
        console.print("raw vLLM ...")
        raw_engine = VLLMGenerator(model_path, cfg.model, cfg.generation)
        try:
            plain = run_raw(cfg, model_path, records, args.repeats, raw_engine)
            params = SamplingParams.from_config(cfg.generation.sampling)
            runs = run_daemons(
                cfg,
                prompts_file,
                workdir,
                args,
                lambda: raw_round(raw_engine, records, cfg.kafka.poll_max_records, params),
                console,
            )
            console.print("serial RAFT ...")
            plain |= run_serial(cfg, model_path, records, workdir, raw_engine)
        finally:
            raw_engine.close()
    raw_tps = plain["raw_tokens"] / plain["raw_s"]
    split_s = plain["raw_on_generation_cores_s"]
    split_tps = plain["raw_on_generation_cores_tokens"] / split_s if split_s else None
    result = {
        "model": args.model,
        "prompts": args.prompts,
        "k": 4,
        "repeats": args.repeats,
        "settings": dict(args.set),
        "cpu": cpu_identity(),
        **plain,
        "raw_tokens_per_s": raw_tps,
        "raw_on_generation_cores_tokens_per_s": split_tps,
        "daemon": runs,
    }
    title = f"daemon vs plain alternatives ({args.model}, {args.prompts} prompts, K=4)"
    table = Table(title=title, caption=CAPTION)
    columns = (
        "run",
        "wall s",
        "samples/s",
        "tokens/s",
        "x raw",
        "x raw (its cores)",
        "x raw (paired rounds)",
    )
    swap_columns = ("stored->loaded p50 s", "->generated p50 s", "->delivered p50 s")
    for column in (*columns, "versions", *swap_columns):
        table.add_column(column, justify="right")
    table.add_row(
        "raw vLLM",
        f"{plain['raw_s']:.1f}",
        f"{plain['raw_samples'] / plain['raw_s']:.1f}",
        f"{raw_tps:.0f}",
        "1.00",
        "",
        "",
        "-",
        "-",
        "-",
        "-",
    )
    one_call_tps = plain["raw_one_call_tokens"] / plain["raw_one_call_s"]
    result["raw_one_call_tokens_per_s"] = one_call_tps
    table.add_row(
        "raw vLLM, all prompts in one call",
        f"{plain['raw_one_call_s']:.1f}",
        f"{plain['raw_samples'] / plain['raw_one_call_s']:.1f}",
        f"{one_call_tps:.0f}",
        f"{one_call_tps / raw_tps:.2f}",
        "",
        "",
        "-",
        "-",
        "-",
        "-",
    )
    if split_tps is not None:
        cores = ",".join(map(str, plain["raw_generation_cores"]))
        table.add_row(
            f"raw vLLM, cores {cores}",
            f"{split_s:.1f}",
            f"{plain['raw_samples'] / split_s:.1f}",
            f"{split_tps:.0f}",
            f"{split_tps / raw_tps:.2f}",
            "1.00",
            "",
            "-",
            "-",
            "-",
            "-",
        )
    table.add_row(
        "serial RAFT",
        f"{plain['serial_s']:.1f}",
        *([""] * 5),
        str(plain["serial_versions"]),
        *([""] * 3),
    )
    for label, run in runs.items():
        tps = run["daemon_tokens_per_s"]
        run["daemon_over_raw"] = tps / raw_tps
        run["daemon_over_raw_on_its_cores"] = tps / split_tps if split_tps else None
        medians = []  # stored -> loaded, -> generated, -> delivered
        for part in ("swap_to_loaded", "swap_latency", "swap_to_delivered"):
            seconds = run[f"{part}_s"]
            run[f"{part}_median_s"] = statistics.median(seconds) if seconds else None
            medians.append(f"{run[f'{part}_median_s']:.2f}" if seconds else "-")
        table.add_row(
            f"daemon: {label}",
            f"{run['daemon_s']:.1f}",
            f"{run['daemon_samples_per_s']:.1f}",
            f"{tps:.0f}",
            f"{tps / raw_tps:.2f}",
            f"{tps / split_tps:.2f}" if split_tps else "",
            f"{run['paired_over_raw']:.2f}" if run["paired_over_raw"] else "",
            f"{run['daemon_versions']} ({run['rollbacks']} rollbacks)",
            *medians,
        )
    console.print(table)
    if "pipelined, merged, training" in runs:  # the default on the CPU
        training = runs["pipelined, merged, training"]
        result["streaming_over_serial_wall"] = training["daemon_s"] / plain["serial_s"]
        console.print(f"streaming/serial wall: {result['streaming_over_serial_wall']:.2f}")
    if {"pipelined, paused", "one batch, paused"} <= runs.keys():
        speedup = (
            runs["pipelined, paused"]["daemon_tokens_per_s"]
            / runs["one batch, paused"]["daemon_tokens_per_s"]
        )
        result["pipelined_over_one_batch"] = speedup
        console.print(f"pipelined/one batch (paused): {speedup:.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

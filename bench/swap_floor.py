"""The engine's own part of an adapter swap on the CPU: vLLM alone, and beside training.

bench/daemon.py measures the daemon's swap, stored -> the first sample on the new version.
That is detection, the load (merged serving first lets the batches in flight finish),
waiting for the pipeline, and the first prompt's own sampling. This script times the
engine's part alone, driven as the generator drives it in its steady state (``swap``):
- the engine holds the daemon's default depth on one version: two batches of
  ``kafka.poll_max_records`` prompts (``generation.max_prompts_in_flight`` over that), K=4,
  started half a batch apart, the next going in as the oldest finishes;
- after 2-5 times one batch's time (``FEED_BATCHES``) a new version comes, is loaded with
  the generator's one-token probe, and a batch is sampled on it once there is room;
  the first of its prompts to finish ends the swap. Lighter than the daemon: it does not
  wait for the oldest batch's delivery, nor refill the engine meanwhile.

Swaps come in pairs with the same arrival moment and the same batches: one with the
engine alone, one beside LoRA training rounds on a thread pinned to the training core, as
the all-in-one daemon runs them on a CPU. The order is ABBA (balanced over an even
``--pairs``), and versions are trained one after another, so neither case always gets the
later version. "beside / alone, paired" is the median of each pair's ratio. The versions
are real: trained on the engine's own samples and stored, as the trainer does.

    python bench/swap_floor.py --serving merged   # tiny model, 12 pairs
    python bench/swap_floor.py --serving lora     # through vLLM's LoRA path
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import statistics
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent import futures
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from raft_stream.config import load_config
from raft_stream.data.models import resolve_model
from raft_stream.data.tiny_model import tiny_prompts
from raft_stream.generation.base import SamplingParams
from raft_stream.generation.engine_dtype import cpu_identity
from raft_stream.generation.vllm_backend import VLLMGenerator
from raft_stream.prompting import PromptFormatter
from raft_stream.raft import RaftSampler
from raft_stream.rewards.registry import build_safe_reward
from raft_stream.roles.cpu_split import BIND_ENV, bind_generation, pin_this_thread, split_cores
from raft_stream.roles.generator import PROBE, PROBE_PROMPT
from raft_stream.training.lora_trainer import LoRATrainer
from raft_stream.training.store import AdapterStore
from raft_stream.types import AdapterVersion, Sample

ALONE, BESIDE = "engine alone", "beside training"
ABBA = (ALONE, BESIDE, BESIDE, ALONE)
FEED_BATCHES = (2.0, 5.0)
"""How long the engine samples on the old version before the new one comes: uniform, in
times of one batch alone (measured first), so several have been refilled by then."""
POOL = 7
"""Distinct batches of prompts: six in turn on the old version, one on the new."""


class Training:
    """LoRA rounds on ``samples``, back to back, on a thread pinned to ``cores``; ``stop``
    raises what a round raised."""

    def __init__(self, trainer: LoRATrainer, samples: list[Sample], cores: tuple[int, ...]):
        self.rounds = 0
        self.started = threading.Event()
        self._stop = threading.Event()
        self._error: BaseException | None = None

        def run() -> None:
            try:
                pin_this_thread(cores)
                self.started.set()
                while not self._stop.is_set():
                    trainer.train(samples)
                    self.rounds += 1
            except BaseException as err:
                self._error = err
                self.started.set()

        self._thread = threading.Thread(target=run, name="bench-training", daemon=True)
        self._thread.start()

    def stop(self) -> int:
        """Stop after the round under way; returns the rounds finished."""
        self._stop.set()
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self.rounds


def on_cores(cores: tuple[int, ...], work: Callable[[], Any]) -> Any:
    """``work()`` on a thread pinned to ``cores``; its result, or what it raised."""

    def pinned() -> Any:
        pin_this_thread(cores)
        return work()

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(pinned).result()


def swap(
    engine: VLLMGenerator,
    old: AdapterVersion,
    new: AdapterVersion,
    pool: list[list[str]],
    new_batch: list[str],
    depth: int,
    stagger_s: float,
    feed_s: float,
    params: SamplingParams,
    probe: str,
) -> dict[str, Any]:
    """One swap from ``old`` to ``new`` in the daemon's steady state: ``depth`` batches
    of ``pool`` (in turn, the same sequence every swap) on ``old``, the next going in as
    the oldest finishes, started ``stagger_s`` apart; after ``feed_s`` the new version
    is loaded with the generator's probe, and ``new_batch`` goes in once there is room
    (merged: the batches in flight are already done; LoRA: the oldest finishes). The
    batches in flight are not refilled meanwhile, as the daemon would refill them.
    Returns loaded_s, first_sample_s (came -> the first of ``new_batch``'s prompts done)
    and the refills."""
    turn = itertools.cycle(pool)
    in_flight = deque([engine.submit(next(turn), params, old)])
    for _ in range(depth - 1):
        time.sleep(stagger_s)
        in_flight.append(engine.submit(next(turn), params, old))
    refills = 0
    deadline = time.monotonic() + feed_s
    while (left := deadline - time.monotonic()) > 0:
        futures.wait([in_flight[0]], timeout=left)
        while in_flight and in_flight[0].done():
            in_flight.popleft().result()
            in_flight.append(engine.submit(next(turn), params, old))
            refills += 1
    came, came_wall = time.perf_counter(), time.time()
    engine.generate([probe], PROBE, new)  # the generator's load
    loaded = time.perf_counter() - came
    in_flight.popleft().result()  # room for the new batch, as the daemon waits for it
    outputs = engine.generate(new_batch, params, new)
    finished = [c.generated_at for row in outputs for c in row]
    if any(at is None for at in finished):
        raise RuntimeError("vLLM did not say when a request finished (generated_at)")
    first = min(at for at in finished if at is not None) - came_wall
    for future in in_flight:
        future.result()
    return {"loaded_s": round(loaded, 4), "first_sample_s": round(first, 4), "refills": refills}


def positive(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="a built-in model's name or a folder")
    parser.add_argument("--pairs", type=positive, default=12, help="swap pairs (alone, beside)")
    parser.add_argument("--serving", choices=("auto", "lora", "merged"), default="auto")
    parser.add_argument(
        "--out", type=Path, help="default: bench/results/swap_floor_<lora|merged>.json"
    )
    args = parser.parse_args()

    cfg = load_config(
        overrides={
            "model.name_or_path": args.model,
            "model.max_model_len": 256,
            "generation.sampling.k": 4,
            "generation.adapter_serving": args.serving,
            "ranking.min_response_tokens": 1,
        }
    )
    split = split_cores(cfg.training.cpu_cores)
    if split is None:
        raise SystemExit(
            "this measures the all-in-one daemon's CPU split of vLLM and training: it needs "
            f"2 or more cores and {BIND_ENV} unset"
        )
    bind_generation(split)  # before the engine starts, as the daemon does
    size = cfg.kafka.poll_max_records
    depth = max(1, cfg.generation.max_prompts_in_flight // size)
    model_path = str(resolve_model(args.model))
    formatter = PromptFormatter.from_model(model_path, cfg.model)
    prompts = [p.text for p in map(formatter.format, tiny_prompts("train", POOL * size))]
    batches = [prompts[i * size : (i + 1) * size] for i in range(POOL)]
    pool, new_batch = batches[:-1], batches[-1]
    params = SamplingParams.from_config(cfg.generation.sampling)
    probe = formatter.text(PROBE_PROMPT)
    swaps = 2 * args.pairs
    rng = random.Random(0)
    feed = [rng.uniform(*FEED_BATCHES) for _ in range(args.pairs)]
    rows: list[dict[str, Any]] = []
    console = Console(width=140)
    engine = VLLMGenerator(model_path, cfg.model, cfg.generation)
    try:
        batch_s = []  # the machine's speed now: one batch alone on the base model
        for _ in range(4):
            started = time.perf_counter()
            engine.generate(new_batch, params)
            batch_s.append(time.perf_counter() - started)
        batch_s = batch_s[1:]  # the first warms up
        batch_median_s = statistics.median(batch_s)
        sampler = RaftSampler(engine, build_safe_reward(cfg.reward), cfg.ranking, params)
        samples = sampler.run([formatter.format(p) for p in tiny_prompts("train", size)], None)
        kept = samples.selection.kept
        trainer = LoRATrainer(model_path, cfg.training)
        with tempfile.TemporaryDirectory() as tmp:
            store = AdapterStore(Path(tmp), base_model=model_path, keep_last=swaps + 1)
            with store:
                console.print(f"training {swaps + 1} versions ...")

                def train_versions() -> list[AdapterVersion]:
                    versions = []
                    for _ in range(swaps + 1):
                        trainer.train(kept)
                        versions.append(store.write(trainer.save, {}))
                    return versions

                versions = on_cores(split.training, train_versions)
                engine.generate([probe], PROBE, versions[0])
                for n in range(swaps):
                    case = ABBA[n % 4]
                    training = Training(trainer, kept, split.training) if case == BESIDE else None
                    rounds = None
                    try:
                        if training is not None:
                            training.started.wait()
                        row = swap(
                            engine,
                            versions[n],
                            versions[n + 1],
                            pool,
                            new_batch,
                            depth,
                            batch_median_s / depth,
                            feed[n // 2] * batch_median_s,
                            params,
                            probe,
                        )
                    finally:
                        if training is not None:
                            rounds = training.stop()
                    rows.append(
                        {
                            "pair": n // 2,
                            "case": case,
                            "feed_s": round(feed[n // 2] * batch_median_s, 3),
                            **row,
                            "training_rounds": rounds,
                        }
                    )
    finally:
        engine.close()

    by_case = {case: [r for r in rows if r["case"] == case] for case in (ALONE, BESIDE)}
    pairs = {(r["pair"], r["case"]): r["first_sample_s"] for r in rows}
    paired = statistics.median(pairs[p, BESIDE] / pairs[p, ALONE] for p in range(args.pairs))
    table = Table(
        title=f"A version swap in vLLM with {depth} batches of {size} prompts in flight "
        f"({engine.adapter_serving}), {Path(model_path).name}, K={params.n}, "
        f"{args.pairs} pairs (medians)"
    )
    for column in ("case", "came -> loaded s", "came -> first sample s"):
        table.add_column(column, justify="right")
    report: dict[str, Any] = {
        "model": Path(model_path).name,
        "serving": engine.adapter_serving,
        "batches_in_flight": depth,
        "prompts_per_batch": size,
        "k": params.n,
        "pairs": args.pairs,
        "feed_batches": FEED_BATCHES,
        "cores": {"generation": split.generation, "training": split.training},
        "cpu": cpu_identity(),
        "one_batch_alone_median_s": round(batch_median_s, 4),
        "beside_over_alone_paired_median": round(paired, 3),
        "swaps": rows,
    }
    for case, case_rows in by_case.items():
        loaded_s = statistics.median(r["loaded_s"] for r in case_rows)
        first_s = statistics.median(r["first_sample_s"] for r in case_rows)
        table.add_row(case, f"{loaded_s:.3f}", f"{first_s:.3f}")
        report[case] = {
            "loaded_median_s": round(loaded_s, 4),
            "first_sample_median_s": round(first_s, 4),
        }
    console.print(table)
    per_swap = [r["training_rounds"] for r in by_case[BESIDE]]
    refills = [r["refills"] for r in rows]
    print(
        f"beside / alone, first sample, paired: {paired:.2f}x; training rounds finished per "
        f"swap: {min(per_swap)}-{max(per_swap)}; batches refilled before the version came: "
        f"{min(refills)}-{max(refills)}; one batch alone: {batch_median_s:.3f} s"
    )
    out = args.out or Path(f"bench/results/swap_floor_{engine.adapter_serving}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

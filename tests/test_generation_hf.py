"""TransformersGenerator on the real tiny model: shapes, token counts, seeding, adapters."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from raft_stream.config import GenerationConfig, ModelConfig
from raft_stream.errors import AdapterError
from raft_stream.generation.base import MAX_LORAS, SamplingParams
from raft_stream.generation.hf_backend import TransformersGenerator
from raft_stream.types import AdapterVersion, Completion

PROMPTS = ["the movie was", "honestly, the soundtrack was", "i thought the plot was"]


def _generator(model_dir: Path) -> TransformersGenerator:
    # batch_size 2 < len(PROMPTS): every call spans two batches with different padding.
    return TransformersGenerator(str(model_dir), ModelConfig(), GenerationConfig(batch_size=2))


def drawn(results: list[list[Completion]]) -> list[list[tuple[str, tuple[int, ...]]]]:
    """What was sampled (the log-probs beside it may differ in the last float bits)."""
    return [[(c.text, c.token_ids) for c in per_prompt] for per_prompt in results]


@pytest.fixture(scope="module")
def generator(tiny_model_dir: Path) -> TransformersGenerator:
    return _generator(tiny_model_dir)


def test_returns_n_completions_per_prompt_within_max_new_tokens(
    generator: TransformersGenerator,
) -> None:
    started = time.time()
    results = generator.generate(PROMPTS, SamplingParams(n=3, max_new_tokens=6, seed=0))

    assert [len(per_prompt) for per_prompt in results] == [3, 3, 3]
    counts = [c.num_tokens for per_prompt in results for c in per_prompt]
    assert all(1 <= count <= 6 for count in counts)
    assert generator.last_stats is not None
    assert generator.last_stats.tokens == sum(counts)
    assert generator.last_stats.completions == 9
    # Each completion says when its generate() call returned (a batch finishes together).
    stamps = [c.generated_at for per_prompt in results for c in per_prompt]
    assert all(s is not None and started < s <= time.time() for s in stamps)


def test_token_counts_include_eos_and_exclude_padding(generator: TransformersGenerator) -> None:
    params = SamplingParams(n=4, max_new_tokens=40, seed=1)
    completions = [c for per_prompt in generator.generate(PROMPTS, params) for c in per_prompt]
    token_ids = [list(c.token_ids) for c in completions]

    assert [c.num_tokens for c in completions] == [len(ids) for ids in token_ids]
    pad = generator.tokenizer.pad_token_id
    assert all(pad not in ids for ids in token_ids)
    stopped = [
        ids for ids, c in zip(token_ids, completions, strict=True) if c.finish_reason == "stop"
    ]
    assert stopped, "the tiny model ends its sentences within 40 tokens"
    assert all(ids[-1] in generator.eos_ids for ids in stopped)
    assert all(not set(ids[:-1]) & generator.eos_ids for ids in stopped)


def test_seeded_sampling_is_reproducible(generator: TransformersGenerator) -> None:
    params = SamplingParams(n=4, max_new_tokens=12, seed=7)

    first = generator.generate(PROMPTS, params)

    assert generator.generate(PROMPTS, params) == first
    assert generator.generate(PROMPTS, SamplingParams(n=4, max_new_tokens=12, seed=8)) != first


def test_greedy_returns_n_identical_completions(generator: TransformersGenerator) -> None:
    results = generator.generate(PROMPTS, SamplingParams(n=3, max_new_tokens=8, temperature=0.0))

    assert all(len(set(per_prompt)) == 1 and len(per_prompt) == 3 for per_prompt in results)


def test_adapter_versions_change_samples_and_switching_back_reproduces(
    generator: TransformersGenerator, tiny_lora_adapters: list[AdapterVersion]
) -> None:
    v1, v2, _ = tiny_lora_adapters
    params = SamplingParams(n=4, max_new_tokens=16, seed=3)

    base = drawn(generator.generate(PROMPTS, params))
    first = drawn(generator.generate(PROMPTS, params, v1))
    second = drawn(generator.generate(PROMPTS, params, v2))

    assert first != base and second != base and first != second
    assert drawn(generator.generate(PROMPTS, params, v1)) == first
    assert drawn(generator.generate(PROMPTS, params)) == base


def test_evicts_least_recently_used_adapter_beyond_max_loras(
    tiny_model_dir: Path, tiny_lora_adapters: list[AdapterVersion]
) -> None:
    generator = _generator(tiny_model_dir)
    v1, v2, v3 = tiny_lora_adapters
    params = SamplingParams(n=1, max_new_tokens=2, seed=0)

    for adapter in (v1, v2, v1, v3):  # v2 is now the least recently used
        generator.generate(PROMPTS[:1], params, adapter)

    assert MAX_LORAS == 2
    assert generator.peft_model is not None
    loaded = {name.split("-")[0] for name in generator.peft_model.peft_config}
    assert loaded == {"v1", "v3"}


def test_reports_adapter_load_time_only_on_first_use(
    generator: TransformersGenerator, tiny_lora_adapters: list[AdapterVersion]
) -> None:
    v3 = tiny_lora_adapters[2]
    params = SamplingParams(n=1, max_new_tokens=2, seed=0)

    generator.generate(PROMPTS[:1], params, v3)
    assert generator.last_stats is not None and generator.last_stats.adapter_load_s > 0
    generator.generate(PROMPTS[:1], params, v3)
    assert generator.last_stats.adapter_load_s == 0


def test_raises_adapter_error_when_folder_is_missing(
    generator: TransformersGenerator, tmp_path: Path
) -> None:
    missing = AdapterVersion(9, tmp_path / "nowhere", "", "tiny", 0.0)

    with pytest.raises(AdapterError, match=r"could not load adapter v9 from .*nowhere"):
        generator.generate(PROMPTS, SamplingParams(n=1, max_new_tokens=2), missing)


def test_a_version_number_seen_again_from_another_folder_serves_the_new_weights(
    generator: TransformersGenerator, tiny_lora_adapters: list[AdapterVersion]
) -> None:
    # A fresh adapter store (or a test's fresh run) numbers its versions from 1 again: the
    # engine must serve the new v1's weights, not the ones it cached under that number.
    v1, v2, _ = tiny_lora_adapters
    params = SamplingParams(n=2, max_new_tokens=12, seed=4)
    old = generator.generate(PROMPTS, params, v1)
    new = generator.generate(PROMPTS, params, v2)
    renumbered = AdapterVersion(1, v2.path, "other-store", v2.base_model, 0.0)

    assert drawn(generator.generate(PROMPTS, params, renumbered)) == drawn(new) != drawn(old)
    assert drawn(generator.generate(PROMPTS, params, v1)) == drawn(old)

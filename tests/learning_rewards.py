"""Rewards of our own for the learning tests, importable by dotted path
(``tests.learning_rewards:praise_count``), written the way RAFT users write them: a plain
``reward_of(text) -> float``."""

from __future__ import annotations

import re

from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

PRAISE = frozenset(
    [
        "good",
        "great",
        "fun",
        "funny",
        "lovely",
        "perfect",
        "superb",
        "brilliant",
        "wonderful",
        "excellent",
        "amazing",
        "beautiful",
        "enjoyed",
        "loved",
        "joy",
        "treat",
        "recommend",
        "happily",
        "clever",
        "charming",
    ]
)
SCORN = frozenset(
    [
        "bad",
        "awful",
        "dull",
        "boring",
        "terrible",
        "weak",
        "poor",
        "lazy",
        "messy",
        "stupid",
        "ugly",
        "waste",
        "hated",
        "disaster",
        "bored",
        "regret",
        "painful",
        "annoying",
    ]
)
_WORDS = re.compile(r"[a-z']+")
_VADER = SentimentIntensityAnalyzer()


def praise_count(text: str) -> float:
    """Words of praise minus words of scorn in the response: a word-count reward."""
    words = _WORDS.findall(text.lower())
    return float(sum(w in PRAISE for w in words) - sum(w in SCORN for w in words))


def short_and_positive(text: str) -> float:
    """VADER's compound score minus 0.05 for each word past the eighth: positive, but
    rewarded for getting to the point (a length-penalised reward)."""
    words = len(text.split())
    return _VADER.polarity_scores(text)["compound"] - 0.05 * max(0, words - 8)

"""Rewards for the promotion-gate tests, importable by dotted path."""

from __future__ import annotations

import re
from collections import Counter

from raft_stream.data.tiny_model import (
    ADVERBS,
    NEGATIVE,
    NEGATIVE_CLOSINGS,
    OPENERS,
    POSITIVE,
    POSITIVE_CLOSINGS,
    SUBJECTS,
)


def repeats_one_word(text: str) -> float:
    """Pays for saying one word over and over: a reward a policy can hack by collapsing
    into repetition (the count of the response's most frequent word)."""
    words = re.findall(r"[a-z']+", text.lower())
    return float(max(Counter(words).values())) if words else 0.0


_VOCABULARY = (
    *("and", "the", "was", "but", *ADVERBS, *SUBJECTS, *OPENERS, *POSITIVE, *NEGATIVE),
    *(*POSITIVE_CLOSINGS, *NEGATIVE_CLOSINGS),
)
_GRAMMAR = frozenset(re.findall(r"[a-z']+", " ".join(_VOCABULARY)))


def speaks_the_grammar(text: str) -> float:
    """The share of the response's words that the tiny model's training grammar uses
    (raft_stream.data.tiny_model): about 1 for the base model, far less for an adapter
    that scrambles it."""
    words = re.findall(r"[a-z']+", text.lower())
    return sum(word in _GRAMMAR for word in words) / len(words) if words else 0.0

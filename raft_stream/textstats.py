"""Diversity statistics of generated text (the reward-hacking watch)."""

from __future__ import annotations

from collections.abc import Iterable


def distinct_n(texts: Iterable[str], n: int) -> float:
    """Unique word n-grams over all word n-grams across ``texts``; 0.0 when there are none.

    Example: ``distinct_n(["a b a b"], 2)`` is 2/3 (ab, ba, ab).
    """
    total = 0
    unique: set[tuple[str, ...]] = set()
    for text in texts:
        words = text.split()
        grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
        total += len(grams)
        unique.update(grams)
    return len(unique) / total if total else 0.0

"""Rewards for the promotion-gate tests, importable by dotted path."""

from __future__ import annotations

import re
from collections import Counter


def repeats_one_word(text: str) -> float:
    """Pays for saying one word over and over: a reward a policy can hack by collapsing
    into repetition (the count of the response's most frequent word)."""
    words = re.findall(r"[a-z']+", text.lower())
    return float(max(Counter(words).values())) if words else 0.0

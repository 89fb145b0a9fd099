"""Sentiment rewards on held-out Rotten Tomatoes snippets: VADER against the learned head.

Both rewards score the same held-out snippets (``reviews.split_snippets``; the learned head
never saw them) through raft-stream's own reward classes. Accuracy is the share of snippets
whose reward has the sign of their mean human rating (a zero reward counts half), over
every non-neutral held-out snippet and over the clearly polar ones (|rating| >= 1). Speed
is texts per second of wall time for one pass over all of them, after a warm-up call. The
first run trains and caches the learned head (minutes on 2 cores); later runs load it.

    python bench/rewards.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from raft_stream.data.reviews import Snippet, split_snippets
from raft_stream.rewards.base import TextReward
from raft_stream.rewards.learned import LearnedSentimentReward, sign_accuracy
from raft_stream.rewards.sentiment import VaderReward

CLEAR_RATING = 1.0
"""Snippets with |rating| at least this are "clearly polar"."""


@dataclass
class Result:
    reward: str
    texts: int
    seconds: float
    texts_per_s: float
    accuracy: float
    accuracy_clear: float
    setup_s: float


def measure(name: str, build: Callable[[], TextReward], snippets: list[Snippet]) -> Result:
    """Build the reward, warm it up, then score every snippet once."""
    started = time.perf_counter()
    reward = build()
    setup_s = time.perf_counter() - started
    texts, prompts = [s.text for s in snippets], [""] * len(snippets)
    reward(prompts[:32], texts[:32])  # warm-up: lazy initialisation, allocator, caches
    started = time.perf_counter()
    rewards = reward(prompts, texts)
    seconds = time.perf_counter() - started
    clear = [i for i, s in enumerate(snippets) if abs(s.rating) >= CLEAR_RATING]
    return Result(
        reward=name,
        texts=len(texts),
        seconds=round(seconds, 3),
        texts_per_s=round(len(texts) / seconds, 1),
        accuracy=round(sign_accuracy(rewards, snippets), 4),
        accuracy_clear=round(
            sign_accuracy([rewards[i] for i in clear], [snippets[i] for i in clear]), 4
        ),
        setup_s=round(setup_s, 1),
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/rewards.json"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    train, heldout = split_snippets()
    polar = [s for s in heldout if s.rating != 0]
    load_1m = os.getloadavg()[0]  # a busy machine slows the learned reward most: record it
    results = [
        measure("sentiment (VADER)", VaderReward, polar),
        measure("learned_sentiment", LearnedSentimentReward, polar),
    ]

    clear_count = sum(abs(s.rating) >= CLEAR_RATING for s in polar)
    table = Table(
        title=f"{len(polar)} held-out snippets ({clear_count} with |rating| >= {CLEAR_RATING})"
    )
    for column in ("reward", "accuracy", "accuracy |rating|>=1", "texts/s", "setup s"):
        table.add_column(column, justify="right")
    for r in results:
        table.add_row(
            r.reward,
            f"{r.accuracy:.3f}",
            f"{r.accuracy_clear:.3f}",
            f"{r.texts_per_s:,.0f}",
            f"{r.setup_s:.1f}",
        )
    Console().print(table)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "train_snippets": len(train),
        "heldout_snippets": len(polar),
        "heldout_clear_snippets": clear_count,
        "clear_rating": CLEAR_RATING,
        "reward_learned": "2 * P(positive) - 1",
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "load_avg_1m_at_start": round(load_1m, 2),
        "machine": platform.machine(),
        "results": [asdict(r) for r in results],
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

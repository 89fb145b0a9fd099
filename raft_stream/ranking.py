"""RAFT's selection step: reject ill-behaved samples, then keep the best.

Local ranking keeps the best of each prompt's K (best-of-K); global ranking keeps the top
share of the whole batch, as in the RAFT paper's global variant.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

from raft_stream.config import RankingConfig
from raft_stream.reasons import BELOW_THRESHOLD, DUPLICATE, NOT_SELECTED, TOO_LONG, TOO_SHORT
from raft_stream.reasons import REWARD_NONFINITE as NON_FINITE
from raft_stream.types import Sample

__all__ = [
    "BELOW_THRESHOLD",
    "DUPLICATE",
    "NON_FINITE",
    "NOT_SELECTED",
    "TOO_LONG",
    "TOO_SHORT",
    "Selection",
    "select",
]


@dataclass
class Selection:
    """The outcome of ranking one batch."""

    kept: list[Sample] = field(default_factory=list)
    rejected: list[Sample] = field(default_factory=list)

    @property
    def rejected_by_reason(self) -> Counter[str]:
        return Counter(s.reject_reason or "unknown" for s in self.rejected)


def _filter_reason(sample: Sample, cfg: RankingConfig, seen: set[tuple[str, str]]) -> str | None:
    if sample.reject_reason is not None:  # e.g. the reward function failed
        return sample.reject_reason
    if sample.reward is None or not math.isfinite(sample.reward):
        return NON_FINITE
    if sample.response_tokens < cfg.min_response_tokens or not sample.response.strip():
        return TOO_SHORT
    if cfg.max_response_tokens is not None and sample.response_tokens > cfg.max_response_tokens:
        return TOO_LONG
    if cfg.min_reward is not None and sample.reward < cfg.min_reward:
        return BELOW_THRESHOLD
    key = (sample.prompt_id, sample.response.strip())
    if cfg.drop_duplicates and key in seen:
        return DUPLICATE
    seen.add(key)
    return None


def _order_key(sample: Sample) -> tuple[float, str, str]:
    # Highest reward first; ties broken by content so the result never depends on arrival order.
    assert sample.reward is not None
    return (-sample.reward, sample.prompt_id, sample.response)


def select(samples: Iterable[Sample], cfg: RankingConfig, k: int) -> Selection:
    """Filter and rank one batch of samples (K per prompt).

    Kept samples get ``rank`` 0..n-1 (within their prompt for local mode, within the batch
    for global mode); rejected ones get ``reject_reason``.
    """
    batch = list(samples)
    selection = Selection()
    seen: set[tuple[str, str]] = set()
    candidates: list[Sample] = []
    for sample in batch:
        reason = _filter_reason(sample, cfg, seen)
        if reason is None:
            candidates.append(sample)
        else:
            sample.reject_reason = reason
            selection.rejected.append(sample)

    if cfg.mode == "local":
        by_prompt: dict[str, list[Sample]] = defaultdict(list)
        for sample in candidates:
            by_prompt[sample.prompt_id].append(sample)
        groups = [sorted(group, key=_order_key) for group in by_prompt.values()]
        quota = cfg.keep_per_prompt
    else:
        groups = [sorted(candidates, key=_order_key)]
        # The share is of the whole batch (as in the paper), so filtered samples still count.
        ratio = cfg.keep_ratio if cfg.keep_ratio is not None else 1.0 / k
        quota = max(1, round(len(batch) * ratio)) if candidates else 0

    for group in groups:
        for position, sample in enumerate(group):
            if position < quota:
                sample.rank = position
                selection.kept.append(sample)
            else:
                sample.reject_reason = NOT_SELECTED
                selection.rejected.append(sample)
    return selection

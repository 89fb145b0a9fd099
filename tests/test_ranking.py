"""RAFT selection: filters with their reasons, local best-of-K and global top share."""

from __future__ import annotations

import math

from raft_stream.config import RankingConfig
from raft_stream.ranking import (
    BELOW_THRESHOLD,
    DUPLICATE,
    NON_FINITE,
    NOT_SELECTED,
    TOO_LONG,
    TOO_SHORT,
    select,
)
from raft_stream.types import Sample


def make(prompt_id: str, response: str, reward: float | None, tokens: int = 10) -> Sample:
    return Sample(
        prompt_id=prompt_id,
        prompt=f"prompt {prompt_id}",
        prompt_text=f"prompt {prompt_id}",
        response=response,
        response_tokens=tokens,
        adapter_version=0,
        reward=reward,
    )


def test_local_mode_keeps_the_best_of_each_prompt() -> None:
    samples = [make("a", f"a{i}", r) for i, r in enumerate([0.1, 0.9, 0.5])]
    samples += [make("b", f"b{i}", r) for i, r in enumerate([-0.2, -0.1, -0.9])]
    selection = select(samples, RankingConfig(mode="local", min_response_tokens=0), k=3)
    assert sorted((s.prompt_id, s.reward) for s in selection.kept) == [("a", 0.9), ("b", -0.1)]
    assert all(s.rank == 0 for s in selection.kept)
    assert selection.rejected_by_reason == {NOT_SELECTED: 4}


def test_local_mode_keeps_several_per_prompt_in_rank_order() -> None:
    samples = [make("a", f"a{i}", r) for i, r in enumerate([0.1, 0.9, 0.5, 0.7])]
    selection = select(samples, RankingConfig(keep_per_prompt=2, min_response_tokens=0), k=4)
    assert [(s.reward, s.rank) for s in selection.kept] == [(0.9, 0), (0.7, 1)]


def test_global_mode_keeps_the_top_share_of_the_whole_batch() -> None:
    # Prompt a is good across the board, b bad: global ranking may keep none of b.
    samples = [make("a", f"a{i}", 0.5 + i / 10) for i in range(4)]
    samples += [make("b", f"b{i}", -0.5 - i / 10) for i in range(4)]
    selection = select(samples, RankingConfig(mode="global", min_response_tokens=0), k=4)
    assert [s.reward for s in selection.kept] == [0.8, 0.7]  # 8 samples * 1/K = 2
    assert [s.rank for s in selection.kept] == [0, 1]


def test_global_mode_honours_keep_ratio() -> None:
    samples = [make("a", f"a{i}", i / 10) for i in range(10)]
    cfg = RankingConfig(mode="global", keep_ratio=0.3, min_response_tokens=0)
    assert len(select(samples, cfg, k=10).kept) == 3


def test_rejects_each_ill_behaved_sample_with_its_reason() -> None:
    samples = [
        make("a", "fine answer", 0.5),
        make("a", "short", 0.9, tokens=1),
        make("a", "very long answer", 0.9, tokens=500),
        make("a", "not a number", math.nan),
        make("a", "infinite", math.inf),
        make("a", "unscored", None),
        make("a", "low", -0.9),
        make("a", "fine answer", 0.5),
    ]
    cfg = RankingConfig(
        min_response_tokens=4, max_response_tokens=100, min_reward=-0.5, keep_per_prompt=8
    )
    selection = select(samples, cfg, k=8)
    assert [s.response for s in selection.kept] == ["fine answer"]
    assert selection.rejected_by_reason == {
        TOO_SHORT: 1,
        TOO_LONG: 1,
        NON_FINITE: 3,
        BELOW_THRESHOLD: 1,
        DUPLICATE: 1,
    }


def test_reward_failures_keep_their_own_reason() -> None:
    failed = make("a", "anything", None)
    failed.reject_reason = "reward_timeout"
    selection = select([failed, make("a", "ok", 0.1)], RankingConfig(min_response_tokens=0), k=2)
    assert selection.rejected_by_reason == {"reward_timeout": 1}


def test_duplicates_are_allowed_when_turned_off() -> None:
    samples = [make("a", "same", 0.5), make("a", "same", 0.5)]
    cfg = RankingConfig(drop_duplicates=False, keep_per_prompt=2, min_response_tokens=0)
    assert len(select(samples, cfg, k=2).kept) == 2


def test_ties_are_broken_by_content_not_arrival_order() -> None:
    forward = [make("a", "zeta", 0.5), make("a", "alpha", 0.5)]
    backward = [make("a", "alpha", 0.5), make("a", "zeta", 0.5)]
    cfg = RankingConfig(min_response_tokens=0)
    assert select(forward, cfg, k=2).kept[0].response == "alpha"
    assert select(backward, cfg, k=2).kept[0].response == "alpha"

"""The top-k reward buffer: bounded in size and age, ordered, persistent, signals a full
streaming batch."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from raft_stream.buffer import RewardBuffer, check_reward, mean_reward
from raft_stream.errors import MessageError
from raft_stream.stream.schema import dumps, encode_sample
from raft_stream.types import Sample


def make(i: int, reward: float, version: int = 1) -> Sample:
    return Sample(
        prompt_id=f"p{i}",
        prompt="p",
        prompt_text="p",
        response=f"r{i}",
        response_tokens=5,
        adapter_version=version,
        reward=reward,
    )


def test_keeps_only_the_highest_rewards_when_full() -> None:
    buffer = RewardBuffer(capacity=3, batch_size=2)
    dropped = buffer.add([make(i, r) for i, r in enumerate([0.1, 0.9, 0.5, 0.7, -0.3])])
    assert [s.reward for s in buffer.snapshot()] == [0.9, 0.7, 0.5]
    assert sorted(s.reward for s in dropped) == [-0.3, 0.1]
    assert buffer.evicted == {"stale": 0, "capacity": 2}


def test_refuses_unscored_samples() -> None:
    buffer = RewardBuffer(capacity=3, batch_size=1)
    buffer.add([make(0, float("nan"))])
    assert len(buffer) == 0


def test_signals_a_streaming_batch_once_batch_size_samples_wait() -> None:
    buffer = RewardBuffer(capacity=10, batch_size=3)
    buffer.add([make(0, 0.1), make(1, 0.2)])
    assert not buffer.batch_ready()
    buffer.add([make(2, 0.3)])
    assert buffer.batch_ready()


def test_batch_is_the_best_samples_and_leaves_after_remove() -> None:
    buffer = RewardBuffer(capacity=10, batch_size=2)
    buffer.add([make(i, i / 10) for i in range(5)])
    batch = buffer.peek_batch()
    assert [s.reward for s in batch] == [0.4, 0.3]
    buffer.remove(batch)
    assert [s.reward for s in buffer.snapshot()] == [0.2, 0.1, 0.0]


def test_equal_rewards_order_by_content_whatever_the_arrival_order() -> None:
    a, b = RewardBuffer(4, 1), RewardBuffer(4, 1)
    a.add([make(1, 0.5), make(2, 0.5)])
    b.add([make(2, 0.5), make(1, 0.5)])
    assert [s.prompt_id for s in a.snapshot()] == [s.prompt_id for s in b.snapshot()]


def test_a_restart_reloads_the_saved_buffer(tmp_path: Path) -> None:
    path = tmp_path / "buffer.jsonl"
    buffer = RewardBuffer(capacity=5, batch_size=2, path=path)
    buffer.add([make(i, i / 10) for i in range(4)])
    buffer.save()
    reloaded = RewardBuffer(capacity=5, batch_size=2, path=path)
    assert reloaded.snapshot() == buffer.snapshot()


def test_save_leaves_no_temporary_file(tmp_path: Path) -> None:
    buffer = RewardBuffer(capacity=5, batch_size=2, path=tmp_path / "buffer.jsonl")
    buffer.add([make(0, 0.1)])
    buffer.save()
    assert [p.name for p in tmp_path.iterdir()] == ["buffer.jsonl"]


def test_rejects_a_batch_larger_than_capacity() -> None:
    with pytest.raises(ValueError, match=r"batch_size \(5\) must be <= capacity \(2\)"):
        RewardBuffer(capacity=2, batch_size=5)


def test_skips_a_redelivered_sample_of_the_same_prompt_response_and_version(
    tmp_path: Path,
) -> None:
    path = tmp_path / "buffer.jsonl"
    buffer = RewardBuffer(capacity=10, batch_size=2, path=path)
    buffer.add([make(0, 0.5), make(1, 0.4)])
    buffer.save()
    # The trainer restarts before committing: the persisted buffer and the redelivered
    # samples overlap, and a batch may even repeat a sample.
    reloaded = RewardBuffer(capacity=10, batch_size=2, path=path)
    other_version = make(0, 0.5)
    other_version.adapter_version = 2
    reloaded.add([make(0, 0.5), make(1, 0.4), make(1, 0.4), other_version])
    assert [(s.prompt_id, s.adapter_version) for s in reloaded.snapshot()] == [
        ("p0", 1),
        ("p0", 2),
        ("p1", 1),
    ]
    assert reloaded.duplicates == 3


def test_mean_reward_of_rewards_near_the_float_limit_does_not_overflow() -> None:
    # Before: statistics.fmean raised OverflowError in the trainer's loop for these two.
    buffer = RewardBuffer(capacity=5, batch_size=2)
    buffer.add([make(0, 1.7e308), make(1, 1.7e308)])
    assert buffer.mean_reward() == 1.7e308
    assert mean_reward([make(0, -1.7e308), make(1, 1.7e308), make(2, 3.0)]) == 1.0


def test_a_restart_skips_saved_rows_that_do_not_decode_or_are_out_of_range(
    tmp_path: Path,
) -> None:
    path = tmp_path / "buffer.jsonl"
    good = dumps(encode_sample(make(0, 0.5)))
    path.write_bytes(
        b"\n".join(
            [
                good,
                good.replace(b'"reward":0.5', b'"reward":1' + b"0" * 400),
                good.replace(b'"reward":0.5', b'"reward":1e300'),
                b'{"prompt_id": "p9"',
                good.replace(b'"p0"', b'"\\ud800"'),
                b"",
            ]
        )
    )
    reloaded = RewardBuffer(capacity=5, batch_size=2, path=path, reward_max=1.0)
    assert [(s.prompt_id, s.reward) for s in reloaded.snapshot()] == [("p0", 0.5)]
    assert reloaded.refused == 4


def test_raises_error_when_a_reward_is_outside_the_configured_bounds() -> None:
    buffer = RewardBuffer(capacity=5, batch_size=2, reward_min=-1.0, reward_max=1.0)
    with pytest.raises(MessageError, match=r"reward 1e\+300 is outside .*\(-1\.0\.\.1\.0\)"):
        buffer.check(make(0, 1e300))
    assert check_reward(1.0, -1.0, 1.0) == 1.0
    with pytest.raises(MessageError, match="not a finite number") as caught:
        check_reward(math.inf, None, None)
    assert caught.value.reason == "reward_out_of_bounds"
    assert buffer.add([make(0, 1e300), make(1, -2.0), make(2, 0.5)]) == []
    assert [s.prompt_id for s in buffer.snapshot()] == ["p2"] and buffer.refused == 2


# -- staleness: adapter versions between a sample's generator and the trainer's version -----


def test_refuses_and_counts_a_sample_older_than_max_staleness_on_add() -> None:
    evictions: list[tuple[str, int]] = []
    buffer = RewardBuffer(
        capacity=5,
        batch_size=1,
        max_staleness=4,
        version=6,
        on_evict=lambda reason, n: evictions.append((reason, n)),
    )
    dropped = buffer.add([make(0, 0.9, version=1), make(1, 0.5, version=2), make(2, 0.1, 6)])
    # Version 1 is 5 versions behind 6: too old. Version 2 is 4 behind: the bound, kept.
    assert dropped == []  # a valid message, just too old: counted, not returned to dead-letter
    assert [(s.prompt_id, buffer.staleness(s)) for s in buffer.snapshot()] == [
        ("p1", 4),
        ("p2", 0),
    ]
    assert buffer.evicted == {"stale": 1, "capacity": 0} and buffer.refused == 0
    assert evictions == [("stale", 1)]


def test_storing_a_new_version_evicts_the_samples_that_became_too_stale() -> None:
    buffer = RewardBuffer(capacity=10, batch_size=1, max_staleness=2, version=3)
    buffer.add([make(i, i / 10, version=i) for i in range(1, 4)])
    assert buffer.set_version(4) == [make(1, 0.1, version=1)]
    assert buffer.version == 4
    assert [s.adapter_version for s in buffer.snapshot()] == [3, 2]
    assert buffer.set_version(4) == []  # the same version again evicts nothing more
    assert buffer.evicted == {"stale": 1, "capacity": 0}


def test_max_staleness_zero_keeps_only_samples_of_the_newest_version() -> None:
    buffer = RewardBuffer(capacity=10, batch_size=1, max_staleness=0, version=2)
    buffer.add([make(0, 0.9, version=1), make(1, 0.1, version=2)])
    assert [s.prompt_id for s in buffer.snapshot()] == ["p1"]
    buffer.set_version(3)
    assert len(buffer) == 0


def test_none_turns_the_staleness_bound_off() -> None:
    buffer = RewardBuffer(capacity=5, batch_size=1, max_staleness=None, version=100)
    buffer.add([make(0, 0.9, version=0)])
    assert buffer.set_version(1000) == []
    assert buffer.staleness(buffer.snapshot()[0]) == 1000  # still measured, never evicted
    assert buffer.evicted == {"stale": 0, "capacity": 0}


def test_a_sample_of_a_newer_version_than_the_trainer_has_staleness_zero() -> None:
    # The store fell back to an older verified version: generators still serve the newer one.
    buffer = RewardBuffer(capacity=5, batch_size=1, max_staleness=0, version=3)
    buffer.add([make(0, 0.5, version=5)])
    assert [buffer.staleness(s) for s in buffer.snapshot()] == [0]


def test_a_high_reward_from_version_0_is_gone_once_its_staleness_passes_4() -> None:
    # Issue 9, case 8: the best reward of the base model stayed in the buffer for ever
    # while versions 1..6 were stored, and every round could train on it.
    # Lower rewards fill the rest: capacity never pushes the best one out.
    buffer = RewardBuffer(capacity=4, batch_size=2, max_staleness=4)
    buffer.add([make(0, 1.0, version=0)])
    held_after: dict[int, bool] = {}
    stale_at: dict[int, list[str]] = {}
    for version in range(1, 7):
        stale_at[version] = [s.prompt_id for s in buffer.set_version(version)]
        buffer.add([make(10 * version + i, 0.1 * i, version=version) for i in range(2)])
        held_after[version] = any(s.prompt_id == "p0" for s in buffer.snapshot())
    assert held_after == {1: True, 2: True, 3: True, 4: True, 5: False, 6: False}
    assert "p0" in stale_at[5]  # staleness 5 > 4, evicted as stale
    assert buffer.evicted["stale"] == sum(len(ids) for ids in stale_at.values())


def test_a_restart_evicts_saved_samples_too_stale_for_the_version_given(
    tmp_path: Path,
) -> None:
    path = tmp_path / "buffer.jsonl"
    saved = RewardBuffer(capacity=5, batch_size=1, path=path)
    saved.add([make(0, 0.9, version=1), make(1, 0.5, version=7)])
    saved.save()
    evictions: list[tuple[str, int]] = []
    reloaded = RewardBuffer(
        capacity=5,
        batch_size=1,
        path=path,
        max_staleness=4,
        version=8,
        on_evict=lambda reason, n: evictions.append((reason, n)),
    )
    assert [s.prompt_id for s in reloaded.snapshot()] == ["p1"]
    assert evictions == [("stale", 1)]


def test_capacity_evictions_are_reported_with_their_reason() -> None:
    evictions: list[tuple[str, int]] = []
    buffer = RewardBuffer(
        capacity=2, batch_size=1, on_evict=lambda reason, n: evictions.append((reason, n))
    )
    buffer.add([make(i, i / 10) for i in range(3)])
    assert evictions == [("capacity", 1)]


def test_raises_error_for_a_negative_staleness_bound_or_version() -> None:
    with pytest.raises(ValueError, match=r"max_staleness \(-1\) must be >= 0 .* or None"):
        RewardBuffer(capacity=2, batch_size=1, max_staleness=-1)
    with pytest.raises(ValueError, match=r"adapter version \(-2\) must be >= 0"):
        RewardBuffer(capacity=2, batch_size=1).set_version(-2)

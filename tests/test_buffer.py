"""The top-k reward buffer: bounded, ordered, persistent, signals a full streaming batch."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from raft_stream.buffer import RewardBuffer, check_reward, mean_reward
from raft_stream.errors import MessageError
from raft_stream.stream.schema import dumps, encode_sample
from raft_stream.types import Sample


def make(i: int, reward: float) -> Sample:
    return Sample(
        prompt_id=f"p{i}",
        prompt="p",
        prompt_text="p",
        response=f"r{i}",
        response_tokens=5,
        adapter_version=1,
        reward=reward,
    )


def test_keeps_only_the_highest_rewards_when_full() -> None:
    buffer = RewardBuffer(capacity=3, batch_size=2)
    dropped = buffer.add([make(i, r) for i, r in enumerate([0.1, 0.9, 0.5, 0.7, -0.3])])
    assert [s.reward for s in buffer.snapshot()] == [0.9, 0.7, 0.5]
    assert sorted(s.reward for s in dropped) == [-0.3, 0.1]
    assert buffer.evicted == 2


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

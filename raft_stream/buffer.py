"""The top-k reward buffer between ranking and training.

A bounded priority queue of kept samples waiting to be trained on. When it is full, the
lowest-reward sample goes (so when generation outpaces training, only the best survive and
memory stays bounded). A streaming batch is ready once ``batch_size`` samples wait; a
training round takes the best ``batch_size`` and they leave the buffer once the adapter
trained on them is stored.

Every reward it holds is finite and within ``reward_min..reward_max`` (when set): a
sample's reward comes from whoever wrote to the samples topic, and one huge reward would
be certain to be trained on. The file ``buffer.jsonl`` holds one samples-topic message
per line (the same codec); a row that does not decode or is out of range is skipped.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Iterable
from pathlib import Path

from raft_stream.durable import replace_durably
from raft_stream.errors import MessageError
from raft_stream.stream.schema import REWARD_OUT_OF_BOUNDS, decode_sample, dumps, encode_sample
from raft_stream.types import Sample

__all__ = ["RewardBuffer", "check_reward", "mean_reward"]

log = logging.getLogger(__name__)


def check_reward(reward: float | None, low: float | None, high: float | None) -> float:
    """``reward`` if it is finite and within [low, high] (None: unbounded on that side).

    Raises MessageError (``reward_out_of_bounds``) naming the value and the bounds.
    """
    if reward is None or not math.isfinite(reward):
        raise MessageError(
            REWARD_OUT_OF_BOUNDS, f"reward {reward!r} of a kept sample is not a finite number"
        )
    if (low is not None and reward < low) or (high is not None and reward > high):
        raise MessageError(
            REWARD_OUT_OF_BOUNDS,
            f"reward {reward!r} is outside buffer.reward_min..reward_max ({low}..{high}); "
            "fix the reward that produced it, or widen those bounds",
        )
    return reward


def mean_reward(samples: Iterable[Sample]) -> float:
    """Mean reward of the scored samples, 0.0 for none; never overflows (rewards near
    1e308 would make ``statistics.fmean`` raise OverflowError)."""
    rewards = [s.reward for s in samples if s.reward is not None and math.isfinite(s.reward)]
    if not rewards:
        return 0.0
    return math.fsum(r / len(rewards) for r in rewards)


def _identity(sample: Sample) -> tuple[str, str, int]:
    # A redelivered sample (the trainer restarted before committing its offset) is the same
    # response to the same prompt from the same adapter version: it must not count twice.
    return (sample.prompt_id, sample.response, sample.adapter_version)


def _rank_key(sample: Sample) -> tuple[float, str, str]:
    # Highest reward first; equal rewards ordered by content, never by arrival.
    assert sample.reward is not None
    return (-sample.reward, sample.prompt_id, sample.response)


class RewardBuffer:
    """Thread-safe top-``capacity`` buffer of scored samples, persisted to ``path``.

    ``reward_min``/``reward_max`` bound the rewards it accepts (None: unbounded, finite).
    """

    def __init__(
        self,
        capacity: int,
        batch_size: int,
        path: Path | None = None,
        reward_min: float | None = None,
        reward_max: float | None = None,
    ) -> None:
        if batch_size > capacity:
            raise ValueError(f"batch_size ({batch_size}) must be <= capacity ({capacity})")
        self.capacity = capacity
        self.batch_size = batch_size
        self.path = path
        self.reward_min = reward_min
        self.reward_max = reward_max
        self._samples: list[Sample] = []
        self._lock = threading.Lock()
        self.evicted = 0
        self.duplicates = 0
        self.refused = 0
        """Samples not taken because their reward is missing, non-finite or out of range."""
        if path is not None and path.exists():
            self._samples = sorted(self._read(path), key=_rank_key)[:capacity]

    def __len__(self) -> int:
        with self._lock:
            return len(self._samples)

    def add(self, samples: Iterable[Sample]) -> list[Sample]:
        """Insert scored samples; returns those that did not fit (evicted or refused).

        A sample already held (same prompt id, response and adapter version: a redelivery)
        is skipped and counted in ``duplicates``, not returned. One without a finite reward
        in range is counted in ``refused`` (check with ``check`` first to learn why).
        """
        with self._lock:
            held = {_identity(s) for s in self._samples}
            incoming = []
            for sample in samples:
                if not self._in_range(sample):
                    self.refused += 1
                    continue
                key = _identity(sample)
                if key in held:
                    self.duplicates += 1
                    continue
                held.add(key)
                incoming.append(sample)
            merged = sorted(self._samples + incoming, key=_rank_key)
            self._samples, dropped = merged[: self.capacity], merged[self.capacity :]
            self.evicted += len(dropped)
        return dropped

    def check(self, sample: Sample) -> Sample:
        """``sample`` if the buffer takes its reward, else MessageError
        (``reward_out_of_bounds``) saying why."""
        check_reward(sample.reward, self.reward_min, self.reward_max)
        return sample

    def _in_range(self, sample: Sample) -> bool:
        try:
            self.check(sample)
        except MessageError:
            return False
        return True

    def mean_reward(self) -> float:
        """Mean reward of the samples held (0.0 when empty)."""
        return mean_reward(self.snapshot())

    def batch_ready(self) -> bool:
        """True once a streaming batch of ``batch_size`` samples is waiting."""
        with self._lock:
            return len(self._samples) >= self.batch_size

    def peek_batch(self) -> list[Sample]:
        """The best ``batch_size`` samples, left in place until ``remove`` after training."""
        with self._lock:
            return list(self._samples[: self.batch_size])

    def remove(self, samples: Iterable[Sample]) -> None:
        """Drop samples that were trained on (the adapter that learned them is stored)."""
        gone = {id(s) for s in samples}
        with self._lock:
            self._samples = [s for s in self._samples if id(s) not in gone]

    def snapshot(self) -> list[Sample]:
        with self._lock:
            return list(self._samples)

    def save(self) -> None:
        """Write the buffer atomically (temp file + rename): a crash keeps the old copy."""
        if self.path is None:
            return
        rows = [dumps(encode_sample(s)).decode() for s in self.snapshot()]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        with tmp.open("w") as handle:
            handle.write("\n".join(rows) + ("\n" if rows else ""))
            handle.flush()
            os.fsync(handle.fileno())
        replace_durably(tmp, self.path)

    def _read(self, path: Path) -> list[Sample]:
        """The saved samples; a row that does not decode or is out of range is logged and
        skipped (it must not stop the trainer at every start)."""
        samples = []
        with path.open("rb") as rows:
            for number, row in enumerate(rows, start=1):
                if not row.strip():
                    continue
                try:
                    samples.append(self.check(decode_sample(row.rstrip(b"\n"))))
                except MessageError as err:
                    self.refused += 1
                    log.warning(
                        "buffer row skipped",
                        extra={"path": str(path), "line": number, "error": str(err)[:300]},
                    )
        return samples

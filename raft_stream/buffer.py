"""The top-k reward buffer between ranking and training.

A bounded priority queue of kept samples waiting to be trained on. When it is full, the
lowest-reward sample goes (so when generation outpaces training, only the best survive and
memory stays bounded). A streaming batch is ready once ``batch_size`` samples wait; a
training round takes the best ``batch_size`` and they leave the buffer once the adapter
trained on them is stored.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterable
from pathlib import Path

from raft_stream.types import Sample


def _identity(sample: Sample) -> tuple[str, str, int]:
    # A redelivered sample (the trainer restarted before committing its offset) is the same
    # response to the same prompt from the same adapter version: it must not count twice.
    return (sample.prompt_id, sample.response, sample.adapter_version)


def _rank_key(sample: Sample) -> tuple[float, str, str]:
    # Highest reward first; equal rewards ordered by content, never by arrival.
    assert sample.reward is not None
    return (-sample.reward, sample.prompt_id, sample.response)


class RewardBuffer:
    """Thread-safe top-``capacity`` buffer of scored samples, persisted to ``path``."""

    def __init__(self, capacity: int, batch_size: int, path: Path | None = None) -> None:
        if batch_size > capacity:
            raise ValueError(f"batch_size ({batch_size}) must be <= capacity ({capacity})")
        self.capacity = capacity
        self.batch_size = batch_size
        self.path = path
        self._samples: list[Sample] = []
        self._lock = threading.Lock()
        self.evicted = 0
        self.duplicates = 0
        if path is not None and path.exists():
            self._samples = sorted(self._read(path), key=_rank_key)[:capacity]

    def __len__(self) -> int:
        with self._lock:
            return len(self._samples)

    def add(self, samples: Iterable[Sample]) -> list[Sample]:
        """Insert scored samples; returns those that did not fit (evicted or refused).

        A sample already held (same prompt id, response and adapter version: a redelivery)
        is skipped and counted in ``duplicates``, not returned.
        """
        with self._lock:
            held = {_identity(s) for s in self._samples}
            incoming = []
            for sample in samples:
                if not sample.scored:
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
        rows = [json.dumps(s.to_dict()) for s in self.snapshot()]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        with tmp.open("w") as handle:
            handle.write("\n".join(rows) + ("\n" if rows else ""))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.path)

    @staticmethod
    def _read(path: Path) -> list[Sample]:
        return [
            Sample.from_dict(json.loads(line)) for line in path.read_text().splitlines() if line
        ]

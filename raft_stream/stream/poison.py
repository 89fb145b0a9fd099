"""Poison pills: records that kill the process handling them.

A record whose handling ends the process in a way no ``except`` catches (a segfault in a
kernel or a tokenizer, the OOM killer, ``os._exit`` in user code) is never committed, so
the restarted role reads it again and dies again: a crash loop that lasts until retention
deletes the record. ``CrashJournal`` ends it:

1. before a poll's records reach the caller, it writes which offsets are in hand to a
   small file (``daemon.state_dir/in_hand/<group>.<topic>.json``); the next poll, or a
   clean close, means they were handled and clears it;
2. a process that starts and finds that file died holding those records. It hands them
   out one at a time (records before them in a poll go as usual), each written to the file
   as held alone before the caller sees it;
3. a record the process died holding alone ``kafka.poison_after_crashes`` times is not
   handed out again: it comes back as a ``poison`` dead letter, and the rest go on.

The file lives on the pod's own volume (an ``emptyDir`` survives container restarts), so
each member counts its own deaths; no broker feature is needed (Tansu, the embedded
broker, drops commit metadata). A process that dies for a reason of its own (a node
drain past the grace period) only makes the next start hand out one batch one record at a
time. Writes are tmp + rename (a process killed mid-write leaves the old file whole);
there is no fsync: the page cache outlives the process, and a lost node loses its
``emptyDir`` anyway.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from kafka import TopicPartition

__all__ = ["CrashJournal", "Screened"]

log = logging.getLogger(__name__)


class _Offset(Protocol):
    @property
    def offset(self) -> int: ...


R = TypeVar("R", bound=_Offset)
"""A polled record (kafka-python's ConsumerRecord): only its offset is read."""


@dataclass(frozen=True)
class _Partition:
    """One partition's entry: what the process holds, and what an earlier one died holding."""

    held: tuple[int, int] | None = None
    """Offsets ``lo..hi`` handed out and not yet handled."""
    suspects: tuple[int, int] | None = None
    """Offsets ``first..last`` a dead process held: handed out one at a time."""
    crashes: int = 0
    """Deaths with the first suspect alone in hand."""

    def after_death(self) -> _Partition:
        """What the entry means to the process that finds it in the file."""
        if self.held is None:
            return self
        lo, hi = self.held
        crashes = 0  # a batch died: nobody blamed yet
        if lo == hi:
            same = self.suspects is not None and self.suspects[0] == lo
            crashes = (self.crashes if same else 0) + 1
        if self.suspects is not None:
            lo, hi = min(lo, self.suspects[0]), max(hi, self.suspects[1])
        return _Partition(suspects=(lo, hi), crashes=crashes)

    def after_handled(self) -> _Partition | None:
        """The entry once the caller is done with what it holds; None: nothing left."""
        if self.suspects is None:
            return None
        first, last = self.suspects
        if self.held == (first, first):  # the first suspect passed
            return None if first == last else _Partition(suspects=(first + 1, last))
        return _Partition(suspects=self.suspects, crashes=self.crashes)


@dataclass(frozen=True)
class Screened(Generic[R]):
    """A poll's records after screening: the ones to hand out, the poison pills (each with
    its death count), and where each cut partition must be read from next."""

    records: dict[TopicPartition, list[R]]
    poison: list[tuple[R, int]]
    seek: dict[TopicPartition, int]


class CrashJournal:
    """Finds the records a consumer's process died holding (see the module docstring).

    ``path``: the journal file (its folder is created on first write). ``max_crashes`` >=
    1: deaths with a record alone in hand before it is a poison pill. Not thread-safe,
    like the consumer.
    """

    def __init__(self, path: Path, max_crashes: int) -> None:
        if max_crashes < 1:
            raise ValueError(f"max_crashes must be >= 1, got {max_crashes}")
        self.path = path
        self.max_crashes = max_crashes
        self._write_failed = False
        self._entries = {tp: e.after_death() for tp, e in self._load().items()}
        if self._entries:
            log.warning(
                "the last process died holding these records; handing them out one at a time",
                extra={"journal": str(path), "suspects": self._show()},
            )
            self._write()

    @property
    def suspects(self) -> dict[TopicPartition, tuple[int, int]]:
        """Partition -> (first, last) offsets still to be handed out one at a time."""
        return {tp: e.suspects for tp, e in self._entries.items() if e.suspects is not None}

    def handled(self, committed: Mapping[TopicPartition, int] | None = None) -> None:
        """The caller is done with what it holds: all of it (it polls again), or, given
        ``committed`` (partition -> last offset committed, inclusive), what that covers
        (a pipeline holding later records still holds those)."""
        done = [
            tp
            for tp, e in self._entries.items()
            if e.held is not None and (committed is None or committed.get(tp, -1) >= e.held[1])
        ]
        partly = {
            tp: committed[tp] + 1
            for tp, e in self._entries.items()
            if committed is not None
            and e.held is not None
            and e.suspects is None
            and e.held[0] <= committed.get(tp, -1) < e.held[1]
        }
        for tp, first in partly.items():
            held = self._entries[tp].held
            assert held is not None
            self._entries[tp] = replace(self._entries[tp], held=(first, held[1]))
        if not done:
            if partly:
                self._write()
            return
        for tp in done:
            after = self._entries[tp].after_handled()
            if after is None:
                del self._entries[tp]
            else:
                self._entries[tp] = after
        self._write()

    def screen(self, polled: Mapping[TopicPartition, Sequence[R]]) -> Screened[R]:
        """Decide what of a poll is handed out, and record it as held before returning.

        ``polled``: records per partition in offset order (KafkaConsumer.poll's shape).
        Call ``handled`` first: what was held before is done.
        """
        out: Screened[R] = Screened({}, [], {})
        for tp, batch in polled.items():
            if batch:
                self._screen_partition(tp, list(batch), out)
        if out.records:
            self._write()
        return out

    def _screen_partition(self, tp: TopicPartition, batch: list[R], out: Screened[R]) -> None:
        entry = self._entries.get(tp, _Partition())
        index = None
        if entry.suspects is not None:
            first, last = entry.suspects
            index = next((i for i, r in enumerate(batch) if r.offset >= first), None)
            if index is not None and batch[index].offset > last:
                entry, index = _Partition(), None  # the suspects never came back
        if index is None:
            # Records still held (a pipeline) stay held: the range grows.
            first = entry.held[0] if entry.held is not None else batch[0].offset
            self._entries[tp] = replace(entry, held=(first, batch[-1].offset))
            out.records[tp] = batch
            return
        assert entry.suspects is not None
        suspect = batch[index]
        crashes = entry.crashes if suspect.offset == entry.suspects[0] else 0
        entry = replace(entry, suspects=(suspect.offset, entry.suspects[1]), crashes=crashes)
        if index > 0:  # the records before the suspects go first, as a batch
            out.seek[tp] = suspect.offset
            out.records[tp] = batch[:index]
            self._entries[tp] = replace(entry, held=(batch[0].offset, batch[index - 1].offset))
        elif crashes >= self.max_crashes:
            out.seek[tp] = suspect.offset + 1
            out.poison.append((suspect, crashes))
            after = replace(entry, held=(suspect.offset, suspect.offset)).after_handled()
            if after is None:
                self._entries.pop(tp, None)
            else:
                self._entries[tp] = after
            self._write()
        else:
            out.seek[tp] = suspect.offset + 1
            out.records[tp] = [suspect]
            self._entries[tp] = replace(entry, held=(suspect.offset, suspect.offset))

    def _show(self) -> dict[str, list[int]]:
        return {f"{tp.topic}/{tp.partition}": list(s) for tp, s in self.suspects.items()}

    def _write(self) -> None:
        """Save the entries; a failed write is logged, never raised (the role goes on,
        without poison detection until a write succeeds)."""
        try:
            if not self._entries:
                self.path.unlink(missing_ok=True)
                return
            body = {
                f"{tp.topic}/{tp.partition}": {
                    "held": e.held,
                    "suspects": e.suspects,
                    "crashes": e.crashes,
                }
                for tp, e in self._entries.items()
            }
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(json.dumps(body))
            os.replace(tmp, self.path)
        except OSError as err:
            if not self._write_failed:
                log.error(
                    "in-hand journal not writable; poison records are not detected",
                    extra={"journal": str(self.path), "error": str(err)},
                )
            self._write_failed = True
        else:
            self._write_failed = False

    def _load(self) -> dict[TopicPartition, _Partition]:
        """The file's entries; an unreadable or malformed file is logged and treated as
        empty (it is this process's own scratch state: at worst one death is not counted)."""
        try:
            return _decode(json.loads(self.path.read_bytes()))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, TypeError, KeyError, RecursionError) as err:
            log.warning(
                "in-hand journal unusable; ignored",
                extra={"journal": str(self.path), "error": f"{type(err).__name__}: {err!s:.200}"},
            )
            return {}


def _decode(body: Any) -> dict[TopicPartition, _Partition]:
    """The journal file's JSON; raises ValueError/TypeError/KeyError on anything else."""
    if not isinstance(body, dict):
        raise TypeError("the journal is not a JSON object")
    out = {}
    for key, value in body.items():
        topic, _, partition = str(key).rpartition("/")
        entry = _Partition(
            held=_range(value["held"]),
            suspects=_range(value["suspects"]),
            crashes=_count(value["crashes"]),
        )
        out[TopicPartition(topic, _count(int(partition)))] = entry
    return out


def _count(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**63:
        raise ValueError(f"not an offset or count: {value!r:.40}")
    return value


def _range(value: Any) -> tuple[int, int] | None:
    if value is None:
        return None
    lo, hi = (_count(v) for v in value)
    if lo > hi:
        raise ValueError(f"empty range {lo}..{hi}")
    return lo, hi

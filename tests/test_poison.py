"""Poison pills (issue 7): a record that kills the process handling it is found and
dead-lettered after ``kafka.poison_after_crashes`` deaths, and nothing else is lost.

The journal is tested as a specification here (process lives simulated by new journals over
one file, records by offsets), including a model-based property test over random topics and
pills; tests/test_poison_daemon.py shows it on the real daemon and broker.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from raft_stream.stream.kafka import TopicPartition
from raft_stream.stream.poison import CrashJournal

TP = TopicPartition("prompts", 0)


@dataclass(frozen=True)
class Rec:
    offset: int


def _poll(
    journal: CrashJournal, offsets: range
) -> tuple[list[int], list[tuple[int, int]], int | None]:
    """One poll returning ``offsets``: what is handed out, the poison pills, the seek."""
    journal.handled()
    screened = journal.screen({TP: [Rec(o) for o in offsets]})
    handed = [r.offset for r in screened.records.get(TP, [])]
    return handed, [(r.offset, n) for r, n in screened.poison], screened.seek.get(TP)


def test_a_process_that_handles_its_polls_leaves_no_journal(tmp_path: Path) -> None:
    journal = CrashJournal(tmp_path / "j.json", max_crashes=3)
    assert _poll(journal, range(0, 4)) == ([0, 1, 2, 3], [], None)
    assert (tmp_path / "j.json").exists()  # held while the caller works on it
    journal.handled()
    assert not (tmp_path / "j.json").exists()


def test_a_commit_covering_what_is_held_counts_as_handled(tmp_path: Path) -> None:
    journal = CrashJournal(tmp_path / "j.json", max_crashes=3)
    _poll(journal, range(0, 4))
    journal.handled({TP: 2})
    assert (tmp_path / "j.json").exists()  # offset 3 is still held
    journal.handled({TP: 3})
    assert not (tmp_path / "j.json").exists()


def test_a_pipeline_holds_every_batch_in_flight_until_commits_cover_it(tmp_path: Path) -> None:
    # The generator polls again while batches are in flight (roles.batches): it does not
    # call handled() before a poll; commits release what they cover, in order.
    path = tmp_path / "j.json"
    journal = CrashJournal(path, max_crashes=3)
    for offsets in (range(0, 4), range(4, 8)):
        journal.screen({TP: [Rec(o) for o in offsets]})
    journal.handled({TP: 3})  # the first batch delivered and committed
    journal.screen({TP: [Rec(o) for o in range(8, 12)]})
    # ... and the process dies: only what was in flight is suspect.
    assert CrashJournal(path, max_crashes=3).suspects == {TP: (4, 11)}


def test_after_a_death_the_held_records_are_handed_out_one_at_a_time(tmp_path: Path) -> None:
    path = tmp_path / "j.json"
    _poll(CrashJournal(path, max_crashes=3), range(10, 14))  # ... and the process dies
    journal = CrashJournal(path, max_crashes=3)
    assert journal.suspects == {TP: (10, 13)}
    assert _poll(journal, range(10, 14)) == ([10], [], 11)
    assert _poll(journal, range(11, 14)) == ([11], [], 12)
    assert _poll(journal, range(12, 14)) == ([12], [], 13)
    assert _poll(journal, range(13, 20)) == ([13], [], 14)
    assert _poll(journal, range(14, 20)) == (list(range(14, 20)), [], None)


def test_records_before_the_suspects_go_first_as_a_batch(tmp_path: Path) -> None:
    path = tmp_path / "j.json"
    _poll(CrashJournal(path, max_crashes=3), range(10, 12))
    journal = CrashJournal(path, max_crashes=3)
    # Redelivered from an older commit: 5..9 were handled in the last life.
    assert _poll(journal, range(5, 12)) == ([5, 6, 7, 8, 9], [], 10)
    assert _poll(journal, range(10, 12)) == ([10], [], 11)


def test_a_record_that_kills_the_process_alone_n_times_is_poison(tmp_path: Path) -> None:
    path = tmp_path / "j.json"
    _poll(CrashJournal(path, max_crashes=2), range(0, 3))  # dies holding 0..2
    assert _poll(CrashJournal(path, max_crashes=2), range(0, 3)) == ([0], [], 1)
    journal = CrashJournal(path, max_crashes=2)
    assert _poll(journal, range(1, 3)) == ([1], [], 2)  # 0 was fine; 1 kills it
    assert _poll(CrashJournal(path, max_crashes=2), range(1, 3)) == ([1], [], 2)  # and again
    journal = CrashJournal(path, max_crashes=2)
    assert _poll(journal, range(1, 3)) == ([], [(1, 2)], 2)
    assert _poll(journal, range(2, 5)) == ([2], [], 3)  # 2 was held in the first death
    assert _poll(journal, range(3, 5)) == ([3, 4], [], None)


def test_a_single_record_poll_that_dies_counts_against_that_record(tmp_path: Path) -> None:
    path = tmp_path / "j.json"
    _poll(CrashJournal(path, max_crashes=1), range(7, 8))
    assert _poll(CrashJournal(path, max_crashes=1), range(7, 9)) == ([], [(7, 1)], 8)


def test_suspects_that_never_come_back_are_forgotten(tmp_path: Path) -> None:
    path = tmp_path / "j.json"
    _poll(CrashJournal(path, max_crashes=3), range(0, 4))
    journal = CrashJournal(path, max_crashes=3)
    # They were committed after all (or retention deleted them): the next poll starts later.
    assert _poll(journal, range(8, 12)) == ([8, 9, 10, 11], [], None)
    assert journal.suspects == {}


def test_a_death_before_the_first_poll_counts_nothing(tmp_path: Path) -> None:
    path = tmp_path / "j.json"
    _poll(CrashJournal(path, max_crashes=1), range(3, 4))
    CrashJournal(path, max_crashes=1)  # counts that death, then dies while starting
    journal = CrashJournal(path, max_crashes=1)
    assert journal.suspects == {TP: (3, 3)}
    assert _poll(journal, range(3, 5)) == ([], [(3, 1)], 4)


_OFFSETS = st.none() | st.lists(st.integers(-3, 2**64) | st.booleans(), max_size=3)
SHAPED = st.dictionaries(
    st.sampled_from(["prompts/0", "prompts/1", "/", "prompts/x", "prompts"]),
    st.fixed_dictionaries(
        {"held": _OFFSETS, "suspects": _OFFSETS, "crashes": st.integers(-2, 2**64) | st.booleans()}
    ),
    max_size=3,
).map(lambda v: json.dumps(v).encode())


@given(
    SHAPED
    | st.binary(max_size=300)
    | st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=8),
        lambda inner: (
            st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
        ),
        max_leaves=20,
    ).map(lambda v: json.dumps(v).encode())
)
@settings(max_examples=300, deadline=None)
def test_any_journal_file_is_read_or_ignored_never_fatal(tmp_path_factory, content: bytes) -> None:
    path = tmp_path_factory.mktemp("j") / "j.json"
    path.write_bytes(content)
    journal = CrashJournal(path, max_crashes=3)
    handed, poison, _ = _poll(journal, range(0, 3))
    assert handed or poison


@given(
    n=st.integers(1, 40),
    batch=st.integers(1, 8),
    max_crashes=st.integers(1, 3),
    pills=st.sets(st.integers(0, 39), max_size=4),
)
@settings(max_examples=300, deadline=None)
def test_every_record_is_handled_or_dead_lettered_as_poison_exactly(
    tmp_path_factory, n: int, batch: int, max_crashes: int, pills: set[int]
) -> None:
    """Lives of a consumer over one partition of ``n`` records: each life reads from the
    committed offset, polls up to ``batch`` records, and dies when it holds a pill, else
    commits what it handled. In the end every other record was handled, each pill was
    dead-lettered as poison after exactly ``max_crashes`` deaths alone, and the lives
    are bounded."""
    pills = {p for p in pills if p < n}
    path = tmp_path_factory.mktemp("j") / "j.json"
    committed, handled, poisoned, lives = 0, set(), {}, 0
    while committed < n:
        lives += 1
        assert lives <= 1 + len(pills) * (max_crashes + 1), "a crash loop"
        journal = CrashJournal(path, max_crashes)
        position = committed
        died = False
        while position < n:
            handed, poison, seek = _poll(journal, range(position, min(n, position + batch)))
            poisoned.update(dict(poison))
            if any(o in pills for o in handed):
                died = True
                break
            handled.update(handed)
            done = max([*handed, *(o for o, _ in poison)], default=position - 1)
            journal.handled({TP: done})
            committed = position = done + 1 if seek is None else seek
        if not died:
            break
    assert handled == set(range(n)) - pills
    assert poisoned == dict.fromkeys(pills, max_crashes)


def test_a_journal_that_cannot_be_written_never_stops_the_consumer(tmp_path: Path) -> None:
    blocker = tmp_path / "in_hand"
    blocker.write_text("a file where the folder should be")
    journal = CrashJournal(blocker / "j.json", max_crashes=3)
    assert _poll(journal, range(0, 2)) == ([0, 1], [], None)
    journal.handled()

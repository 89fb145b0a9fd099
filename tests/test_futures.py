"""Composing futures: ``then`` and ``gather`` keep results in order and pass errors on."""

from __future__ import annotations

from concurrent.futures import Future

import pytest

from raft_stream.futures import done, gather, then


def test_then_converts_the_result_once_it_comes() -> None:
    source: Future[int] = Future()
    converted = then(source, lambda n: n * 2)

    assert not converted.done()
    source.set_result(21)
    assert converted.result(timeout=0) == 42


def test_then_fails_with_the_mapped_error_of_the_source_or_of_the_conversion() -> None:
    source: Future[int] = Future()
    failed = then(source, lambda n: n, lambda err: RuntimeError(f"wrapped {err!r}"))
    source.set_exception(KeyError("k"))
    with pytest.raises(RuntimeError, match="wrapped KeyError"):
        failed.result(timeout=0)

    with pytest.raises(ZeroDivisionError):
        then(done(1), lambda n: n / 0).result(timeout=0)


def test_gather_keeps_submission_order_whatever_order_results_come_in() -> None:
    first: Future[str] = Future()
    second: Future[str] = Future()
    gathered = gather([first, second])

    second.set_result("b")
    assert not gathered.done()
    first.set_result("a")
    assert gathered.result(timeout=0) == ["a", "b"]
    assert gather([]).result(timeout=0) == []


def test_gather_fails_with_the_first_error_in_order_once_all_are_done() -> None:
    first: Future[int] = Future()
    second: Future[int] = Future()
    gathered = gather([first, second])

    second.set_exception(ValueError("second"))
    assert not gathered.done(), "it waits for every future, so nothing is left running"
    first.set_exception(KeyError("first"))
    with pytest.raises(KeyError):
        gathered.result(timeout=0)

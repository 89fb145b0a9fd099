"""How all-in-one mode splits the CPU cores between vLLM's worker and training."""

from __future__ import annotations

import os
import threading

import pytest
import torch

from raft_stream.roles.cpu_split import BIND_ENV, CoreSplit, pin_this_thread, split_cores


@pytest.fixture(autouse=True)
def _no_user_binding(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(BIND_ENV, raising=False)


def test_training_gets_half_the_cores_by_default() -> None:
    assert split_cores(None, set(range(8))) == CoreSplit((0, 1, 2, 3), (4, 5, 6, 7))
    assert split_cores(None, {0, 1}) == CoreSplit((0,), (1,))


def test_training_cores_are_configurable_but_leave_vllm_one() -> None:
    assert split_cores(2, {0, 1, 2, 3}) == CoreSplit((0, 1), (2, 3))
    assert split_cores(6, {0, 1, 2, 3}) == CoreSplit((0,), (1, 2, 3))


def test_nothing_is_split_on_one_core_or_when_the_user_bound_vllm(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert split_cores(None, {3}) is None
    monkeypatch.setenv(BIND_ENV, "0-3")
    assert split_cores(None, {0, 1, 2, 3, 4, 5}) is None


def test_a_pinned_thread_runs_on_its_cores_only() -> None:
    mine = os.sched_getaffinity(0)
    core = min(mine)
    seen: list[set[int]] = []
    threads = torch.get_num_threads()

    def work() -> None:
        pin_this_thread((core,))
        seen.append(os.sched_getaffinity(0))

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    try:
        assert seen == [{core}]
        assert os.sched_getaffinity(0) == mine  # the calling thread is untouched
    finally:
        torch.set_num_threads(threads)

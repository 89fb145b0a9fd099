"""The engine's processes: AMX permission, fatal-signal records, the dtype choice, and a
dead engine as a clear, counted event (issue 11)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from raft_stream.generation.engine_dtype import (
    ProbeVerdict,
    choose_engine_dtype,
    cpu_identity,
    probe_engine,
    store_verdict,
)
from raft_stream.generation.engine_process import (
    FAULT_DIR_ENV,
    EngineDeath,
    read_engine_death,
)

# A child that prepares itself as vLLM's engine processes do, then receives a signal.
_DIE_BY = """
import os, signal, sys
from raft_stream.generation.engine_process import prepare_engine_process
prepare_engine_process()
os.kill(os.getpid(), getattr(signal, sys.argv[1]))
"""


def _die_by(name: str, fault_dir: Path) -> subprocess.CompletedProcess[str]:
    env = os.environ | {FAULT_DIR_ENV: str(fault_dir)}
    return subprocess.run(
        [sys.executable, "-c", _DIE_BY, name], env=env, capture_output=True, text=True
    )


@pytest.mark.parametrize("name", ["SIGILL", "SIGSEGV", "SIGABRT", "SIGBUS", "SIGFPE"])
def test_a_fatal_signal_in_an_engine_process_is_recorded_with_its_name(
    name: str, tmp_path: Path
) -> None:
    done = _die_by(name, tmp_path)

    assert done.returncode == -getattr(signal, name)  # the signal still ends the process
    death = read_engine_death(tmp_path)
    assert death.signal == name
    assert death.pid is not None and death.pid > 0
    assert name in str(death)


def test_a_death_without_a_record_is_unknown_and_says_why(tmp_path: Path) -> None:
    done = _die_by("SIGKILL", tmp_path)

    assert done.returncode == -signal.SIGKILL
    death = read_engine_death(tmp_path)
    assert death == EngineDeath(
        "unknown", None, "SIGKILL, e.g. the OOM killer, or an exit: see the engine's log"
    )
    assert read_engine_death(tmp_path / "missing").signal == "unknown"


def test_auto_dtype_is_float32_on_the_cpu_without_a_passed_bfloat16_probe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RAFT_STREAM_CACHE", str(tmp_path))

    assert choose_engine_dtype("auto", on_cpu=True) == "float32"
    assert choose_engine_dtype("auto", on_cpu=False) == "auto"
    assert choose_engine_dtype("bfloat16", on_cpu=True) == "bfloat16"  # the user decides


def test_a_failed_bfloat16_probe_keeps_float32(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RAFT_STREAM_CACHE", str(tmp_path))
    failed = ProbeVerdict(
        "bfloat16", 3, 1, ["trial 0: exit -4", "trial 2: exit -4"], cpu_identity()
    )
    store_verdict(failed)

    assert choose_engine_dtype("auto", on_cpu=True) == "float32"


@pytest.mark.vllm
@pytest.mark.slow
def test_fresh_engines_start_and_sample_with_the_chosen_dtype(tiny_model_dir: Path) -> None:
    """Three fresh engines in child processes, each sampling once: none may die."""
    dtype = choose_engine_dtype("auto", on_cpu=True)

    verdict = probe_engine(tiny_model_dir, dtype, trials=3)

    assert verdict.deaths == []
    assert verdict.passed, verdict


def _descendants(pid: int) -> list[int]:
    """Every live process below ``pid``, from /proc."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        children = [child for child, ppid in parents.items() if ppid == parent]
        found += children
        frontier += children
    return found


@pytest.mark.vllm
@pytest.mark.slow
def test_a_worker_killed_by_sigill_raises_engine_dead_error_naming_it(
    tiny_model_dir: Path,
) -> None:
    """A fresh engine whose worker gets SIGILL (as on an AMX CPU without permission): the
    next generate raises EngineDeadError with the signal, and its processes were prepared
    by the vllm.general_plugins hook (they wrote fault records)."""
    from raft_stream.config import GenerationConfig, ModelConfig
    from raft_stream.generation import EngineDeadError, SamplingParams
    from raft_stream.generation.vllm_backend import VLLMGenerator

    generator = VLLMGenerator(
        str(tiny_model_dir),
        ModelConfig(max_model_len=256),
        GenerationConfig(enforce_eager=True, max_lora_rank=8),
    )
    try:
        params = SamplingParams(n=2, max_new_tokens=4, seed=0)
        assert len(generator.generate(["the movie was"], params)) == 1
        prepared = {int(p.stem) for p in generator.fault_dir.glob("*.txt")}
        engine_pids = set(_descendants(os.getpid()))
        assert len(prepared & engine_pids) >= 2, "engine core and worker load the plugin"

        worker = max(prepared & engine_pids)  # started last: the worker
        os.kill(worker, signal.SIGILL)
        with pytest.raises(EngineDeadError, match="SIGILL") as raised:
            generator.generate(["the movie was"], params)
        assert raised.value.death.pid == worker
    finally:
        generator.close()

"""The roles' small parts that need no broker or engine: shutdown, heartbeats, backoff,
JSON log lines, where adapters live (their trust checks: test_adapter_trust.py)."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from bench.crash_trials import process_state
from raft_stream.config import load_config
from raft_stream.generation.base import EngineDeadError
from raft_stream.generation.engine_process import EngineDeath
from raft_stream.metrics import RaftMetrics
from raft_stream.roles.adapters import adapter_store_root
from raft_stream.roles.daemon import Daemon
from raft_stream.roles.lifecycle import EXIT_GRACE_EXPIRED, Backoff, Heartbeats, Shutdown
from raft_stream.roles.logs import JsonFormatter


def test_shutdown_starts_the_grace_period_once() -> None:
    shutdown = Shutdown(grace_period_s=5)
    assert not shutdown.requested and shutdown.remaining_s() == float("inf")
    shutdown.request("SIGTERM")
    first = shutdown.remaining_s()
    time.sleep(0.05)
    shutdown.request("SIGINT")  # a second signal does not restart the clock
    assert shutdown.reason == "SIGTERM"
    assert 0 < shutdown.remaining_s() < first <= 5
    assert shutdown.wait(10)  # returns at once once requested


def _engine_killed() -> None:
    raise EngineDeadError(EngineDeath(signal="unknown", pid=None, where="a test"))


def test_an_error_after_a_stop_signal_is_the_stop_asked_for_not_a_failure(
    tmp_path: Path,
) -> None:
    # Ctrl-C (or `timeout`) signals the whole process group: vLLM's engine processes die of
    # it while the engine starts, and the daemon exited 1 saying "the vLLM engine died".
    cfg = load_config(
        overrides={
            "daemon.state_dir": str(tmp_path),
            "kafka.bootstrap_servers": "127.0.0.1:1",
            "server.port": 0,
        }
    )
    stopped = Daemon(cfg, RaftMetrics(CollectorRegistry()))
    stopped.shutdown.request("SIGINT")
    stopped.run("generator", _engine_killed)
    assert not stopped.failed and stopped.exit_status == 0

    failing = Daemon(cfg, RaftMetrics(CollectorRegistry()))  # no signal: it fails
    failing.run("generator", _engine_killed)
    assert failing.failed and failing.exit_status == 1
    assert failing.shutdown.reason == "generator failed"
    for daemon in (stopped, failing):
        daemon.server.stop()  # the probe ports


def test_heartbeats_reach_the_probe_only_when_every_loop_beat() -> None:
    forwarded: list[int] = []
    beats = Heartbeats(lambda: forwarded.append(1))
    generator, trainer = beats.register("generator"), beats.register("trainer")
    generator()
    generator()
    assert forwarded == []  # a hung trainer must fail liveness
    trainer()
    assert forwarded == [1]
    trainer()
    assert forwarded == [1]


def test_backoff_grows_to_its_cap_with_jitter() -> None:
    backoff = Backoff(initial_s=1.0, max_s=4.0)
    waits = [backoff.next_s() for _ in range(6)]
    assert 0.5 <= waits[0] <= 1.0 and 1.0 <= waits[1] <= 2.0
    assert all(2.0 <= w <= 4.0 for w in waits[3:])
    backoff.reset()
    assert backoff.next_s() <= 1.0


def test_json_log_lines_carry_the_extra_fields_and_the_traceback() -> None:
    record = logging.LogRecord(
        "raft_stream.roles.trainer", logging.ERROR, __file__, 1, "round %d failed", (3,), None
    )
    record.__dict__["adapter_version"] = 3
    try:
        raise OSError(28, "No space left on device")
    except OSError:
        record.exc_info = sys.exc_info()
    line = json.loads(JsonFormatter().format(record))
    assert line["level"] == "ERROR" and line["logger"] == "raft_stream.roles.trainer"
    assert line["msg"] == "round 3 failed" and line["adapter_version"] == 3
    assert "No space left on device" in line["exc"] and line["ts"].endswith("+00:00")


def test_adapters_live_under_the_state_dir_unless_store_root_is_set(tmp_path: Path) -> None:
    state = {"daemon.state_dir": str(tmp_path / "state")}
    assert adapter_store_root(load_config(overrides=state)) == tmp_path / "state" / "adapters"
    shared = load_config(overrides={**state, "store.root": str(tmp_path / "shared")})
    assert adapter_store_root(shared) == tmp_path / "shared"  # the split mode's shared volume


def test_the_exit_watchdog_ends_a_drain_that_overruns_the_grace_period() -> None:
    # In a child process: the watchdog exits the process it runs in.
    code = (
        "import time\n"
        "from raft_stream.roles.lifecycle import Shutdown, start_exit_watchdog\n"
        "shutdown = Shutdown(grace_period_s=1.5)\n"
        "start_exit_watchdog(shutdown, margin_s=0.5)\n"
        "time.sleep(0.5)  # the watchdog waits for the request without a timeout\n"
        "print(time.monotonic(), flush=True)\n"
        "shutdown.request('SIGTERM')\n"
        "time.sleep(30)  # a drain that never ends\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    exited = time.monotonic()  # the same clock as the child's on Linux
    assert done.returncode == EXIT_GRACE_EXPIRED, done.stderr
    assert exited - float(done.stdout) < 1.5 + 1.0  # within the grace period, plus exit
    assert "Traceback" not in done.stderr


def _alive(pid: int) -> bool:
    """Running or sleeping (a zombie awaiting its reaper counts as dead)."""
    found = process_state(pid)
    return found is not None and found[0] != "Z"


def _child_outlives_its_parent(*args: str) -> bool:
    """Run Python with ``args`` (prints a child's pid, then exits); is the child alive 10 s
    later?"""
    # Output to files, not pipes: a surviving child would hold a pipe open.
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        done = subprocess.run([sys.executable, *args], stdout=out, stderr=err, timeout=60)
        out.seek(0), err.seek(0)
        assert done.returncode == 0, err.read().decode()
        child = int(out.read())
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    if alive := _alive(child):
        os.kill(child, signal.SIGKILL)
    return alive


@pytest.mark.skipif(sys.platform != "linux", reason="parent-death signals are Linux's")
def test_a_forked_child_dies_with_the_daemon_that_forked_it() -> None:
    program = (
        "import os, time\n"
        "from raft_stream.roles.lifecycle import children_die_with_parent\n"
        "children_die_with_parent()\n"
        "if (pid := os.fork()) == 0:\n"
        "    time.sleep(60)\n"
        "    os._exit(0)\n"
        "print(pid, flush=True)\n"
        "os._exit(0)  # dies without stopping or reaping the child\n"
    )
    assert not _child_outlives_its_parent("-c", program)


@pytest.mark.skipif(sys.platform != "linux", reason="parent-death signals are Linux's")
def test_a_spawned_child_of_the_cli_dies_with_it(tmp_path: Path) -> None:
    # vLLM's engine starts this way: multiprocessing's spawn method, which imports the
    # program's main module (here one that imports raft_stream.cli, as the console script
    # does) in the child before running its target.
    (tmp_path / "program.py").write_text(
        "import os, sys, time, multiprocessing\n"
        "from pathlib import Path\n"
        "import raft_stream.cli\n"
        "def work(ready):\n"
        "    Path(ready).touch()\n"
        "    time.sleep(60)\n"
        "if __name__ == '__main__':\n"
        "    ready = Path(sys.argv[1])\n"
        "    child = multiprocessing.get_context('spawn').Process(target=work, args=(ready,))\n"
        "    child.start()\n"
        "    while not ready.exists():\n"
        "        time.sleep(0.05)\n"
        "    print(child.pid, flush=True)\n"
        "    os._exit(0)\n"
    )
    assert not _child_outlives_its_parent(str(tmp_path / "program.py"), str(tmp_path / "ready"))

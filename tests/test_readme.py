"""README's usage lines run as written (issue 9 case 1: the offline line stopped with a
vLLM traceback, ``model.max_model_len`` 512 against the tiny model's context of 256)."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BIN = Path(sys.executable).parent


def usage_lines(command: str) -> list[str]:
    """README lines that run ``raft-stream <command>``, without their trailing comments."""
    prefix = f".venv/bin/raft-stream {command} "
    lines = [line.split("  #")[0].strip() for line in README.read_text().splitlines()]
    return [line for line in lines if line.startswith(prefix)]


def run(line: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    argv = shlex.split(line)
    argv[0] = str(BIN / "raft-stream")
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
@pytest.mark.vllm
def test_readme_offline_lines_run_as_written(tmp_path: Path, tiny_model_dir: Path) -> None:
    lines = usage_lines("prompts") + usage_lines("offline")
    assert len(lines) == 3, lines  # two prompt files, then offline RAFT on them
    for line in lines:
        done = run(line, tmp_path)
        assert done.returncode == 0, f"{line}\n{done.stderr[-3000:]}"
    metrics = (tmp_path / "runs/offline/metrics.csv").read_text().splitlines()
    assert len(metrics) == 1 + 4  # header and --iterations 4
    verdict = json.loads((tmp_path / "runs/offline/eval.json").read_text())
    assert {"gain", "gain_ci95", "beats_base"} <= set(verdict)

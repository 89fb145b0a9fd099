"""RaftMetrics: names follow Prometheus conventions and label sets stay bounded."""

from __future__ import annotations

import math
import platform

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from raft_stream import __version__
from raft_stream.metrics import EVICTION_REASONS, REJECT_REASONS, RaftMetrics
from tests.promtool import promtool


@pytest.fixture
def metrics() -> RaftMetrics:
    return RaftMetrics(CollectorRegistry())


def _value(m: RaftMetrics, name: str, **labels: str) -> float | None:
    return m.registry.get_sample_value(name, labels)


def _series(m: RaftMetrics) -> set[tuple[str, tuple[tuple[str, str], ...]]]:
    return {
        (s.name, tuple(sorted(s.labels.items())))
        for family in m.registry.collect()
        for s in family.samples
    }


def _exercise(m: RaftMetrics) -> None:
    """Touch every metric once, as a running daemon would."""
    m.prompts_consumed_total.inc(3)
    m.samples_generated_total.inc(24)
    m.samples_kept_total.inc(3)
    m.count_rejected("duplicate", 2)
    m.count_dead_letter("not_json")
    m.count_training_failure("out_of_memory")
    m.count_adapter_load_failure("checksum_mismatch")
    m.consumer_lag_messages.labels(topic="raft.prompts").set(7)
    m.buffer_capacity.set(256)
    m.buffer_samples.set(40)
    m.count_buffer_eviction("stale", 2)
    m.count_buffer_eviction("capacity")
    m.observe_staleness([0, 0, 1, 4])
    m.kept_reward_mean.set(0.8)
    m.set_stored_version(1)
    m.set_served_version(1)
    m.observe_rewards([0.1, 0.9, -0.3], adapter_version=1)
    m.observe_generation(tokens=480)
    m.observe_responses(["a good film", "a good plot"])
    m.observe_training_round(steps=4, tokens=2000, seconds=10.0, loss=1.5)
    m.learning_stalled.set(0)
    m.ready.set(1)


def test_exposition_passes_promtool_check_metrics(metrics: RaftMetrics) -> None:
    _exercise(metrics)
    result = promtool("check", "metrics", stdin=generate_latest(metrics.registry))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == ""


def test_every_metric_has_the_namespace_and_counters_end_in_total(metrics: RaftMetrics) -> None:
    for family in metrics.registry.collect():
        assert family.name.startswith("raft_stream_"), family.name
        for sample in family.samples:
            if sample.name.endswith("_total"):
                assert family.type == "counter", sample.name


def test_reward_series_stay_fixed_across_50_adapter_versions(metrics: RaftMetrics) -> None:
    def new_version(version: int) -> None:
        metrics.set_stored_version(version)
        metrics.set_served_version(version)
        metrics.observe_rewards([0.5, -0.5, 0.25], adapter_version=version)
        metrics.observe_rewards([0.0], adapter_version=version - 1)  # in flight on the old one

    _exercise(metrics)
    new_version(2)
    before = _series(metrics)
    for version in range(3, 53):
        new_version(version)
    assert _series(metrics) == before
    adapters = {dict(labels).get("adapter") for _, labels in before} - {None}
    assert adapters == {"current", "previous"}
    assert _value(metrics, "raft_stream_adapter_version_served") == 52


def test_new_version_rolls_current_to_previous(metrics: RaftMetrics) -> None:
    metrics.observe_rewards([0.2, 0.4], adapter_version=1)
    assert _value(metrics, "raft_stream_reward_mean", adapter="current") == pytest.approx(0.3)
    assert _value(metrics, "raft_stream_reward_mean", adapter="previous") is None  # no data

    metrics.observe_rewards([0.8], adapter_version=2)
    metrics.observe_rewards([0.0], adapter_version=1)  # late sample of the old version
    assert _value(metrics, "raft_stream_reward_mean", adapter="current") == pytest.approx(0.8)
    assert _value(metrics, "raft_stream_reward_mean", adapter="previous") == pytest.approx(0.2)
    assert _value(metrics, "raft_stream_reward_samples", adapter="previous") == 3
    # The histogram is cumulative per slot: it never moves observations between slots.
    assert _value(metrics, "raft_stream_reward_count", adapter="current") == 3
    assert _value(metrics, "raft_stream_reward_count", adapter="previous") == 1


def test_rollback_swaps_current_and_previous(metrics: RaftMetrics) -> None:
    metrics.set_served_version(4)
    metrics.observe_rewards([0.6], adapter_version=4)
    metrics.set_served_version(5)
    metrics.observe_rewards([0.1], adapter_version=5)
    metrics.set_served_version(4)  # pinned back
    assert _value(metrics, "raft_stream_adapter_version_served") == 4
    assert _value(metrics, "raft_stream_reward_mean", adapter="current") == pytest.approx(0.6)
    assert _value(metrics, "raft_stream_reward_mean", adapter="previous") == pytest.approx(0.1)


def test_non_finite_rewards_are_skipped(metrics: RaftMetrics) -> None:
    metrics.observe_rewards([1.0, math.nan, math.inf], adapter_version=0)
    assert _value(metrics, "raft_stream_reward_count", adapter="current") == 1
    assert _value(metrics, "raft_stream_reward_mean", adapter="current") == 1.0


def test_swap_latency_is_observed_on_the_first_sample_of_a_stored_version(
    metrics: RaftMetrics,
) -> None:
    metrics.set_stored_version(3, stored_at=0.0)  # long ago: a huge but finite latency
    metrics.set_served_version(3)
    metrics.observe_rewards([0.5], adapter_version=3)
    metrics.observe_rewards([0.5], adapter_version=3)
    assert _value(metrics, "raft_stream_adapter_swap_seconds_count") == 1
    assert _value(metrics, "raft_stream_adapter_version_stored") == 3


def test_swap_latency_ends_when_the_first_sample_was_generated_not_when_it_was_scored(
    metrics: RaftMetrics,
) -> None:
    metrics.set_stored_version(4, stored_at=1000.0)
    metrics.observe_rewards([0.5, 0.25], adapter_version=4, generated_at=1000.2)
    assert _value(metrics, "raft_stream_adapter_swap_seconds_sum") == pytest.approx(0.2)


def test_unknown_reasons_count_as_other(metrics: RaftMetrics) -> None:
    metrics.count_rejected("something new")
    metrics.count_dead_letter("weird")
    assert _value(metrics, "raft_stream_samples_rejected_total", reason="other") == 1
    assert _value(metrics, "raft_stream_dead_letter_total", reason="other") == 1
    reasons = {
        dict(labels)["reason"]
        for name, labels in _series(metrics)
        if name == "raft_stream_samples_rejected_total"
    }
    assert reasons == set(REJECT_REASONS)


def test_distinct2_uses_a_recent_window() -> None:
    m = RaftMetrics(CollectorRegistry(), distinct_window=2)
    m.observe_responses(["same words here"] * 2)
    assert _value(m, "raft_stream_generation_distinct2") == 0.5
    m.observe_responses(["one two three", "four five six"])  # pushes the repeats out
    assert _value(m, "raft_stream_generation_distinct2") == 1.0


def test_role_specific_gauges_read_nan_until_set(metrics: RaftMetrics) -> None:
    for name in (
        "raft_stream_generation_distinct2",
        "raft_stream_kept_reward_mean",
        "raft_stream_training_loss",
        "raft_stream_training_tokens_per_second",
        "raft_stream_learning_stalled",
    ):
        assert math.isnan(_value(metrics, name) or 0.0), name
    metrics.observe_responses([])
    assert math.isnan(_value(metrics, "raft_stream_generation_distinct2") or 0.0)


def test_throughput_and_training_round(metrics: RaftMetrics) -> None:
    metrics.observe_generation(tokens=100)
    metrics.observe_training_round(steps=2, tokens=300, seconds=3.0, loss=0.7)
    assert _value(metrics, "raft_stream_generation_tokens_total") == 100
    assert _value(metrics, "raft_stream_generation_tokens_per_second") is None  # rate() it
    assert _value(metrics, "raft_stream_training_steps_total") == 2
    assert _value(metrics, "raft_stream_training_tokens_per_second") == 100
    assert _value(metrics, "raft_stream_training_loss") == 0.7
    assert _value(metrics, "raft_stream_training_duration_seconds_count") == 1


def test_build_info_names_the_version(metrics: RaftMetrics) -> None:
    labels = {"version": __version__, "python": platform.python_version()}
    assert _value(metrics, "raft_stream_build_info", **labels) == 1


def test_buffer_evictions_are_exported_at_0_for_every_reason_from_the_start(
    metrics: RaftMetrics,
) -> None:
    assert EVICTION_REASONS == ("stale", "capacity")
    for reason in EVICTION_REASONS:
        assert _value(metrics, "raft_stream_buffer_evicted_total", reason=reason) == 0
    metrics.count_buffer_eviction("stale", 3)
    assert _value(metrics, "raft_stream_buffer_evicted_total", reason="stale") == 3


def test_raises_error_for_a_buffer_eviction_reason_outside_the_fixed_set(
    metrics: RaftMetrics,
) -> None:
    with pytest.raises(ValueError, match=r"reason 'full' is not one of \('stale', 'capacity'\)"):
        metrics.count_buffer_eviction("full")


def test_sample_staleness_is_a_histogram_of_versions_behind(metrics: RaftMetrics) -> None:
    metrics.observe_staleness([0, 0, 3, 5, 100])
    name = "raft_stream_sample_staleness_versions"
    assert _value(metrics, f"{name}_count") == 5
    assert _value(metrics, f"{name}_bucket", le="0.0") == 2
    assert _value(metrics, f"{name}_bucket", le="4.0") == 3
    assert _value(metrics, f"{name}_bucket", le="6.0") == 4
    assert _value(metrics, f"{name}_bucket", le="64.0") == 4
    assert _value(metrics, f"{name}_bucket", le="+Inf") == 5

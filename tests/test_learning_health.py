"""Learning health: stalled rounds are called out once, and the held-out verdict is paired
and honest about noise."""

from __future__ import annotations

import logging
import math
import statistics

import pytest

from raft_stream.learning_health import LearningHealth, held_out_gain, t_critical_95

STALLED = [(1.0, 0.30), (1.1, 0.30), (1.0, 0.25), (1.2, 0.28), (1.1, 0.26)]
"""Five rounds whose loss drifts up and whose reward drifts down."""

LEARNING = [(2.5, 0.30), (2.0, 0.38), (1.6, 0.66), (1.4, 0.82), (1.3, 0.84)]
"""Five rounds of the demo's offline run: loss falling, reward rising."""


def _feed(health: LearningHealth, rounds: list[tuple[float, float]]) -> list[bool | None]:
    trends = [health.observe(loss, reward) for loss, reward in rounds]
    return [t.stalled if t is not None else None for t in trends]


def test_says_nothing_until_a_window_of_rounds_is_in() -> None:
    health = LearningHealth(stall_rounds=5)
    assert _feed(health, STALLED[:4]) == [None] * 4
    assert not health.stalled


def test_rounds_whose_loss_does_not_fall_and_reward_does_not_rise_are_stalled() -> None:
    health = LearningHealth(stall_rounds=5)
    assert _feed(health, STALLED)[-1] is True
    assert health.stalled


def test_rounds_that_learn_are_not_stalled() -> None:
    assert _feed(LearningHealth(stall_rounds=5), LEARNING)[-1] is False


@pytest.mark.parametrize(
    ("rounds", "why"),
    [
        ([(1.0, 0.3), (0.9, 0.2), (0.8, 0.1)], "the loss falls"),
        ([(1.0, 0.1), (1.1, 0.2), (1.2, 0.3)], "the reward rises"),
    ],
)
def test_either_signal_moving_the_right_way_is_not_a_stall(
    rounds: list[tuple[float, float]], why: str
) -> None:
    assert _feed(LearningHealth(stall_rounds=3), rounds)[-1] is False, why


def test_the_slopes_are_least_squares_over_the_last_rounds_only() -> None:
    health = LearningHealth(stall_rounds=3)
    _feed(health, [(9.0, -5.0), (1.0, 0.1), (2.0, 0.1), (4.0, 0.1)])  # the first slides out
    trend = health.observe(4.0, 0.4)
    assert trend is not None and trend.rounds == 3
    assert trend.loss_slope == pytest.approx(1.0)  # 2, 4, 4
    assert trend.reward_slope == pytest.approx(0.15)  # 0.1, 0.1, 0.4


def test_warns_once_when_learning_stalls_and_again_only_after_it_resumed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    health = LearningHealth(stall_rounds=3)
    with caplog.at_level(logging.INFO, logger="raft_stream.learning_health"):
        _feed(health, [(1.0, 0.3), (1.0, 0.3), (1.1, 0.2), (1.2, 0.2), (1.3, 0.1)])
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1  # three stalled windows, one warning
        message = warnings[0].getMessage()
        assert "loss did not fall (slope +0.0500" in message
        assert "training.learning_rate or training.epochs" in message
        _feed(health, [(0.5, 0.9)])  # a round that learned
        assert not health.stalled
        assert any("learning resumed" in r.getMessage() for r in caplog.records)
        _feed(health, [(0.6, 0.8), (0.7, 0.7), (0.8, 0.6)])
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 2


def test_a_round_with_a_non_finite_loss_or_reward_is_left_out() -> None:
    health = LearningHealth(stall_rounds=2)
    assert health.observe(math.nan, 0.5) is None
    assert health.observe(1.0, math.inf) is None
    assert _feed(health, [(1.0, 0.5), (1.1, 0.4)]) == [None, True]


def test_raises_error_for_a_window_too_short_for_a_slope() -> None:
    with pytest.raises(ValueError, match=r"stall_rounds \(1\) must be >= 2"):
        LearningHealth(stall_rounds=1)


# -- the held-out verdict ------------------------------------------------------------------


T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 5: 2.571, 10: 2.228, 23: 2.069, 47: 2.012, 200: 1.972}
"""Student's t, 97.5% quantile, from the printed tables (scipy.stats.t.ppf agrees)."""


@pytest.mark.parametrize(("df", "expected"), sorted(T_975.items()))
def test_the_t_critical_value_matches_the_tables(df: int, expected: float) -> None:
    # Within the expansion's 0.13% (its worst, at 3 degrees of freedom) and the tables' rounding.
    assert t_critical_95(df) == pytest.approx(expected, rel=1.5e-3)


def test_the_gain_is_the_mean_paired_difference_with_a_t_interval() -> None:
    before = {"a": 0.1, "b": 0.3, "c": 0.0, "d": -0.2}
    after = {"a": 0.5, "b": 0.4, "c": 0.3, "d": 0.1, "unpaired": 0.9}
    gain = held_out_gain(before, after)
    differences = [0.4, 0.1, 0.3, 0.3]
    assert gain.prompts == 4  # "unpaired" was not scored before
    assert gain.gain == pytest.approx(0.275)
    standard_error = statistics.stdev(differences) / math.sqrt(4)
    assert gain.ci95 == pytest.approx(T_975[3] * standard_error, rel=1.5e-3)
    assert gain.beats_base
    assert gain.summary() == (
        f"held-out reward rose by 0.275 ± {gain.ci95:.3f} (95% CI, 4 prompts) over the base model"
    )


def test_pairing_cancels_how_hard_each_prompt_is() -> None:
    # Prompts differ wildly, but each gained 0.1 give or take 0.01: a clear gain.
    before = {f"p{i}": i / 10 - 0.5 for i in range(10)}
    after = {p: r + 0.1 + (0.01 if i % 2 else -0.01) for i, (p, r) in enumerate(before.items())}
    assert held_out_gain(before, after).beats_base


def test_a_gain_within_the_noise_does_not_beat_the_base_model() -> None:
    before = {"a": 0.2, "b": 0.4, "c": 0.1, "d": 0.3}
    after = {"a": 0.5, "b": 0.2, "c": 0.3, "d": 0.2}
    gain = held_out_gain(before, after)
    assert gain.gain == pytest.approx(0.05)
    assert not gain.beats_base
    assert gain.summary().startswith(
        f"held-out reward did NOT beat the base model beyond noise (0.050 ± {gain.ci95:.3f}, "
        "95% CI, 4 prompts): try more offline.iterations"
    )


def test_too_few_prompts_give_no_interval_and_no_claim() -> None:
    one = held_out_gain({"a": 0.0}, {"a": 0.9})
    assert one.gain == pytest.approx(0.9) and math.isinf(one.ci95) and not one.beats_base
    none = held_out_gain({"a": 0.0}, {"b": 0.9})
    assert none.prompts == 0 and math.isnan(none.gain) and not none.beats_base
    assert none.as_json() == {
        "gain": None,
        "gain_ci95": None,
        "gain_prompts": 0,
        "beats_base": False,
    }


def test_the_verdict_figures_are_plain_json() -> None:
    figures = held_out_gain({"a": 0.1, "b": 0.2}, {"a": 0.4, "b": 0.4}).as_json()
    assert set(figures) == {"gain", "gain_ci95", "gain_prompts", "beats_base"}
    assert figures["gain"] == pytest.approx(0.25) and figures["gain_prompts"] == 2

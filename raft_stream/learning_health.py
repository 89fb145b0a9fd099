"""Is RAFT learning? Two answers: a trend over training rounds, and a held-out verdict.

``LearningHealth`` is fed each training round's loss and mean reward (the trainer role:
its streaming batch; offline RAFT: the iteration's samples). Over the last
``training.stall_rounds`` rounds it fits a least-squares line to each; learning has stalled
when the loss is not falling (slope >= 0) and the reward is not rising (slope <= 0). It
logs one warning when that starts, with the slopes and what to try, and its ``stalled``
feeds ``raft_stream_learning_stalled``.

``held_out_gain`` answers the offline question: did the final adapter beat the base model
on held-out prompts beyond noise? Both were sampled with the same seeds, so the gain is
paired per prompt.

Example:
    >>> health = LearningHealth(stall_rounds=3)
    >>> for loss, reward in [(1.0, 0.2), (1.1, 0.2), (1.2, 0.1)]:
    ...     trend = health.observe(loss, reward)
    >>> trend.stalled, round(trend.loss_slope, 3), round(trend.reward_slope, 3)
    (True, 0.1, -0.05)
    >>> held_out_gain({"a": 0.1, "b": 0.3, "c": 0.0}, {"a": 0.5, "b": 0.6, "c": 0.4}).summary()
    'held-out reward rose by 0.367 ± 0.143 (95% CI, 3 prompts) over the base model'
"""

from __future__ import annotations

import logging
import math
import statistics
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from statistics import NormalDist

__all__ = [
    "HeldOutGain",
    "LearningHealth",
    "Trend",
    "held_out_gain",
    "mean_ci95",
    "t_critical_95",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Trend:
    """Least-squares slopes, per round, of the loss and the mean reward of recent rounds."""

    loss_slope: float
    reward_slope: float
    rounds: int

    @property
    def stalled(self) -> bool:
        """The loss is not falling and the reward is not rising."""
        return self.loss_slope >= 0 and self.reward_slope <= 0


class LearningHealth:
    """Watches the loss and mean reward of training rounds for learning that has stalled.

    Not thread-safe: feed it from one thread (the trainer's loop, the offline loop).
    """

    def __init__(self, stall_rounds: int) -> None:
        if stall_rounds < 2:
            raise ValueError(
                f"stall_rounds ({stall_rounds}) must be >= 2: a slope needs two rounds"
            )
        self.stall_rounds = stall_rounds
        self._losses: deque[float] = deque(maxlen=stall_rounds)
        self._rewards: deque[float] = deque(maxlen=stall_rounds)
        self.stalled = False
        """Whether the last full window looked stalled (False until one is full)."""

    def observe(self, loss: float, reward_mean: float) -> Trend | None:
        """Add a round; the trend over the last ``stall_rounds`` rounds, or None until
        there are that many. A round with a non-finite loss or reward is left out."""
        if not (math.isfinite(loss) and math.isfinite(reward_mean)):
            return None
        self._losses.append(loss)
        self._rewards.append(reward_mean)
        if len(self._losses) < self.stall_rounds:
            return None
        trend = Trend(_slope(self._losses), _slope(self._rewards), self.stall_rounds)
        if trend.stalled and not self.stalled:
            log.warning(
                "learning has stalled: over the last %d rounds the loss did not fall (slope "
                "%+.4f a round) and the mean reward did not rise (slope %+.4f a round); "
                "raise training.learning_rate or training.epochs, and check that the reward "
                "tells good responses from bad ones",
                trend.rounds,
                trend.loss_slope,
                trend.reward_slope,
            )
        elif self.stalled and not trend.stalled:
            log.info(
                "learning resumed: loss slope %+.4f, mean reward slope %+.4f a round",
                trend.loss_slope,
                trend.reward_slope,
            )
        self.stalled = trend.stalled
        return trend


def _slope(values: deque[float]) -> float:
    """Least-squares slope of ``values`` against their round index (0, 1, 2, ...)."""
    return statistics.linear_regression(range(len(values)), values).slope


def t_critical_95(df: int) -> float:
    """The two-sided 95% critical value of Student's t with ``df`` degrees of freedom.

    Exact for 1 and 2 degrees of freedom; from 3 on, the Cornish-Fisher expansion around the
    normal quantile (Abramowitz & Stegun, Handbook of Mathematical Functions, 26.7.5),
    within 0.13% of the exact value (0.002% from 7 on).

    Example:
        >>> round(t_critical_95(10), 3), round(t_critical_95(1000), 3)
        (2.228, 1.962)
    """
    if df < 1:
        raise ValueError(f"degrees of freedom ({df}) must be >= 1")
    p = 0.975
    if df == 1:
        return math.tan(math.pi * (p - 0.5))
    if df == 2:
        return (2 * p - 1) / math.sqrt(2 * p * (1 - p))
    z = NormalDist().inv_cdf(p)
    terms = (
        (z**3 + z) / 4,
        (5 * z**5 + 16 * z**3 + 3 * z) / 96,
        (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384,
        (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160,
    )
    return z + sum(term / df**power for power, term in enumerate(terms, start=1))


@dataclass(frozen=True)
class HeldOutGain:
    """The held-out reward of an adapter against the base model, paired by prompt."""

    gain: float
    """Mean over prompts of (mean reward after - mean reward before); NaN without prompts."""

    ci95: float
    """Half-width of the gain's 95% confidence interval (Student's t over the per-prompt
    differences); infinite with fewer than two prompts."""

    prompts: int
    """Prompts scored both before and after (one the engine refused either time is out)."""

    @property
    def beats_base(self) -> bool:
        """The whole 95% interval lies above zero."""
        return self.gain - self.ci95 > 0

    def summary(self) -> str:
        """One plain line: did the adapter beat the base model beyond noise?"""
        figures = f"{self.gain:.3f} ± {self.ci95:.3f}"
        if self.beats_base:
            return (
                f"held-out reward rose by {figures} (95% CI, {self.prompts} prompts) "
                "over the base model"
            )
        return (
            f"held-out reward did NOT beat the base model beyond noise ({figures}, 95% CI, "
            f"{self.prompts} prompts): try more offline.iterations, a higher "
            "training.learning_rate or training.epochs, more held-out prompts, or check "
            "that the reward tells good responses from bad ones"
        )

    def as_json(self) -> dict[str, float | int | bool | None]:
        """eval.json's figures: ``gain``, ``gain_ci95`` (None where undefined), ``prompts``
        and ``beats_base``."""
        return {
            "gain": self.gain if math.isfinite(self.gain) else None,
            "gain_ci95": self.ci95 if math.isfinite(self.ci95) else None,
            "gain_prompts": self.prompts,
            "beats_base": self.beats_base,
        }


def held_out_gain(before: Mapping[str, float], after: Mapping[str, float]) -> HeldOutGain:
    """The paired gain of ``after`` over ``before`` (prompt id -> mean reward of its
    samples), over the prompts in both, with a 95% t interval of its mean.

    The same prompts and seeds before and after make each prompt its own control, so the
    interval reflects how the gain varies across prompts, not how hard each prompt is.
    """
    differences = [after[prompt] - before[prompt] for prompt in before if prompt in after]
    n = len(differences)
    if n == 0:
        return HeldOutGain(math.nan, math.inf, 0)
    return HeldOutGain(statistics.fmean(differences), mean_ci95(differences), n)


def mean_ci95(values: Sequence[float]) -> float:
    """Half-width of the 95% Student-t interval of the mean of ``values``; infinite with
    fewer than two."""
    n = len(values)
    if n < 2:
        return math.inf
    return t_critical_95(n - 1) * statistics.stdev(values) / math.sqrt(n)

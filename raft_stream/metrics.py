"""Prometheus metrics of a raft-stream process: one ``RaftMetrics`` holds them all.

Conventions: every name starts with ``raft_stream_``, is in base units, and ends in
``_total`` only for counters. Label sets are small and fixed: reason labels take the values
listed below (anything else is counted as ``other``; a buffer eviction's reason is one of
EVICTION_REASONS or an error) and per-version statistics exist only for
``adapter="current"`` and ``adapter="previous"``, so a new adapter version every training
round never grows a new series. The served and stored versions are gauge values and a
sample's staleness a histogram of version differences, never a label.

Gauges that only one role sets (training loss in the trainer, distinct-2 in generators, ...)
read NaN until set, and ``reward_mean`` has no series for a slot without rewards, so a
dashboard's ``max`` or a rule's ``>= 0`` filter never mistakes "not this role" for zero.

Example:
    >>> from prometheus_client import CollectorRegistry
    >>> m = RaftMetrics(CollectorRegistry())
    >>> m.set_served_version(3)
    >>> m.observe_rewards([0.5, 0.7], adapter_version=3)
    >>> m.registry.get_sample_value("raft_stream_reward_mean", {"adapter": "current"})
    0.6
"""

from __future__ import annotations

import math
import platform
import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, Info

import raft_stream
from raft_stream import reasons as codes
from raft_stream.generation.engine_process import ENGINE_DEATH_SIGNALS
from raft_stream.roles.adapters import REFUSAL_REASONS
from raft_stream.stream.schema import ACTIONS, TRIGGERS
from raft_stream.textstats import distinct_n

if TYPE_CHECKING:
    from raft_stream.gate import Verdict

__all__ = [
    "ADAPTER_LOAD_FAILURE_REASONS",
    "ADAPTER_SLOTS",
    "DEAD_LETTER_REASONS",
    "EVICTION_REASONS",
    "REJECT_REASONS",
    "REWARD_BUCKETS",
    "STALENESS_BUCKETS",
    "SWAP_PHASES",
    "TRAINING_FAILURE_REASONS",
    "RaftMetrics",
]

NAMESPACE = "raft_stream"

ADAPTER_SLOTS = ("current", "previous")
"""Values of the ``adapter`` label: the served version and the one served before it."""

REJECT_REASONS = (*codes.REJECT_REASONS, "other")
"""``reason`` values of samples_rejected_total: raft_stream.reasons' codes (ranking's and
SafeReward's), so the two never drift apart."""

DEAD_LETTER_REASONS = (*codes.DEAD_LETTER_REASONS, "other")
"""``reason`` values of dead_letter_total: raft_stream.reasons' codes (the decoders' and the
roles')."""

TRAINING_FAILURE_REASONS = ("out_of_memory", "nonfinite_loss", "store_failed", "other")
"""``reason`` values of training_failures_total."""

EVICTION_REASONS = codes.EVICTION_REASONS
"""``reason`` values of buffer_evicted_total (``stale``, ``capacity``): raft_stream.reasons'
fixed set, with no ``other`` (only the buffer counts them)."""

GATE_OUTCOMES = (("promoted", "none"), *(("rejected", c) for c in codes.GATE_CRITERIA))
"""(verdict, criterion) label pairs of gate_verdicts_total."""

ADAPTER_LOAD_FAILURE_REASONS = (*REFUSAL_REASONS, "other")
"""``reason`` values of adapter_load_failures_total."""

REWARD_BUCKETS = (
    -10.0,
    -5.0,
    -2.0,
    *(round(-1.0 + 0.1 * i, 1) for i in range(21)),
    2.0,
    5.0,
    10.0,
)
"""Steps of 0.1 over [-1, 1] (VADER, probabilities, scaled scores) and a few wider ones."""

STALENESS_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 16, 32, 64)
"""Adapter versions behind the trainer's: each of 0..4 (the default ``buffer.max_staleness``
is 4) and a few wider ones for a raised or disabled bound."""

DURATION_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600)
SWAP_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)
SWAP_PHASES = ("detect", "fetch", "verify", "load", "first_sample")
"""The parts of an adapter swap in a generator (``adapter_swap_phase_seconds{phase}``):
the broker got the message that changed the target -> the engine stage folded it; locating
the version's folder; its manifest and checksum; loading it into the engine (a one-token
probe); loaded -> the engine finished the first prompt's samples on it (a prompt's K
responses end together in vLLM: its request finishes with the last of them)."""
SWAP_PHASE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class _RunningMean:
    """Sum and count of one adapter version's rewards."""

    def __init__(self, version: int | None = None) -> None:
        self.version = version
        self.total = 0.0
        self.count = 0

    @property
    def mean(self) -> float:
        return self.total / self.count


DELIVERIES = ("samples", "dead_letters", "adapter_announcement")
"""What the roles send with retries: the ``what`` label of ``delivery_retries_total``."""
COMMITS = ("prompts", "samples")
"""Whose offsets the roles commit: the ``what`` label of ``commit_failures_total``."""


class RaftMetrics:
    """Every metric of a raft-stream process, registered on one registry.

    Simple metrics are used directly (``m.prompts_consumed_total.inc()``); the methods wrap
    those whose labels need care. Thread-safe. Pass a fresh ``CollectorRegistry`` in tests;
    the default is prometheus_client's global ``REGISTRY``.
    """

    def __init__(
        self, registry: CollectorRegistry | None = None, distinct_window: int = 512
    ) -> None:
        self.registry = REGISTRY if registry is None else registry
        kw: dict[str, Any] = {"namespace": NAMESPACE, "registry": self.registry}

        # Stream I/O.
        self.prompts_consumed_total = Counter("prompts_consumed", "Prompt messages consumed.", **kw)
        self.consumer_lag_messages = Gauge(
            "consumer_lag_messages",
            "Messages behind the high-water mark, summed over this process's partitions.",
            ["topic"],
            **kw,
        )
        self.dead_letter_total = Counter(
            "dead_letter",
            "Messages sent to the dead-letter topic, by reason.",
            ["reason"],
            **kw,
        )
        self.delivery_retries_total = Counter(
            "delivery_retries",
            "Sends retried after a failed delivery (broker unreachable or slow), by what.",
            ["what"],
            **kw,
        )
        self.commit_failures_total = Counter(
            "commit_failures",
            "Offset commits that failed (their records may be redone), by topic role.",
            ["what"],
            **kw,
        )
        # Exported at 0 from the start, so rate() and alerts see the series before a failure.
        for what in DELIVERIES:
            self.delivery_retries_total.labels(what)
        for what in COMMITS:
            self.commit_failures_total.labels(what)

        # Generation, scoring and ranking.
        self.samples_generated_total = Counter("samples_generated", "Responses sampled.", **kw)
        self.samples_kept_total = Counter("samples_kept", "Samples kept by ranking.", **kw)
        self.samples_rejected_total = Counter(
            "samples_rejected", "Samples rejected by ranking, by reason.", ["reason"], **kw
        )
        self.generation_tokens_total = Counter(
            "generation_tokens", "Response tokens generated.", **kw
        )
        self.generation_distinct2 = Gauge(
            "generation_distinct2",
            "Distinct-2 (unique word bigrams / bigrams) of the most recent responses.",
            **kw,
        )
        self.reward = Histogram(
            "reward",
            "Rewards of scored samples, by the adapter that generated them "
            "(current: the served version; previous: an older one).",
            ["adapter"],
            buckets=REWARD_BUCKETS,
            **kw,
        )
        self.reward_mean = Gauge(
            "reward_mean",
            "Running mean reward of the current and previous adapter versions "
            "(no series for a slot without rewards).",
            ["adapter"],
            **kw,
        )
        self.reward_samples = Gauge(
            "reward_samples",
            "Rewards in reward_mean's running mean, per adapter slot.",
            ["adapter"],
            **kw,
        )
        self.kept_reward_mean = Gauge(
            "kept_reward_mean", "Mean reward of the samples in the top-k buffer.", **kw
        )

        # Buffer and training.
        self.buffer_samples = Gauge("buffer_samples", "Samples in the top-k reward buffer.", **kw)
        self.buffer_capacity = Gauge(
            "buffer_capacity", "Capacity of the top-k reward buffer.", **kw
        )
        self.buffer_evicted_total = Counter(
            "buffer_evicted",
            "Samples the top-k reward buffer dropped untrained, by reason (stale: older than "
            "buffer.max_staleness adapter versions; capacity: pushed out by higher rewards).",
            ["reason"],
            **kw,
        )
        self.sample_staleness_versions = Histogram(
            "sample_staleness_versions",
            "Adapter versions between the one a trained-on sample was generated by and the "
            "one the trainer trained from (0: the newest), once per sample per round.",
            buckets=STALENESS_BUCKETS,
            **kw,
        )
        self.training_rounds_total = Counter(
            "training_rounds", "Training rounds completed (one per streaming batch).", **kw
        )
        self.training_steps_total = Counter("training_steps", "Optimizer steps taken.", **kw)
        self.training_samples_total = Counter(
            "training_samples",
            "Samples trained on, by where their token ids came from (sampled: the engine's "
            "own ids; text: a black-box generator's text, tokenized again).",
            ["tokens"],
            **kw,
        )
        self.training_failures_total = Counter(
            "training_failures", "Training rounds that failed, by reason.", ["reason"], **kw
        )
        self.training_loss = Gauge("training_loss", "Mean loss of the last training round.", **kw)
        self.training_duration_seconds = Histogram(
            "training_duration_seconds",
            "Wall time of one training round.",
            buckets=DURATION_BUCKETS,
            **kw,
        )
        self.training_tokens_per_second = Gauge(
            "training_tokens_per_second", "Tokens per second of the last training round.", **kw
        )
        self.learning_stalled = Gauge(
            "learning_stalled",
            "1 when over the last training.stall_rounds rounds the loss did not fall and the "
            "mean reward did not rise (least-squares slopes), else 0.",
            **kw,
        )

        # The promotion gate (raft_stream.gate).
        self.gate_verdicts_total = Counter(
            "gate_verdicts",
            "Adapter versions the promotion gate judged, by verdict and, for a rejected one, "
            "the first criterion it failed (none when promoted).",
            ["verdict", "criterion"],
            **kw,
        )
        self.canary_reward_mean = Gauge(
            "canary_reward_mean",
            "Mean reward on the canary prompts of the last candidate and of the promoted version.",
            ["adapter"],
            **kw,
        )
        self.canary_distinct2 = Gauge(
            "canary_distinct2",
            "Distinct-2 of the canary responses, per adapter slot.",
            ["adapter"],
            **kw,
        )
        self.canary_kl = Gauge(
            "canary_kl",
            "KL divergence from the base model on the canary responses, nats per token, per "
            "adapter slot.",
            ["adapter"],
            **kw,
        )

        # Adapters.
        self.adapter_version_served = Gauge(
            "adapter_version_served", "Adapter version that new requests use (0: base).", **kw
        )
        self.adapter_version_stored = Gauge(
            "adapter_version_stored", "Newest adapter version stored or announced.", **kw
        )
        self.adapter_swap_seconds = Histogram(
            "adapter_swap_seconds",
            "From an adapter version being stored to the first sample generated on it.",
            buckets=SWAP_BUCKETS,
            **kw,
        )
        self.adapter_swap_phase_seconds = Histogram(
            "adapter_swap_phase_seconds",
            "The parts of an adapter swap in a generator: detect (broker -> folded), fetch, "
            "verify (manifest and checksum), load (into the engine), first_sample (loaded -> "
            "the engine finished the first prompt's samples on it).",
            ["phase"],
            buckets=SWAP_PHASE_BUCKETS,
            **kw,
        )
        self.adapter_actions_total = Counter(
            "adapter_actions",
            "Actions on the served adapter version this replica followed (promote, rollback, "
            "pin, unpin), by who decided: an operator or a generator's live rollback.",
            ["action", "trigger"],
            **kw,
        )
        self.adapter_load_failures_total = Counter(
            "adapter_load_failures",
            "Announced adapter versions refused (untrusted, unverifiable or unloadable), by "
            "reason; the served version keeps serving.",
            ["reason"],
            **kw,
        )

        # Process.
        self.ready = Gauge("ready", "1 when /readyz answers 200, else 0.", **kw)
        self.engine_deaths_total = Counter(
            "engine_deaths",
            "Generation engine processes found dead, by the signal that killed them "
            "(unknown: SIGKILL, e.g. the OOM killer, or an exit). The process restarts.",
            ["signal"],
            **kw,
        )
        for unset in (
            self.generation_distinct2,
            self.kept_reward_mean,
            self.training_loss,
            self.training_tokens_per_second,
            self.learning_stalled,
        ):
            unset.set(math.nan)
        self.build = Info("build", "Version of raft-stream and Python.", **kw)
        self.build.info({"version": raft_stream.__version__, "python": platform.python_version()})

        for counter, reasons in (
            (self.samples_rejected_total, REJECT_REASONS),
            (self.dead_letter_total, DEAD_LETTER_REASONS),
            (self.training_failures_total, TRAINING_FAILURE_REASONS),
            (self.adapter_load_failures_total, ADAPTER_LOAD_FAILURE_REASONS),
            (self.buffer_evicted_total, EVICTION_REASONS),
        ):
            for reason in reasons:
                counter.labels(reason=reason)
        for signal in ENGINE_DEATH_SIGNALS:
            self.engine_deaths_total.labels(signal=signal)
        for verdict, criterion in GATE_OUTCOMES:
            self.gate_verdicts_total.labels(verdict=verdict, criterion=criterion)
        for source in ("sampled", "text"):
            self.training_samples_total.labels(tokens=source)
        for phase in SWAP_PHASES:
            self.adapter_swap_phase_seconds.labels(phase=phase)
        for action in ACTIONS:
            for trigger in TRIGGERS:
                self.adapter_actions_total.labels(action=action, trigger=trigger)

        self._lock = threading.Lock()
        self._slots = {"current": _RunningMean(), "previous": _RunningMean()}
        self._stored_at: dict[int, float] = {}
        self._recent: deque[str] = deque(maxlen=distinct_window)
        for slot in ADAPTER_SLOTS:
            self.reward.labels(adapter=slot)
            self._publish_slot(slot)

    # -- bounded-label helpers -------------------------------------------------------------

    @staticmethod
    def _reason(reason: str, allowed: Sequence[str]) -> str:
        return reason if reason in allowed else "other"

    def count_rejected(self, reason: str, n: int = 1) -> None:
        """Count ``n`` rejected samples; an unknown reason counts as ``other``."""
        self.samples_rejected_total.labels(reason=self._reason(reason, REJECT_REASONS)).inc(n)

    def count_dead_letter(self, reason: str, n: int = 1) -> None:
        """Count ``n`` dead-lettered messages; an unknown reason counts as ``other``."""
        self.dead_letter_total.labels(reason=self._reason(reason, DEAD_LETTER_REASONS)).inc(n)

    def count_training_failure(self, reason: str) -> None:
        """Count a failed training round; an unknown reason counts as ``other``."""
        self.training_failures_total.labels(
            reason=self._reason(reason, TRAINING_FAILURE_REASONS)
        ).inc()

    def count_buffer_eviction(self, reason: str, n: int = 1) -> None:
        """Count ``n`` samples the buffer dropped for ``reason`` (one of EVICTION_REASONS;
        the signature of ``RewardBuffer``'s ``on_evict``)."""
        if reason not in EVICTION_REASONS:
            raise ValueError(
                f"buffer eviction reason {reason!r} is not one of {EVICTION_REASONS}; add it "
                "to raft_stream.reasons.EVICTION_REASONS"
            )
        self.buffer_evicted_total.labels(reason=reason).inc(n)

    def observe_staleness(self, staleness: Iterable[int]) -> None:
        """A training round starts on samples ``staleness`` adapter versions old (one value
        per sample; 0: generated by the version the trainer trains from)."""
        for versions in staleness:
            self.sample_staleness_versions.observe(versions)

    def count_engine_death(self, signal: str) -> None:
        """Count a dead engine; a signal outside ENGINE_DEATH_SIGNALS counts as ``unknown``."""
        self.engine_deaths_total.labels(
            signal=signal if signal in ENGINE_DEATH_SIGNALS else "unknown"
        ).inc()

    def observe_swap_phase(self, phase: str, seconds: float) -> None:
        """One part of an adapter swap (``phase`` of SWAP_PHASES) took ``seconds``."""
        if phase not in SWAP_PHASES:
            raise ValueError(f"swap phase {phase!r} is not one of {SWAP_PHASES}")
        self.adapter_swap_phase_seconds.labels(phase=phase).observe(max(0.0, seconds))

    def count_adapter_action(self, action: str, trigger: str) -> None:
        """Count an adapter action followed (``action`` of ACTIONS, ``trigger`` of
        TRIGGERS, as the decoder guarantees)."""
        self.adapter_actions_total.labels(action=action, trigger=trigger).inc()

    def count_adapter_load_failure(self, reason: str) -> None:
        """Count an adapter that failed to load; an unknown reason counts as ``other``."""
        self.adapter_load_failures_total.labels(
            reason=self._reason(reason, ADAPTER_LOAD_FAILURE_REASONS)
        ).inc()

    # -- adapter versions and rewards ------------------------------------------------------

    def _publish_slot(self, slot: str) -> None:
        stats = self._slots[slot]
        if stats.count:
            self.reward_mean.labels(adapter=slot).set(stats.mean)
        else:
            self.reward_mean.remove(slot)
        self.reward_samples.labels(adapter=slot).set(stats.count)

    def _roll_to(self, version: int) -> None:
        """Make ``version`` current; the old current becomes previous (lock held)."""
        current, previous = self._slots["current"], self._slots["previous"]
        if version == current.version:
            return
        if version == previous.version:  # rolled back to the version before
            self._slots = {"current": previous, "previous": current}
        else:
            self._slots = {"current": _RunningMean(version), "previous": current}
        for slot in ADAPTER_SLOTS:
            self._publish_slot(slot)

    def set_served_version(self, version: int) -> None:
        """The engine now serves ``version`` (0: the base model) to new requests."""
        with self._lock:
            self.adapter_version_served.set(version)
            self._roll_to(version)

    def set_stored_version(self, version: int, stored_at: float | None = None) -> None:
        """Adapter ``version`` was stored (trainer) or announced (generator) at ``stored_at``
        (Unix time, default now); the first sample generated on it observes the swap time."""
        with self._lock:
            self.adapter_version_stored.set(version)
            self._stored_at[version] = time.time() if stored_at is None else stored_at
            for old in [v for v in self._stored_at if v < version]:
                del self._stored_at[old]

    def observe_rewards(
        self, rewards: Iterable[float], adapter_version: int, generated_at: float | None = None
    ) -> None:
        """Record the rewards of samples generated on ``adapter_version``, the first of them
        at ``generated_at`` (Unix time, default now): the first ones on a version stored
        here observe ``adapter_swap_seconds``.

        The served version's rewards go to ``adapter="current"``, older ones to
        ``"previous"``; a version newer than any seen becomes current (the old current
        becomes previous). Non-finite rewards are skipped (ranking rejects them).
        """
        finite = [r for r in rewards if math.isfinite(r)]
        with self._lock:
            seen = [s.version for s in self._slots.values() if s.version is not None]
            if not seen or adapter_version > max(seen):
                self._roll_to(adapter_version)
            stored_at = self._stored_at.pop(adapter_version, None)
            if stored_at is not None:
                first = time.time() if generated_at is None else generated_at
                self.adapter_swap_seconds.observe(max(0.0, first - stored_at))
            slot = "current" if adapter_version == self._slots["current"].version else "previous"
            stats = self._slots[slot]
            if adapter_version == stats.version:
                stats.total += sum(finite)
                stats.count += len(finite)
                self._publish_slot(slot)
            child = self.reward.labels(adapter=slot)
            for value in finite:
                child.observe(value)

    # -- throughput and diversity ----------------------------------------------------------

    def observe_generation(self, tokens: int) -> None:
        """A generation batch produced ``tokens`` response tokens. Its rate is
        ``rate(raft_stream_generation_tokens_total[...])``: batches sample together, so no
        one batch's tokens over its own seconds is the engine's rate."""
        self.generation_tokens_total.inc(tokens)

    def observe_responses(self, responses: Iterable[str]) -> None:
        """Add responses to the recent window and update distinct-2."""
        with self._lock:
            self._recent.extend(responses)
            if self._recent:
                self.generation_distinct2.set(distinct_n(self._recent, 2))

    def observe_verdict(self, verdict: Verdict) -> None:
        """The promotion gate judged a candidate: count it and show its canary figures
        (and, when promoted, make them the promoted slot's)."""
        self.gate_verdicts_total.labels(
            verdict=verdict.name, criterion=verdict.criterion or "none"
        ).inc()
        slots = ("candidate", "promoted") if verdict.promoted else ("candidate",)
        figures = verdict.candidate
        for slot in slots:
            self.canary_reward_mean.labels(adapter=slot).set(figures.reward_mean)
            self.canary_distinct2.labels(adapter=slot).set(figures.distinct_2)
            self.canary_kl.labels(adapter=slot).set(figures.kl)

    def count_training_samples(self, *, sampled: int, retokenized: int) -> None:
        """Samples a round trained on: with the engine's ids, and tokenized from text."""
        self.training_samples_total.labels(tokens="sampled").inc(sampled)
        self.training_samples_total.labels(tokens="text").inc(retokenized)

    def observe_training_round(
        self, *, steps: int, tokens: int, seconds: float, loss: float
    ) -> None:
        """A training round finished: ``steps`` optimizer steps over ``tokens`` tokens."""
        self.training_rounds_total.inc()
        self.training_steps_total.inc(steps)
        self.training_duration_seconds.observe(seconds)
        self.training_loss.set(loss)
        if seconds > 0:
            self.training_tokens_per_second.set(tokens / seconds)

"""Every reason code raft-stream gives a record it does not use, in one place.

They are the ``reason`` of dead letters and of rejected samples, and the bounded ``reason``
label values of ``raft_stream_dead_letter_total`` and ``raft_stream_samples_rejected_total``
(``raft_stream.metrics`` reads these tuples; anything else is counted as ``other``), and
of ``raft_stream_buffer_evicted_total`` (``EVICTION_REASONS``: a fixed set, no ``other``).
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "DEAD_LETTER_REASONS",
    "DECODE_REASONS",
    "EVICTION_REASONS",
    "GATE_CRITERIA",
    "REJECT_REASONS",
    "REWARD_REASONS",
]

# -- dead letters: records a role cannot use ------------------------------------------------

TOO_LARGE: Final = "too_large"
NOT_UTF8: Final = "not_utf8"
NOT_JSON: Final = "not_json"
NOT_OBJECT: Final = "not_object"
TOO_DEEP: Final = "too_deep"
BAD_TEXT: Final = "bad_text"
"""Text with a lone surrogate (it cannot be encoded again) or NUL."""
NUMBER_OUT_OF_RANGE: Final = "number_out_of_range"
"""A number outside a 64-bit integer or float (it overflows where it is used)."""
UNKNOWN_SCHEMA_VERSION: Final = "unknown_schema_version"
MISSING_PROMPT: Final = "missing_prompt"
EMPTY_PROMPT: Final = "empty_prompt"
MISSING_FIELD: Final = "missing_field"
BAD_FIELD_TYPE: Final = "bad_field_type"
OVERRIDE_OUT_OF_BOUNDS: Final = "override_out_of_bounds"
"""A prompt's sampling override above ``generation.sampling.prompt_max_*``."""

DECODE_REASONS: Final = (
    TOO_LARGE,
    NOT_UTF8,
    NOT_JSON,
    NOT_OBJECT,
    TOO_DEEP,
    BAD_TEXT,
    NUMBER_OUT_OF_RANGE,
    UNKNOWN_SCHEMA_VERSION,
    MISSING_PROMPT,
    EMPTY_PROMPT,
    MISSING_FIELD,
    BAD_FIELD_TYPE,
    OVERRIDE_OUT_OF_BOUNDS,
)
"""Every reason a decoder of ``raft_stream.stream.schema`` gives."""

GENERATION_FAILED: Final = "generation_failed"
"""A well-formed prompt the generator cannot sample from (e.g. one longer than the model's
context), found by retrying it alone while the engine serves others."""

OUTPUT_TOO_LARGE: Final = "output_too_large"
"""A prompt whose sample would be larger than ``kafka.max_message_bytes``."""

REWARD_OUT_OF_BOUNDS: Final = "reward_out_of_bounds"
"""A kept sample whose reward is missing or outside ``buffer.reward_min..reward_max``: the
trainer does not train on it."""

INTERNAL_ERROR: Final = "internal_error"
"""A record whose handling raised an unexpected exception (a bug): the role dead-letters
that record with a short summary and goes on."""

REWARD_FAILED: Final = "reward_failed"
"""A prompt none of whose samples got a reward because the reward failed (raised or timed
out) for the whole batch, ``reward.max_attempts`` times."""

TRAINING_FAILED: Final = "training_failed"
"""A buffered sample of a streaming batch that failed ``training.max_failed_rounds`` rounds
in a row (the trainer's dead letters carry partition and offset -1: the sample came from
its buffer, whose records are committed already)."""

POISON: Final = "poison"
"""A record the process died holding alone ``kafka.poison_after_crashes`` times (a crash
no ``except`` catches: a segfault, the OOM killer, ``os._exit``); see
``raft_stream.stream.poison``."""

TOO_LONG_TO_TRAIN: Final = "too_long_to_train"
"""A kept sample whose prompt and response together are longer than
``training.max_length`` tokens: dropped whole, never cut (a prompt cut from the left loses
its BOS, system prompt and chat header, so the model would learn a context it never saw)."""

UNTRAINABLE: Final = "untrainable"
"""A kept sample with nothing to learn or ids the model cannot read: no response tokens,
or a token id outside the model's vocabulary."""

DEAD_LETTER_REASONS: Final = (
    *DECODE_REASONS,
    GENERATION_FAILED,
    OUTPUT_TOO_LARGE,
    REWARD_OUT_OF_BOUNDS,
    INTERNAL_ERROR,
    REWARD_FAILED,
    TRAINING_FAILED,
    POISON,
    TOO_LONG_TO_TRAIN,
    UNTRAINABLE,
)
"""Every dead-letter reason: the decoders' and the roles'."""

# -- rejected samples (Sample.reject_reason): scored, but not kept ----------------------------

REWARD_ERROR: Final = "reward_error"
REWARD_TIMEOUT: Final = "reward_timeout"
REWARD_NONFINITE: Final = "reward_nonfinite"
REWARD_REASONS: Final = (REWARD_ERROR, REWARD_TIMEOUT, REWARD_NONFINITE)
"""Why SafeReward gave a sample no reward."""

TOO_SHORT: Final = "too_short"
TOO_LONG: Final = "too_long"
BELOW_THRESHOLD: Final = "below_threshold"
DUPLICATE: Final = "duplicate"
NOT_SELECTED: Final = "not_selected"

REJECT_REASONS: Final = (
    TOO_SHORT,
    TOO_LONG,
    REWARD_NONFINITE,
    BELOW_THRESHOLD,
    DUPLICATE,
    NOT_SELECTED,
    REWARD_ERROR,
    REWARD_TIMEOUT,
)
"""Every reason ranking (``raft_stream.ranking``) and SafeReward reject a sample for."""

# -- buffer evictions: kept samples the trainer's buffer drops before training ---------------

STALE: Final = "stale"
"""A sample generated more than ``buffer.max_staleness`` adapter versions before the one the
trainer trains from: refused when it arrives, evicted when a new version is stored."""
CAPACITY: Final = "capacity"
"""A sample pushed out of the full buffer by higher rewards (``buffer.capacity``)."""

EVICTION_REASONS: Final = (STALE, CAPACITY)
"""Every reason the top-k reward buffer (``raft_stream.buffer``) drops a valid sample for:
the ``reason`` label values of ``raft_stream_buffer_evicted_total``."""

# -- adapter versions the promotion gate rejects (raft_stream.gate) ---------------------------

GATE_CRITERIA: Final = ("reward", "diversity", "kl")
"""What a rejected adapter version failed on its canary prompts, in the order the gate
checks: its reward fell below the promoted version's by more than the margin, its distinct-2
below the configured share of the base model's, its KL from the base model above the bound."""

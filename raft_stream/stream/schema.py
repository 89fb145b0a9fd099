"""Every record raft-stream reads or writes, one codec each, with total decoders.

Records: a prompt (with its sampling overrides; the prompts topic and prompt files), a
sample (the samples topic and the trainer's ``buffer.jsonl``, row for row the same JSON),
an adapter announcement and an adapter action (the adapters topic: the trainer announces
versions, operators and generators promote, roll back, pin and unpin them) and a dead
letter (the dead-letter topic).

Every message is a UTF-8 JSON object with ``"schema_version": 1`` (a message without it
counts as version 1). Unknown top-level keys are ignored, so producers can add fields
without breaking readers.

Decoders are total: for any bytes they return a record or raise
:class:`~raft_stream.errors.MessageError`, nothing else. Its ``reason`` is one of
:data:`REASONS` (``raft_stream.reasons.DECODE_REASONS``), a fixed set, so it can be a
metric label; :data:`DEAD_LETTER_REASONS` adds the reasons the roles give to records they
could decode but not use. Beyond the fields' own rules every decoder refuses, anywhere in
a message: more bytes than the configured limit, nesting deeper than :data:`MAX_DEPTH`,
text with a lone surrogate or NUL (it could not be encoded again, or is cut by C code),
and numbers outside a 64-bit integer or float (they overflow where they are used).

Encoders produce what the decoders accept; ``fit_dead_letter`` and ``check_output_size``
keep what the service writes within ``kafka.max_message_bytes``.

Example:
    >>> decode_prompt(b'{"id": "p1", "prompt": "Hi", "sampling": {"k": 4}}', 1_000_000)
    PromptRecord(id='p1', prompt='Hi', text='Hi', metadata={}, sampling={'k': 4}, token_ids=())
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
import reprlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import cache
from typing import Annotated, Any, Final

from pydantic import Strict, TypeAdapter, ValidationError

from raft_stream.config import KafkaConfig, SamplingConfig
from raft_stream.errors import MessageError
from raft_stream.reasons import (
    DEAD_LETTER_REASONS,
    GENERATION_FAILED,
    INTERNAL_ERROR,
    OUTPUT_TOO_LARGE,
    OVERRIDE_OUT_OF_BOUNDS,
    REWARD_OUT_OF_BOUNDS,
)
from raft_stream.reasons import DECODE_REASONS as REASONS
from raft_stream.types import AdapterVersion, PromptRecord, Sample

__all__ = [
    "ACTIONS",
    "DEAD_LETTER_REASONS",
    "GENERATION_FAILED",
    "INTERNAL_ERROR",
    "MAX_ACTION_TEXT_CHARS",
    "MAX_DEPTH",
    "MAX_MESSAGE_BYTES",
    "OUTPUT_TOO_LARGE",
    "OVERRIDE_OUT_OF_BOUNDS",
    "REASONS",
    "RECORD_OVERHEAD_BYTES",
    "REWARD_OUT_OF_BOUNDS",
    "SCHEMA_VERSION",
    "TRIGGERS",
    "VERDICTS",
    "AdapterAction",
    "AdapterAnnouncement",
    "DeadLetter",
    "check_output_size",
    "decode_adapter",
    "decode_adapters_message",
    "decode_dead_letter",
    "decode_prompt",
    "decode_sample",
    "dumps",
    "encode_action",
    "encode_adapter",
    "encode_dead_letter",
    "encode_prompt",
    "encode_sample",
    "fit_dead_letter",
    "show",
]

SCHEMA_VERSION: Final = 1

# -- limits ------------------------------------------------------------------------------

MAX_MESSAGE_BYTES: Final[int] = KafkaConfig.model_fields["max_message_bytes"].default
"""The decoders' size limit when the caller gives none: ``kafka.max_message_bytes``'s
default."""

MAX_DEPTH: Final = 32
"""Deepest nesting of JSON objects and arrays a message may have (the top level is 1)."""

RECORD_OVERHEAD_BYTES: Final = 128
"""What a Kafka record adds to its key and value (batch header and varints), rounded up:
kafka-python's estimate for one record without headers is under 90 bytes."""

_INT_MIN: Final = -(2**63)
_INT_MAX: Final = 2**63 - 1
# A lone surrogate cannot be encoded as UTF-8; NUL ends strings in C code and logs.
_BAD_TEXT: Final = re.compile("[\x00\ud800-\udfff]")

MAX_DETAIL_CHARS: Final = 1000
"""A dead letter's ``detail`` is cut to this many characters."""
MAX_KEY_BYTES: Final = 1024
"""A dead letter's key is cut to this many bytes."""
MAX_HEADERS_BYTES: Final = 4096
"""A dead letter keeps headers (names and values) up to this many bytes in all."""

_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = 60
_repr.maxlist = _repr.maxdict = 4
_repr.maxlevel = 2


def show(value: Any) -> str:
    """A short repr of any value for an error message: a detail that echoed a 450 KB
    field whole could not be dead-lettered."""
    return _repr.repr(value)


# -- JSON --------------------------------------------------------------------------------


def dumps(obj: Any) -> bytes:
    """Compact UTF-8 JSON; NaN and infinity are refused because they are not JSON."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


def _reject_constant(name: str) -> Any:
    # json.loads accepts NaN/Infinity by default; other languages' parsers do not.
    raise ValueError(f"{name} is not valid JSON")


def _check_tree(obj: Any) -> None:
    """Refuse what no field may hold, anywhere: deep nesting, bad text, huge numbers.

    Iterative, so no depth can overflow the stack. ``json.loads`` turns 1e400 into
    infinity and keeps 400-digit integers exactly; both overflow ``float()`` later.
    """
    # (value, its path as a linked list (key, parent) built into text only for an error)
    stack: list[tuple[Any, _Path, int]] = [(obj, None, 1)]
    while stack:
        value, path, depth = stack.pop()
        if isinstance(value, str):
            _check_text(value, path)
        elif isinstance(value, bool) or value is None:
            continue
        elif isinstance(value, int):
            if not _INT_MIN <= value <= _INT_MAX:
                raise MessageError(
                    "number_out_of_range",
                    f"{_where(path)}: the integer {show(value)} is outside 64-bit range",
                )
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise MessageError(
                    "number_out_of_range",
                    f"{_where(path)}: the number is outside 64-bit float range",
                )
        else:
            if depth > MAX_DEPTH:
                raise MessageError("too_deep", f"nesting deeper than {MAX_DEPTH} at {_where(path)}")
            if isinstance(value, dict):
                for key, item in value.items():
                    _check_text(key, path, is_key=True)
                    stack.append((item, (key, path), depth + 1))
            else:  # a list: json.loads makes nothing else
                stack.extend((item, (i, path), depth + 1) for i, item in enumerate(value))


_Path = tuple[str | int, "_Path"] | None


def _where(path: _Path) -> str:
    """``sampling.temperature`` or ``metadata.tags[2]``, shortened for a message."""
    parts: list[str] = []
    while path is not None:
        key, path = path
        parts.append(f"[{key}]" if isinstance(key, int) else f".{show(key)[1:-1]}")
        if len(parts) > MAX_DEPTH:
            break
    text = "".join(reversed(parts)).lstrip(".")
    return text or "the message"


def _check_text(text: str, path: _Path, *, is_key: bool = False) -> None:
    bad = _BAD_TEXT.search(text)
    if bad is not None:
        what = "NUL" if bad.group() == "\x00" else f"a lone surrogate U+{ord(bad.group()):04X}"
        where = f"a key of {_where(path)}" if is_key else _where(path)
        raise MessageError(
            "bad_text",
            f"{where} holds {what} at character {bad.start()}; send valid Unicode text",
        )


def _load_object(value: bytes, max_bytes: int) -> dict[str, Any]:
    """Bytes -> JSON object of a known schema version, or MessageError."""
    if len(value) > max_bytes:
        raise MessageError("too_large", f"{len(value)} bytes > limit of {max_bytes}")
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MessageError("not_utf8", str(exc)) from None
    if not text.strip():
        raise MessageError("not_json", "empty message")
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:  # ValueError: also > 4300-digit integers
        raise MessageError("not_json", str(exc)[:200]) from None
    if not isinstance(obj, dict):
        raise MessageError("not_object", f"top level is a JSON {type(obj).__name__}")
    _check_tree(obj)
    version = obj.get("schema_version", SCHEMA_VERSION)
    # `True == 1` in Python: compare the type too.
    if type(version) is not int or version != SCHEMA_VERSION:
        raise MessageError(
            "unknown_schema_version",
            f"schema_version {show(version)} is not supported (this reader knows {SCHEMA_VERSION})",
        )
    return obj


# JSON value kinds the decoders check. JSON true/false must not pass as 1/0.
_KINDS: Final[dict[str, Callable[[Any], bool]]] = {
    "str": lambda v: isinstance(v, str),
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "object": lambda v: isinstance(v, dict),
}


def _field(obj: dict[str, Any], name: str, kind: str, *, required: bool = True) -> Any:
    """``obj[name]`` checked against a kind of _KINDS; None when optional and absent."""
    value = obj.get(name)
    if value is None:
        if required:
            raise MessageError("missing_field", f"{name} is required")
        return None
    if not _KINDS[kind](value):
        raise MessageError(
            "bad_field_type", f"{name} must be {kind}, got {type(value).__name__} {show(value)}"
        )
    return value


# -- prompts -----------------------------------------------------------------------------


@cache
def _override_adapter(name: str) -> TypeAdapter[Any]:
    """The type and range of an override: those of the SamplingConfig field, strictly."""
    spec = SamplingConfig.model_fields[name]
    return TypeAdapter(Annotated[spec.annotation, Strict(), *spec.metadata])  # type: ignore[arg-type]


_DEFAULT_SAMPLING: Final = SamplingConfig()


def _check_sampling(sampling: dict[str, Any], limits: SamplingConfig) -> dict[str, Any]:
    """A prompt's sampling overrides, typed and within the configuration's ranges and the
    operator's per-prompt maxima (``generation.sampling.prompt_max_*``)."""
    maxima = limits.override_maxima()
    checked: dict[str, Any] = {}
    for key, value in sampling.items():
        if key not in maxima:
            allowed = ", ".join(maxima)
            raise MessageError(
                "bad_field_type", f"sampling.{key[:40]} is unknown; allowed: {allowed}"
            )
        try:
            checked[key] = _override_adapter(key).validate_python(value)
        except ValidationError as exc:
            problem = exc.errors()[0]["msg"]
            raise MessageError(
                "bad_field_type", f"sampling.{key}: {problem}, got {show(value)}"
            ) from None
        if checked[key] > maxima[key]:
            limit = f"prompt_{key}" if key.startswith("max_") else f"prompt_max_{key}"
            raise MessageError(
                OVERRIDE_OUT_OF_BOUNDS,
                f"sampling.{key} {show(value)} is above this service's limit of "
                f"{maxima[key]:g} (generation.sampling.{limit}); ask for at most "
                "that, or have the operator raise the limit",
            )
    return checked


def decode_prompt(
    value: bytes,
    max_bytes: int,
    fallback_id: str | None = None,
    sampling: SamplingConfig = _DEFAULT_SAMPLING,
) -> PromptRecord:
    """Decode a prompt message (or a prompt file's line), or raise MessageError.

    A message without ``id`` (or with ``"id": null``) gets ``fallback_id``; the consumer
    passes ``topic/partition/offset``, which is stable across redeliveries. Without a
    fallback the id is a hash of the bytes. An integer id is accepted as its string.
    ``sampling`` gives the overrides' ranges and maxima (the service's configuration).
    """
    obj = _load_object(value, max_bytes)
    prompt = obj.get("prompt")
    if prompt is None:
        raise MessageError("missing_prompt", "the prompt field is required")
    if not isinstance(prompt, str):
        raise MessageError("bad_field_type", f"prompt must be str, got {type(prompt).__name__}")
    if not prompt.strip():
        raise MessageError("empty_prompt", "the prompt is empty or only whitespace")
    raw_id = obj.get("id")
    if raw_id is None:
        raw_id = fallback_id or "sha256:" + hashlib.sha256(value).hexdigest()[:16]
    elif isinstance(raw_id, int) and not isinstance(raw_id, bool):
        raw_id = str(raw_id)
    elif not isinstance(raw_id, str) or not raw_id:
        raise MessageError("bad_field_type", f"id must be a non-empty str, got {show(raw_id)}")
    metadata = _field(obj, "metadata", "object", required=False) or {}
    overrides = _field(obj, "sampling", "object", required=False) or {}
    return PromptRecord(
        id=raw_id, prompt=prompt, metadata=metadata, sampling=_check_sampling(overrides, sampling)
    )


def encode_prompt(record: PromptRecord) -> dict[str, Any]:
    """A prompt as a JSON object for the prompts topic or a prompt file (``text``, the
    templated prompt, is the reader's business and does not travel)."""
    message: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "id": record.id,
        "prompt": record.prompt,
    }
    if record.metadata:
        message["metadata"] = record.metadata
    if record.sampling:
        message["sampling"] = record.sampling
    return message


# -- samples -----------------------------------------------------------------------------


def encode_sample(sample: Sample) -> dict[str, Any]:
    """A sample as a JSON object for the samples topic and the trainer's buffer file.

    ``prompt_text`` (the templated prompt the model saw) travels too, and, from engines
    that expose them, the token ids the engine saw and sampled and the sampled tokens'
    log-probs, so the trainer trains on exactly those. ``tokens`` says which:
    ``"sampled"`` (ids included) or ``"text"`` (a black-box generator: the trainer
    tokenizes the text again); readers derive it from the ids, so it cannot disagree.
    A non-finite reward is sent as null: JSON has no NaN. ``created_at`` (seconds since
    the epoch): when the engine generated the response (``Sample.generated_at``), else now.
    """
    reward = sample.reward if sample.reward is not None and math.isfinite(sample.reward) else None
    created_at = time.time() if sample.generated_at is None else sample.generated_at
    message: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "prompt_id": sample.prompt_id,
        "prompt": sample.prompt,
        "prompt_text": sample.prompt_text,
        "response": sample.response,
        "reward": reward,
        "adapter_version": sample.adapter_version,
        "rank": sample.rank,
        "response_tokens": sample.response_tokens,
        "reject_reason": sample.reject_reason,
        "finish_reason": sample.finish_reason,
        "created_at": created_at,
        "tokens": "sampled" if sample.token_faithful else "text",
    }
    if sample.token_faithful:
        message["prompt_token_ids"] = list(sample.prompt_token_ids)
        message["response_token_ids"] = list(sample.response_token_ids)
        if sample.response_logprobs is not None:
            message["response_logprobs"] = [_logprob(lp) for lp in sample.response_logprobs]
    return message


def _logprob(value: float) -> float:
    """A sampling log-prob as the record holds it: 7 significant digits (float32, what the
    engine computed; half the bytes of a full repr; rounding again changes nothing), and
    at most 0 (float rounding can leave +1e-7 on a near-certain token)."""
    return min(float(f"{value:.7g}"), 0.0)


def _token_ids(obj: dict[str, Any], name: str) -> tuple[int, ...]:
    """A list of token ids (non-negative 32-bit integers); () when absent."""
    value = obj.get(name)
    if value is None:
        return ()
    if not isinstance(value, list) or not all(
        _KINDS["int"](token) and 0 <= token < 2**31 for token in value
    ):
        raise MessageError(
            "bad_field_type", f"{name} must be a list of token ids (integers >= 0 and < 2**31)"
        )
    return tuple(value)


def _logprobs(obj: dict[str, Any], response_ids: tuple[int, ...]) -> tuple[float, ...] | None:
    """One log-probability (a number <= 0) per response token id; None when absent."""
    value = obj.get("response_logprobs")
    if value is None:
        return None
    if (
        not isinstance(value, list)
        or len(value) != len(response_ids)
        or not all(_KINDS["number"](lp) and lp <= 0 for lp in value)
    ):
        raise MessageError(
            "bad_field_type",
            f"response_logprobs must be a list of {len(response_ids)} numbers <= 0, one per "
            "response_token_ids",
        )
    return tuple(_logprob(lp) for lp in value)


def decode_sample(value: bytes, max_bytes: int = MAX_MESSAGE_BYTES) -> Sample:
    """Decode a samples-topic message or a buffer-file row, or raise MessageError.

    Token ids come in pairs: ``prompt_token_ids`` and ``response_token_ids`` both, or
    neither (a text-only sample); ``response_logprobs`` only with them, one per id.
    """
    obj = _load_object(value, max_bytes)
    prompt = _field(obj, "prompt", "str")
    reward = _field(obj, "reward", "number", required=False)
    prompt_ids = _token_ids(obj, "prompt_token_ids")
    response_ids = _token_ids(obj, "response_token_ids")
    created_at = _field(obj, "created_at", "number", required=False)
    if bool(prompt_ids) != bool(response_ids):
        raise MessageError(
            "bad_field_type",
            "prompt_token_ids and response_token_ids must be sent together (or neither)",
        )
    return Sample(
        prompt_id=_field(obj, "prompt_id", "str"),
        prompt=prompt,
        prompt_text=_field(obj, "prompt_text", "str", required=False) or prompt,
        response=_field(obj, "response", "str"),
        response_tokens=_field(obj, "response_tokens", "int"),
        adapter_version=_field(obj, "adapter_version", "int"),
        reward=None if reward is None else float(reward),
        reject_reason=_field(obj, "reject_reason", "str", required=False),
        rank=_field(obj, "rank", "int", required=False),
        finish_reason=_field(obj, "finish_reason", "str", required=False),
        prompt_token_ids=prompt_ids,
        response_token_ids=response_ids,
        response_logprobs=_logprobs(obj, response_ids) if response_ids else None,
        generated_at=None if created_at is None else float(created_at),
    )


def check_output_size(value: bytes, key: bytes | None, max_bytes: int, what: str) -> None:
    """Raise MessageError(``output_too_large``) when a record of this key and value would
    be over ``max_bytes`` (``kafka.max_message_bytes``, the producer's limit too)."""
    size = len(value) + len(key or b"") + RECORD_OVERHEAD_BYTES
    if size > max_bytes:
        raise MessageError(
            OUTPUT_TOO_LARGE,
            f"the {what} would be {size} bytes with its key, over kafka.max_message_bytes "
            f"({max_bytes}); shorten the prompt or its id, or raise the limit (and the "
            "broker's message.max.bytes)",
        )


# -- adapter announcements -----------------------------------------------------------------


@dataclass(frozen=True)
class AdapterAnnouncement:
    """A stored adapter version as announced on the adapters topic."""

    version: int
    sha256: str
    uri: str
    """Where to fetch the adapter folder, e.g. ``file:///state/adapters/v000003``."""
    base_model: str
    created_at: float
    metrics: dict[str, float] = field(default_factory=dict)
    lineage: str | None = None
    """Id of the adapter store (and so the trainer) that wrote the version."""
    signature: str | None = None
    """Hex HMAC-SHA256 of the other fields (``roles.adapters.signature_of``); None: unsigned."""
    verdict: str | None = None
    """The promotion gate's verdict, one of VERDICTS; None: no gate judged the version."""


VERDICTS: Final = ("promoted", "rejected")
"""An adapter version's promotion-gate verdict: served, or stored and never served."""


def encode_adapter(
    adapter: AdapterVersion, uri: str | None = None, signature: str | None = None
) -> dict[str, Any]:
    """An adapter announcement; ``uri`` defaults to the version folder's file:// URI."""
    return {
        "schema_version": SCHEMA_VERSION,
        "version": adapter.version,
        "sha256": adapter.sha256,
        "uri": uri or adapter.path.resolve().as_uri(),
        "base_model": adapter.base_model,
        "metrics": dict(adapter.metrics),
        "created_at": adapter.created_at,
        "lineage": adapter.lineage,
        "signature": signature,
        "verdict": adapter.verdict,
    }


def decode_adapter(value: bytes, max_bytes: int = MAX_MESSAGE_BYTES) -> AdapterAnnouncement:
    """Decode an adapter announcement, or raise MessageError."""
    return _announcement(_load_object(value, max_bytes))


def _announcement(obj: dict[str, Any]) -> AdapterAnnouncement:
    metrics = _field(obj, "metrics", "object", required=False) or {}
    for name, metric in metrics.items():
        if not _KINDS["number"](metric):
            raise MessageError(
                "bad_field_type", f"metrics.{name[:40]} must be number, got {show(metric)}"
            )
    verdict = _field(obj, "verdict", "str", required=False)
    if verdict is not None and verdict not in VERDICTS:
        raise MessageError(
            "bad_field_type", f"verdict must be one of {VERDICTS}, got {show(verdict)}"
        )
    version = _version_field(obj, "version", required=True)
    assert version is not None
    return AdapterAnnouncement(
        version=version,
        sha256=_field(obj, "sha256", "str"),
        uri=_field(obj, "uri", "str"),
        base_model=_field(obj, "base_model", "str"),
        created_at=float(_field(obj, "created_at", "number")),
        metrics={name: float(metric) for name, metric in metrics.items()},
        lineage=_field(obj, "lineage", "str", required=False),
        signature=_field(obj, "signature", "str", required=False),
        verdict=verdict,
    )


# -- adapter actions ---------------------------------------------------------------------

ACTIONS: Final = ("promote", "rollback", "pin", "unpin")
"""What an adapter action does (``roles.serving.ServingLedger`` gives each its meaning)."""
TRIGGERS: Final = ("operator", "automatic")
"""Who decided an action: a person (``raft-stream adapters ...``) or a generator's live
rollback."""
MAX_ACTION_TEXT_CHARS: Final = 500
"""Longest ``by`` and ``reason`` of an adapter action."""


@dataclass(frozen=True)
class AdapterAction:
    """An action on the served adapter version, sent on the adapters topic so that every
    replica (each reads the whole topic) follows it."""

    action: str
    """One of ACTIONS."""
    version: int | None
    """promote, pin: that version; rollback: the version to serve again (0: the base
    model); unpin: None."""
    lineage: str
    """The adapter store lineage it applies to (generators of another lineage ignore it)."""
    by: str
    """Who sent it: ``user@host`` for an operator, ``generator@host/pid`` for a rollback."""
    at: float
    """When it was sent, Unix seconds."""
    trigger: str = "operator"
    """One of TRIGGERS."""
    from_version: int | None = None
    """rollback: the version rolled back from; every version in (version, from_version] is
    withdrawn. None for the other actions."""
    reason: str = ""
    signature: str | None = None
    """Hex HMAC-SHA256 of the other fields, as for announcements; None: unsigned."""


def encode_action(action: AdapterAction) -> dict[str, Any]:
    """An adapter action as a JSON object for the adapters topic."""
    return {
        "schema_version": SCHEMA_VERSION,
        "action": action.action,
        "version": action.version,
        "from_version": action.from_version,
        "lineage": action.lineage,
        "by": action.by,
        "at": action.at,
        "trigger": action.trigger,
        "reason": action.reason,
        "signature": action.signature,
    }


def _version_field(obj: dict[str, Any], name: str, *, required: bool) -> int | None:
    version = _field(obj, name, "int", required=required)
    if version is not None and not 0 <= version < 2**31:
        raise MessageError("bad_field_type", f"{name} must be in [0, 2**31), got {show(version)}")
    return version


def _decode_action(obj: dict[str, Any]) -> AdapterAction:
    action = _field(obj, "action", "str")
    if action not in ACTIONS:
        raise MessageError("bad_field_type", f"action must be one of {ACTIONS}, got {show(action)}")
    trigger = _field(obj, "trigger", "str", required=False) or "operator"
    if trigger not in TRIGGERS:
        raise MessageError(
            "bad_field_type", f"trigger must be one of {TRIGGERS}, got {show(trigger)}"
        )
    version = _version_field(obj, "version", required=action != "unpin")
    from_version = _version_field(obj, "from_version", required=action == "rollback")
    if action == "unpin" and version is not None:
        raise MessageError("bad_field_type", f"unpin takes no version, got {show(version)}")
    if action == "rollback":
        assert version is not None and from_version is not None  # required above
        if from_version <= version:
            raise MessageError(
                "bad_field_type",
                f"a rollback goes back: from_version {from_version} must be above version "
                f"{version}",
            )
    elif from_version is not None:
        raise MessageError("bad_field_type", f"only a rollback has a from_version ({action})")
    texts = {name: _field(obj, name, "str", required=name == "by") for name in ("by", "reason")}
    for name, text in texts.items():
        if text is not None and len(text) > MAX_ACTION_TEXT_CHARS:
            raise MessageError(
                "bad_field_type",
                f"{name} is {len(text)} characters; at most {MAX_ACTION_TEXT_CHARS}",
            )
    at = float(_field(obj, "at", "number"))  # finite: _load_object refuses the others
    return AdapterAction(
        action=action,
        version=version,
        lineage=_field(obj, "lineage", "str"),
        by=texts["by"],
        at=at,
        trigger=trigger,
        from_version=from_version,
        reason=texts["reason"] or "",
        signature=_field(obj, "signature", "str", required=False),
    )


def decode_adapters_message(
    value: bytes, max_bytes: int = MAX_MESSAGE_BYTES
) -> AdapterAnnouncement | AdapterAction:
    """Decode any adapters-topic message: an action (it has an ``action`` key) or an
    announcement; raise MessageError."""
    obj = _load_object(value, max_bytes)
    if "action" in obj:
        return _decode_action(obj)
    return _announcement(obj)


# -- dead letters --------------------------------------------------------------------------


@dataclass(frozen=True)
class DeadLetter:
    """A message that cannot be used: where it was, why, and its exact bytes."""

    reason: str
    """One of DEAD_LETTER_REASONS."""
    detail: str
    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    value: bytes | None
    """The original value; None for a null (tombstone) record."""
    key: bytes | None = None
    headers: tuple[tuple[str, bytes | None], ...] = ()
    original_size: int | None = None
    """Size of the original value when ``value`` was cut to fit (see ``fit_dead_letter``);
    None when ``value`` is whole."""
    cut: tuple[str, ...] = ()
    """Fields ``fit_dead_letter`` shortened: any of detail, key, headers, original."""


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode("ascii")


def _unb64(text: Any, name: str) -> bytes | None:
    if text is None:
        return None
    try:
        return base64.b64decode(text, validate=True)
    except (TypeError, ValueError):  # binascii.Error is a ValueError
        raise MessageError("bad_field_type", f"{name} must be base64 text or null") from None


def encode_dead_letter(letter: DeadLetter) -> dict[str, Any]:
    """The dead-letter envelope; the value, key and headers are base64 so bytes survive.
    Pass a letter through ``fit_dead_letter`` first to bound its size."""
    envelope = {
        "schema_version": SCHEMA_VERSION,
        "reason": letter.reason,
        "detail": letter.detail,
        "topic": letter.topic,
        "partition": letter.partition,
        "offset": letter.offset,
        "timestamp_ms": letter.timestamp_ms,
        "original_b64": _b64(letter.value),
        "original_size": letter.original_size,
        "key_b64": _b64(letter.key),
        "headers": [[name, _b64(data)] for name, data in letter.headers],
    }
    if letter.cut:
        envelope["cut"] = list(letter.cut)
    return envelope


def _valid_text(text: str) -> str:
    """Text the decoders accept: a detail may quote an exception that quotes the input,
    and lone surrogates cannot be sent (they become "?"), nor NUL be read (it becomes
    "\\x00")."""
    return text.encode("utf-8", "replace").decode("utf-8").replace("\x00", "\\x00")


def _cut_text(text: str, chars: int) -> str:
    if len(text) <= chars:
        return text
    note = f" ... [cut from {len(text)} chars]"
    return text[: max(0, chars - len(note))] + note


def _cut_headers(
    headers: tuple[tuple[str, bytes | None], ...], budget: int
) -> tuple[tuple[str, bytes | None], ...]:
    kept = []
    for name, data in headers:
        size = len(name.encode("utf-8", "replace")) + len(data or b"")
        if size > budget:
            break
        kept.append((_valid_text(name), data))
        budget -= size
    return tuple(kept)


def _with(cut: list[str], name: str) -> list[str]:
    return cut if name in cut else [*cut, name]


def _envelope_size(letter: DeadLetter) -> int:
    return len(dumps(encode_dead_letter(letter))) + len(letter.key or b"")


def fit_dead_letter(letter: DeadLetter, max_bytes: int = MAX_MESSAGE_BYTES) -> DeadLetter:
    """The letter cut so that its envelope and key make a record of at most ``max_bytes``.

    The detail, key and headers are cut to small fixed bounds first (then further only if
    the limit is tiny); the original value keeps what room is left (base64 grows it by
    4/3) and ``original_size`` tells its full size. ``cut`` names what was shortened.
    Without this, a poison message could never be dead-lettered (nor committed).
    """
    detail = _cut_text(_valid_text(letter.detail), MAX_DETAIL_CHARS)
    key = None if letter.key is None else letter.key[:MAX_KEY_BYTES]
    headers = _cut_headers(letter.headers, MAX_HEADERS_BYTES)
    cut = [
        name
        for name, shortened in (
            ("detail", detail != letter.detail),
            ("key", key != letter.key),
            ("headers", headers != letter.headers),
        )
        if shortened
    ]
    budget = max_bytes - RECORD_OVERHEAD_BYTES
    # Room for original_size's digits and the cut list, filled in below.
    slack = 96
    small = replace(
        letter,
        detail=detail,
        key=key,
        headers=headers,
        value=None if letter.value is None else b"",
        original_size=None,
        cut=(),
    )
    # A tiny limit: drop the headers, then the key, then cut the detail until it fits.
    overflow = _envelope_size(small) + slack - budget
    if overflow > 0 and small.headers:
        small, cut = replace(small, headers=()), _with(cut, "headers")
        overflow = _envelope_size(small) + slack - budget
    if overflow > 0 and small.key:
        small, cut = replace(small, key=None), _with(cut, "key")
        overflow = _envelope_size(small) + slack - budget
    if overflow > 0:
        # Each character takes at least one byte of JSON.
        kept = small.detail[: max(0, len(small.detail) - overflow)]
        small, cut = replace(small, detail=kept), _with(cut, "detail")
    room = budget - slack - _envelope_size(small)
    keep = max(0, room) // 4 * 3
    value, original_size = letter.value, letter.original_size
    if value is not None and len(value) > keep:
        value, original_size = value[:keep], letter.original_size or len(value)
        cut.append("original")
    return replace(small, value=value, original_size=original_size, cut=tuple(cut))


def decode_dead_letter(value: bytes, max_bytes: int = MAX_MESSAGE_BYTES) -> DeadLetter:
    """Decode a dead-letter envelope (for replay tools and tests), or raise MessageError."""
    obj = _load_object(value, max_bytes)
    headers = obj.get("headers") or []
    if not isinstance(headers, list) or not all(
        isinstance(h, list) and len(h) == 2 and isinstance(h[0], str) for h in headers
    ):
        raise MessageError("bad_field_type", "headers must be a list of [name, base64] pairs")
    cut = obj.get("cut") or []
    if not isinstance(cut, list) or not all(isinstance(name, str) for name in cut):
        raise MessageError("bad_field_type", "cut must be a list of field names")
    return DeadLetter(
        reason=_field(obj, "reason", "str"),
        detail=_field(obj, "detail", "str"),
        topic=_field(obj, "topic", "str"),
        partition=_field(obj, "partition", "int"),
        offset=_field(obj, "offset", "int"),
        timestamp_ms=_field(obj, "timestamp_ms", "int"),
        value=_unb64(obj.get("original_b64"), "original_b64"),
        key=_unb64(obj.get("key_b64"), "key_b64"),
        headers=tuple((name, _unb64(data, "headers")) for name, data in headers),
        original_size=_field(obj, "original_size", "int", required=False),
        cut=tuple(cut),
    )

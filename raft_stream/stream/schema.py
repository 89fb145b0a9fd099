"""Versioned JSON messages on the raft-stream topics, and their strict decoders.

Every message is a UTF-8 JSON object with ``"schema_version": 1`` (a prompt without it
counts as version 1). Decoders raise :class:`~raft_stream.errors.MessageError` whose
``reason`` is one of :data:`REASONS`, a fixed set, so it can be a metric label.
Unknown top-level keys are ignored, so producers can add fields without breaking readers.

Example:
    >>> decode_prompt(b'{"id": "p1", "prompt": "Hi", "sampling": {"k": 4}}', 1_000_000)
    PromptRecord(id='p1', prompt='Hi', text='Hi', metadata={}, sampling={'k': 4})
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from raft_stream.errors import MessageError
from raft_stream.types import AdapterVersion, PromptRecord, Sample

__all__ = [
    "DEAD_LETTER_REASONS",
    "GENERATION_FAILED",
    "MAX_DEAD_LETTER_ORIGINAL_BYTES",
    "REASONS",
    "SCHEMA_VERSION",
    "AdapterAnnouncement",
    "DeadLetter",
    "decode_adapter",
    "decode_dead_letter",
    "decode_prompt",
    "decode_sample",
    "dumps",
    "encode_adapter",
    "encode_dead_letter",
    "encode_sample",
]

SCHEMA_VERSION: Final = 1

REASONS: Final = (
    "too_large",
    "not_utf8",
    "not_json",
    "not_object",
    "unknown_schema_version",
    "missing_prompt",
    "empty_prompt",
    "missing_field",
    "bad_field_type",
)
"""Every dead-letter reason a decoder can give (``missing_field``: samples and adapters)."""

GENERATION_FAILED: Final = "generation_failed"
"""Dead-letter reason of a well-formed prompt the generator cannot sample from (e.g. one
longer than the model's context), found by retrying it alone while the engine serves others."""

DEAD_LETTER_REASONS: Final = (*REASONS, GENERATION_FAILED)
"""Every dead-letter reason raft-stream gives: the decoders' and the generator's."""

MAX_DEAD_LETTER_ORIGINAL_BYTES: Final = 700_000
"""Original bytes kept whole in a dead-letter envelope; longer ones are cut to this.
Base64 grows them by 4/3, and the envelope must stay under Kafka's default 1 MiB
message limit, or the poison message could never be dead-lettered (nor committed)."""

# JSON value kinds the decoders check. JSON true/false must not pass as 1/0.
_KINDS: Final[dict[str, Callable[[Any], bool]]] = {
    "str": lambda v: isinstance(v, str),
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "object": lambda v: isinstance(v, dict),
}

# Per-prompt sampling overrides: name -> (kind, range check, the range in words).
# isfinite: json.loads turns 1e400 into infinity.
_SAMPLING_RULES: Final[dict[str, tuple[str, Callable[[Any], bool], str]]] = {
    "k": ("int", lambda v: 1 <= v <= 256, "an integer in 1..256"),
    "temperature": ("number", lambda v: math.isfinite(v) and v >= 0, "a number >= 0"),
    "top_p": ("number", lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "max_new_tokens": ("int", lambda v: v >= 1, "an integer >= 1"),
}


def dumps(obj: Any) -> bytes:
    """Compact UTF-8 JSON; NaN and infinity are refused because they are not JSON."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


def _reject_constant(name: str) -> Any:
    # json.loads accepts NaN/Infinity by default; other languages' parsers do not.
    raise ValueError(f"{name} is not valid JSON")


def _load_object(value: bytes, max_bytes: int | None = None) -> dict[str, Any]:
    """Bytes -> JSON object of a known schema version, or MessageError."""
    if max_bytes is not None and len(value) > max_bytes:
        raise MessageError("too_large", f"{len(value)} bytes > limit of {max_bytes}")
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MessageError("not_utf8", str(exc)) from None
    if not text.strip():
        raise MessageError("not_json", "empty message")
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise MessageError("not_json", str(exc)) from None
    if not isinstance(obj, dict):
        raise MessageError("not_object", f"top level is a JSON {type(obj).__name__}")
    version = obj.get("schema_version", SCHEMA_VERSION)
    # `True == 1` in Python: compare the type too.
    if type(version) is not int or version != SCHEMA_VERSION:
        raise MessageError(
            "unknown_schema_version",
            f"schema_version {version!r} is not supported (this reader knows {SCHEMA_VERSION})",
        )
    return obj


def _field(obj: dict[str, Any], name: str, kind: str, *, required: bool = True) -> Any:
    """``obj[name]`` checked against a kind of _KINDS; None when optional and absent."""
    value = obj.get(name)
    if value is None:
        if required:
            raise MessageError("missing_field", f"{name} is required")
        return None
    if not _KINDS[kind](value):
        raise MessageError("bad_field_type", f"{name} must be {kind}, got {type(value).__name__}")
    return value


def _check_sampling(sampling: dict[str, Any]) -> dict[str, Any]:
    for key, value in sampling.items():
        if key not in _SAMPLING_RULES:
            allowed = ", ".join(_SAMPLING_RULES)
            raise MessageError("bad_field_type", f"sampling.{key} is unknown; allowed: {allowed}")
        kind, in_range, wanted = _SAMPLING_RULES[key]
        if not _KINDS[kind](value) or not in_range(value):
            raise MessageError("bad_field_type", f"sampling.{key} must be {wanted}, got {value!r}")
    return sampling


def decode_prompt(value: bytes, max_bytes: int, fallback_id: str | None = None) -> PromptRecord:
    """Decode a prompt message, or raise MessageError with the dead-letter reason.

    A message without ``id`` (or with ``"id": null``) gets ``fallback_id``; the consumer
    passes ``topic/partition/offset``, which is stable across redeliveries. Without a
    fallback the id is a hash of the bytes. An integer id is accepted as its string.
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
        raise MessageError("bad_field_type", f"id must be a non-empty str, got {raw_id!r}")
    metadata = _field(obj, "metadata", "object", required=False) or {}
    sampling = _field(obj, "sampling", "object", required=False) or {}
    return PromptRecord(
        id=raw_id, prompt=prompt, metadata=metadata, sampling=_check_sampling(sampling)
    )


def encode_sample(sample: Sample, created_at: float | None = None) -> dict[str, Any]:
    """A sample as a JSON object for the samples topic.

    ``prompt_text`` (the templated prompt the model saw) travels too, so the trainer
    trains on exactly that. A non-finite reward is sent as null: JSON has no NaN.
    """
    reward = sample.reward if sample.reward is not None and math.isfinite(sample.reward) else None
    return {
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
        "created_at": time.time() if created_at is None else created_at,
    }


def decode_sample(value: bytes) -> Sample:
    """Decode a samples-topic message, or raise MessageError."""
    obj = _load_object(value)
    prompt = _field(obj, "prompt", "str")
    reward = _field(obj, "reward", "number", required=False)
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
    )


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
    }


def decode_adapter(value: bytes) -> AdapterAnnouncement:
    """Decode an adapters-topic message, or raise MessageError."""
    obj = _load_object(value)
    metrics = _field(obj, "metrics", "object", required=False) or {}
    for name, metric in metrics.items():
        if not _KINDS["number"](metric):
            raise MessageError("bad_field_type", f"metrics.{name} must be number, got {metric!r}")
    return AdapterAnnouncement(
        version=_field(obj, "version", "int"),
        sha256=_field(obj, "sha256", "str"),
        uri=_field(obj, "uri", "str"),
        base_model=_field(obj, "base_model", "str"),
        created_at=float(_field(obj, "created_at", "number")),
        metrics={name: float(metric) for name, metric in metrics.items()},
        lineage=_field(obj, "lineage", "str", required=False),
        signature=_field(obj, "signature", "str", required=False),
    )


@dataclass(frozen=True)
class DeadLetter:
    """A message that cannot be used: where it was, why, and its exact bytes."""

    reason: str
    """One of REASONS (or a caller's own code for messages it gives up on later)."""
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
    """Size of the original value when ``value`` was cut (see MAX_DEAD_LETTER_ORIGINAL_BYTES);
    None when ``value`` is whole."""


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode("ascii")


def _unb64(text: Any, name: str) -> bytes | None:
    if text is None:
        return None
    try:
        return base64.b64decode(text, validate=True)
    except (TypeError, ValueError):  # binascii.Error is a ValueError
        raise MessageError("bad_field_type", f"{name} must be base64 text or null") from None


def encode_dead_letter(
    letter: DeadLetter, max_original_bytes: int = MAX_DEAD_LETTER_ORIGINAL_BYTES
) -> dict[str, Any]:
    """The dead-letter envelope; the value, key and headers are base64 so bytes survive."""
    value, original_size = letter.value, letter.original_size
    if value is not None and len(value) > max_original_bytes:
        value, original_size = value[:max_original_bytes], len(value)
    return {
        "schema_version": SCHEMA_VERSION,
        "reason": letter.reason,
        "detail": letter.detail,
        "topic": letter.topic,
        "partition": letter.partition,
        "offset": letter.offset,
        "timestamp_ms": letter.timestamp_ms,
        "original_b64": _b64(value),
        "original_size": original_size,
        "key_b64": _b64(letter.key),
        "headers": [[name, _b64(data)] for name, data in letter.headers],
    }


def decode_dead_letter(value: bytes) -> DeadLetter:
    """Decode a dead-letter envelope (for replay tools and tests), or raise MessageError."""
    obj = _load_object(value)
    headers = obj.get("headers") or []
    if not isinstance(headers, list) or not all(
        isinstance(h, list) and len(h) == 2 and isinstance(h[0], str) for h in headers
    ):
        raise MessageError("bad_field_type", "headers must be a list of [name, base64] pairs")
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
    )

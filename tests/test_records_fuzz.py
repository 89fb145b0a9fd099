"""Property tests: every record decoder is total, and what it accepts can be sent again.

For any bytes, and for any JSON (huge integers and floats, NaN, deep nesting, lone
surrogates, NUL, huge strings, a wrong type in any field of a valid message), each decoder
returns a record or raises MessageError with a known reason, nothing else. A record it
accepts encodes again without error and decodes to itself, so no input can make a role fail
later, when it writes its output. Seeded (derandomize), a few thousand examples each.
bench/fuzz.py runs the same decoders over a million inputs.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from raft_stream.errors import MessageError
from raft_stream.stream.schema import (
    REASONS,
    RECORD_OVERHEAD_BYTES,
    AdapterAction,
    DeadLetter,
    decode_adapter,
    decode_adapters_message,
    decode_dead_letter,
    decode_prompt,
    decode_sample,
    dumps,
    encode_action,
    encode_dead_letter,
    encode_prompt,
    encode_sample,
    fit_dead_letter,
)

FUZZ = settings(
    max_examples=2000,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

DECODERS: dict[str, Callable[[bytes], Any]] = {
    "prompt": lambda value: decode_prompt(value, 1_000_000, "t/0/1"),
    "sample": decode_sample,
    "adapter": decode_adapter,
    "adapter_action": decode_adapters_message,
    "dead_letter": decode_dead_letter,
}

VALID: dict[str, dict[str, Any]] = {
    "prompt": {"id": "p1", "prompt": "hi", "metadata": {"a": 1}, "sampling": {"k": 2}},
    "sample": {
        "schema_version": 1,
        "prompt_id": "p1",
        "prompt": "hi",
        "prompt_text": "<user>hi",
        "response": "hello",
        "reward": 0.5,
        "adapter_version": 1,
        "rank": 0,
        "response_tokens": 2,
        "reject_reason": None,
        "finish_reason": "stop",
        "created_at": 1.0,
        "tokens": "sampled",
        "prompt_token_ids": [0, 5, 6],
        "response_token_ids": [7, 1],
        "response_logprobs": [-0.5, -0.125],
    },
    "adapter": {
        "version": 1,
        "sha256": "ab" * 32,
        "uri": "file:///state/adapters/v000001",
        "base_model": "demo",
        "metrics": {"loss": 1.5},
        "created_at": 1700000000.5,
        "verdict": "promoted",
    },
    "adapter_action": {
        "action": "rollback",
        "version": 1,
        "from_version": 3,
        "lineage": "c0ffee",
        "by": "ops@host",
        "at": 1700000000.5,
        "trigger": "operator",
        "reason": "live reward fell",
    },
    "dead_letter": {
        "reason": "not_json",
        "detail": "d",
        "topic": "t",
        "partition": 0,
        "offset": 1,
        "timestamp_ms": 2,
        "original_b64": "e30=",
        "original_size": None,
        "key_b64": None,
        "headers": [["h", "AA=="]],
    },
}

# -- strategies --------------------------------------------------------------------------

any_char = st.characters(exclude_categories=())  # lone surrogates and NUL included
texts = st.one_of(
    st.text(any_char, max_size=20),
    # Rare huge ones: "x" * 1.1 MB is over every decoder's default limit.
    st.sampled_from(["", " ", "\x00", "\ud800", "a\udfffb", "é" * 3000, *"ab", "x" * 1_100_000]),
)
numbers = st.one_of(
    st.integers(),
    st.integers(min_value=-(10**400), max_value=10**400),
    st.sampled_from([2**63, -(2**63) - 1, 10**400, 1e308, -0.0]),
    st.floats(),  # NaN and infinities: the serializer writes NaN / Infinity / 1e400
)
scalars = st.one_of(st.none(), st.booleans(), numbers, texts)
json_values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(texts, children, max_size=4)
    ),
    max_leaves=12,
)


def _nested(depth: int) -> Any:
    value: Any = "leaf"
    for level in range(depth):
        value = [value] if level % 2 else {"n": value}
    return value


deep_values = st.integers(min_value=1, max_value=200).map(_nested)


def _serialize(value: Any, ascii_only: bool) -> bytes:
    # ensure_ascii=False writes lone surrogates raw: invalid UTF-8 (surrogatepass).
    return json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


HOSTILE_VALUES: list[Any] = [
    10**400,  # float() of it: OverflowError
    -(10**400),
    2**63,
    1.7e308,
    -0.0,
    "\ud800",  # a lone surrogate: accepted before, then unencodable
    "a\udfffb",
    "a\x00b",
    "",
    " ",
    "x" * 600_000,
    True,
    None,
    [],
    {},
    {"k": [1, {"v": "\ud800"}]},
    _nested(40),
]
"""Values that broke (or could break) a decoder, for every field of every record."""

NESTED_FIELDS = {
    "sampling": ["k", "max_new_tokens", "temperature", "top_p", "seed"],
    "metadata": ["a", "\ud800"],
    "metrics": ["loss", "\udc00"],
}


def _with(message: dict[str, Any], path: tuple[str, ...], value: Any) -> dict[str, Any]:
    changed = dict(message)
    if len(path) == 1:
        changed[path[0]] = value
    else:
        inner = changed.get(path[0])
        changed[path[0]] = _with(inner if isinstance(inner, dict) else {}, path[1:], value)
    return changed


def _paths(message: dict[str, Any]) -> list[tuple[str, ...]]:
    top = [(name,) for name in [*message, "schema_version"]]
    nested = [(name, key) for name in message for key in NESTED_FIELDS.get(name, [])]
    return top + nested


@st.composite
def mutated(draw: st.DrawFn, record: str) -> bytes:
    """A valid message with some fields (nested ones too) removed or replaced by a
    hostile value or any JSON value."""
    message = VALID[record]
    paths = _paths(message)
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        path = draw(st.sampled_from(paths))
        if draw(st.integers(min_value=0, max_value=9)) == 0 and len(path) == 1:
            message = {k: v for k, v in message.items() if k != path[0]}
        else:
            value = draw(st.one_of(st.sampled_from(HOSTILE_VALUES), json_values, deep_values))
            message = _with(message, path, value)
    return _serialize(message, draw(st.booleans()))


any_json = st.builds(_serialize, st.one_of(json_values, deep_values), st.booleans())
any_bytes = st.one_of(
    st.binary(max_size=300),
    st.integers(min_value=1, max_value=5000).map(lambda n: b"[" * n + b"]" * n),
    st.integers(min_value=1, max_value=5000).map(lambda n: b'{"n":' + b"9" * n + b"}"),
)

# -- properties --------------------------------------------------------------------------


def _decode_with_each(value: bytes) -> None:
    for record in DECODERS:
        _decode_totally(record, value)


def _decode_totally(record: str, value: bytes) -> Any:
    """The record, or None after a MessageError with a known reason; anything else fails."""
    try:
        decoded = DECODERS[record](value)
    except MessageError as err:
        assert err.reason in REASONS, err.reason
        return None
    _encodes_again(record, decoded)
    return decoded


def _encodes_again(record: str, decoded: Any) -> None:
    if record == "prompt":
        assert DECODERS["prompt"](dumps(encode_prompt(decoded))) == decoded
    elif record == "sample":
        assert decode_sample(dumps(encode_sample(decoded))) == decoded
    elif record == "adapter":
        dumps(asdict(decoded))
    elif record == "adapter_action":
        if isinstance(decoded, AdapterAction):
            assert decode_adapters_message(dumps(encode_action(decoded))) == decoded
        else:
            dumps(asdict(decoded))
    else:
        fitted = fit_dead_letter(decoded)
        assert decode_dead_letter(dumps(encode_dead_letter(fitted))) == fitted


# Each input goes through every decoder: a few thousand examples per decoder in all.


HUGE = b"1" + b"0" * 400
SAMPLE = dumps(VALID["sample"])
ISSUE_INPUTS = [
    b'{"version":1,"sha256":"0","uri":"file:///x","base_model":"b","created_at":%s}' % HUGE,
    b'{"id":"a","prompt":"hi","sampling":{"temperature":%s}}' % HUGE,
    SAMPLE.replace(b'"reward":0.5', b'"reward":' + HUGE),
    b'{"id":"\\ud800","prompt":"hi"}',
    SAMPLE.replace(b'"p1"', b'"\\udc00"'),
    b'{"id":"a","prompt":"hi","sampling":{"k":256,"max_new_tokens":1000000000}}',
    b'{"prompt":"a\\u0000b"}',
    b'{"prompt":"x","metadata":' + b"[" * 900 + b"]" * 900 + b"}",
]
"""The inputs of issue 7, always tried first."""


def _issue_examples(test: Callable[..., None]) -> Callable[..., None]:
    for value in ISSUE_INPUTS:
        test = example(value=value)(test)
    return test


@FUZZ
@_issue_examples
@given(value=any_bytes)
def test_every_decoder_is_total_over_arbitrary_bytes(value: bytes) -> None:
    _decode_with_each(value)


@settings(FUZZ, max_examples=1200)
@given(value=any_json)
def test_every_decoder_is_total_over_arbitrary_json(value: bytes) -> None:
    _decode_with_each(value)


@settings(FUZZ, max_examples=600)
@given(data=st.data(), record=st.sampled_from(list(DECODERS)))
def test_every_decoder_is_total_over_valid_messages_with_any_field_changed(
    data: st.DataObject, record: str
) -> None:
    _decode_with_each(data.draw(mutated(record)))


@pytest.mark.parametrize("record", list(VALID))
def test_every_field_of_every_record_survives_every_hostile_value(record: str) -> None:
    # Exhaustive, not sampled: each field (and each sampling override, metric, metadata
    # entry) holding each hostile value, through every decoder.
    for path in _paths(VALID[record]):
        for value in HOSTILE_VALUES:
            message = _with(VALID[record], path, value)
            _decode_with_each(_serialize(message, ascii_only=True))  # \ud800 as an escape
            _decode_with_each(_serialize(message, ascii_only=False))  # raw: not UTF-8


def test_the_valid_messages_the_fuzzers_mutate_are_accepted() -> None:
    for record, message in VALID.items():
        assert _decode_totally(record, dumps(message)) is not None, record


@settings(FUZZ, max_examples=300)
@given(
    detail=st.text(any_char, max_size=3000),
    key=st.one_of(st.none(), st.binary(max_size=3000)),
    headers=st.lists(st.tuples(st.text(any_char, max_size=50), st.binary(max_size=2000))),
    value=st.one_of(st.none(), st.binary(max_size=5000)),
    max_bytes=st.integers(min_value=1024, max_value=20_000),
)
def test_any_dead_letter_is_cut_to_fit_any_allowed_limit(
    detail: str,
    key: bytes | None,
    headers: list[tuple[str, bytes]],
    value: bytes | None,
    max_bytes: int,
) -> None:
    letter = DeadLetter("internal_error", detail, "t", 0, 1, 2, value, key, tuple(headers))
    fitted = fit_dead_letter(letter, max_bytes)
    envelope = dumps(encode_dead_letter(fitted))
    assert len(envelope) + len(fitted.key or b"") + RECORD_OVERHEAD_BYTES <= max_bytes
    assert decode_dead_letter(envelope) == fitted

"""Message schemas: strict decoding with exact reasons, and lossless round trips."""

from __future__ import annotations

import json
import math
import time
from dataclasses import replace
from pathlib import Path

import pytest

from raft_stream.config import KafkaConfig, SamplingConfig
from raft_stream.errors import ConfigError, MessageError
from raft_stream.stream.kafka import kafka_client_kwargs
from raft_stream.stream.schema import (
    REASONS,
    RECORD_OVERHEAD_BYTES,
    AdapterAction,
    DeadLetter,
    check_output_size,
    decode_adapter,
    decode_adapters_message,
    decode_dead_letter,
    decode_prompt,
    decode_sample,
    dumps,
    encode_action,
    encode_adapter,
    encode_dead_letter,
    encode_sample,
    fit_dead_letter,
)
from raft_stream.types import AdapterVersion, PromptRecord, Sample

# (message, reason, a word the detail must contain): one per way a prompt can be unusable.
MALFORMED_PROMPTS = [
    (b'{"prompt": "' + b"a" * 2000 + b'"}', "too_large", "2014 bytes"),
    (b'{"prompt": "caf\xe9"}', "not_utf8", "utf-8"),
    (b"", "not_json", "empty"),
    (b'{"prompt": "x"', "not_json", "delimiter"),
    (b'{"prompt": "x", "metadata": {"score": NaN}}', "not_json", "NaN"),
    (b'["a prompt"]', "not_object", "list"),
    (b'"a prompt"', "not_object", "str"),
    (b'{"schema_version": 2, "prompt": "x"}', "unknown_schema_version", "2"),
    (b'{"schema_version": "1", "prompt": "x"}', "unknown_schema_version", "'1'"),
    (b'{"schema_version": true, "prompt": "x"}', "unknown_schema_version", "True"),
    (b'{"id": "p1"}', "missing_prompt", "prompt"),
    (b'{"id": "p1", "prompt": null}', "missing_prompt", "prompt"),
    (b'{"prompt": ""}', "empty_prompt", "empty"),
    (b'{"prompt": " \\n\\t "}', "empty_prompt", "whitespace"),
    (b'{"prompt": 5}', "bad_field_type", "prompt"),
    (b'{"prompt": "x", "id": true}', "bad_field_type", "id"),
    (b'{"prompt": "x", "id": ""}', "bad_field_type", "id"),
    (b'{"prompt": "x", "id": ["p"]}', "bad_field_type", "id"),
    (b'{"prompt": "x", "metadata": []}', "bad_field_type", "metadata"),
    (b'{"prompt": "x", "sampling": 4}', "bad_field_type", "sampling"),
    (b'{"prompt": "x", "sampling": {"k": 0}}', "bad_field_type", "sampling.k"),
    (b'{"prompt": "x", "sampling": {"k": 257}}', "bad_field_type", "sampling.k"),
    (b'{"prompt": "x", "sampling": {"k": 2.0}}', "bad_field_type", "sampling.k"),
    (b'{"prompt": "x", "sampling": {"k": true}}', "bad_field_type", "sampling.k"),
    (b'{"prompt": "x", "sampling": {"temperature": -0.1}}', "bad_field_type", "temperature"),
    (b'{"prompt": "x", "sampling": {"temperature": 1e400}}', "number_out_of_range", "temperature"),
    (b'{"prompt": "x", "sampling": {"top_p": 0}}', "bad_field_type", "top_p"),
    (b'{"prompt": "x", "sampling": {"top_p": 1.5}}', "bad_field_type", "top_p"),
    (b'{"prompt": "x", "sampling": {"max_new_tokens": 0}}', "bad_field_type", "max_new_tokens"),
    (b'{"prompt": "x", "sampling": {"seed": 1}}', "bad_field_type", "sampling.seed"),
]


@pytest.mark.parametrize(("value", "reason", "detail"), MALFORMED_PROMPTS)
def test_decode_prompt_raises_error_with_reason_when_malformed(
    value: bytes, reason: str, detail: str
) -> None:
    with pytest.raises(MessageError) as caught:
        decode_prompt(value, max_bytes=2000)
    assert caught.value.reason == reason
    assert detail in caught.value.detail
    assert reason in REASONS


def test_decode_prompt_reads_every_field() -> None:
    value = json.dumps(
        {
            "schema_version": 1,
            "id": "p1",
            "prompt": "Write a review.",
            "metadata": {"source": "test"},
            "sampling": {"k": 4, "temperature": 0, "top_p": 0.9, "max_new_tokens": 32},
            "added_by_a_newer_producer": True,
        }
    ).encode()
    assert decode_prompt(value, max_bytes=10_000) == PromptRecord(
        id="p1",
        prompt="Write a review.",
        metadata={"source": "test"},
        sampling={"k": 4, "temperature": 0, "top_p": 0.9, "max_new_tokens": 32},
    )


def test_decode_prompt_takes_version_1_and_the_fallback_id_when_missing() -> None:
    record = decode_prompt('{"prompt": "¿Qué tal?"}'.encode(), 100, fallback_id="t/0/42")
    assert (record.id, record.prompt, record.text) == ("t/0/42", "¿Qué tal?", "¿Qué tal?")
    assert decode_prompt(b'{"id": 7, "prompt": "x"}', 100).id == "7"


def test_decode_prompt_derives_a_stable_id_from_the_bytes_without_fallback() -> None:
    first = decode_prompt(b'{"prompt": "x"}', 100).id
    assert first == decode_prompt(b'{"prompt": "x"}', 100).id
    assert first != decode_prompt(b'{"prompt": "y"}', 100).id


def test_sample_round_trips_and_a_non_finite_reward_becomes_null() -> None:
    sample = Sample(
        prompt_id="p1",
        prompt="Hi",
        prompt_text="<|user|>Hi<|assistant|>",
        response="Hello ✓",
        response_tokens=3,
        adapter_version=2,
        reward=0.75,
        rank=0,
        finish_reason="stop",
        generated_at=123.0,
    )
    message = encode_sample(sample)
    assert message["created_at"] == 123.0
    assert decode_sample(dumps(message)) == sample

    rejected = Sample("p1", "Hi", "Hi", "", 0, 2, reward=math.nan, reject_reason="too_short")
    assert decode_sample(dumps(encode_sample(rejected))).reward is None


def test_a_sample_record_is_created_when_the_engine_generated_it_or_else_when_encoded() -> None:
    generated = Sample("p1", "Hi", "Hi", "Hello", 1, 2, reward=0.5, generated_at=1700000000.25)
    message = encode_sample(generated)
    assert message["created_at"] == 1700000000.25
    # Read back (the trainer's buffer file, a dead letter), it keeps the engine's time.
    assert decode_sample(dumps(message)).generated_at == 1700000000.25

    before = time.time()
    unknown = encode_sample(Sample("p1", "Hi", "Hi", "Hello", 1, 2, reward=0.5))
    assert before <= unknown["created_at"] <= time.time()


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"response": None}, "missing_field"),
        ({"adapter_version": "2"}, "bad_field_type"),
        ({"reward": "high"}, "bad_field_type"),
        ({"schema_version": 9}, "unknown_schema_version"),
    ],
)
def test_decode_sample_raises_error_when_a_field_is_wrong(
    change: dict[str, object], reason: str
) -> None:
    message = encode_sample(Sample("p1", "Hi", "Hi", "Hello", 1, 0)) | change
    with pytest.raises(MessageError) as caught:
        decode_sample(dumps(message))
    assert caught.value.reason == reason


def test_a_sample_carries_the_engine_token_ids_and_logprobs_and_says_so() -> None:
    sample = Sample(
        "p1",
        "Hi",
        "Hi",
        "Hello",
        2,
        0,
        reward=0.5,
        prompt_token_ids=(0, 17),
        response_token_ids=(99, 1),
        response_logprobs=(-1.5, -0.25),
    )
    message = encode_sample(sample)
    assert message["tokens"] == "sampled"
    assert decode_sample(dumps(message)) == sample
    # Sampling log-probs travel at float32 precision (7 significant digits): a sample of a
    # 1 KiB limit must not overflow for the digits of a float64 repr.
    precise = replace(sample, response_logprobs=(-0.0014699617167934775, -3.14159265358979))
    assert encode_sample(precise)["response_logprobs"] == [-0.001469962, -3.141593]
    again = decode_sample(dumps(encode_sample(precise)))
    assert decode_sample(dumps(encode_sample(again))) == again
    text_only = Sample("p1", "Hi", "Hi", "Hello", 2, 0, reward=0.5)
    assert encode_sample(text_only)["tokens"] == "text"
    assert not decode_sample(dumps(encode_sample(text_only))).token_faithful


@pytest.mark.parametrize(
    ("change", "detail"),
    [
        ({"prompt_token_ids": [0, -1]}, "token ids"),
        ({"response_token_ids": [2**31]}, "token ids"),
        ({"response_token_ids": [1, True]}, "token ids"),
        ({"prompt_token_ids": None}, "sent together"),
        ({"response_logprobs": [-1.0]}, "one per"),
        ({"response_logprobs": [-1.0, 0.5]}, "<= 0"),
    ],
)
def test_decode_sample_refuses_token_ids_and_logprobs_that_do_not_fit(
    change: dict[str, object], detail: str
) -> None:
    sample = Sample(
        "p1", "Hi", "Hi", "Hello", 2, 0, prompt_token_ids=(0,), response_token_ids=(5, 1)
    )
    message = encode_sample(sample) | {"response_logprobs": [-1.0, -2.0]} | change
    with pytest.raises(MessageError, match=detail) as caught:
        decode_sample(dumps(message))
    assert caught.value.reason == "bad_field_type"


def test_adapter_announcement_round_trips(tmp_path: Path) -> None:
    adapter = AdapterVersion(3, tmp_path / "v000003", "ab" * 32, "demo", 1700.5, {"loss": 1.25})
    message = encode_adapter(adapter)
    assert message["uri"] == (tmp_path / "v000003").resolve().as_uri()
    announced = decode_adapter(dumps(message))
    assert (announced.version, announced.sha256, announced.base_model) == (3, "ab" * 32, "demo")
    assert (announced.metrics, announced.created_at) == ({"loss": 1.25}, 1700.5)
    with pytest.raises(MessageError, match=r"metrics\.loss"):
        decode_adapter(dumps(message | {"metrics": {"loss": "low"}}))


def test_an_adapter_action_round_trips_and_the_topic_decoder_tells_the_two_kinds_apart(
    tmp_path: Path,
) -> None:
    action = AdapterAction(
        "rollback", 2, "lineage", "ops@host", 1700.5, "automatic", from_version=4, reason="r"
    )
    assert decode_adapters_message(dumps(encode_action(action))) == action
    adapter = AdapterVersion(3, tmp_path / "v3", "ab" * 32, "demo", 1.0)
    assert decode_adapters_message(dumps(encode_adapter(adapter))).version == 3


@pytest.mark.parametrize(
    ("change", "detail"),
    [
        ({"action": "delete"}, "action must be one of"),
        ({"trigger": "cron"}, "trigger must be one of"),
        ({"from_version": 2}, "from_version 2 must be above version 2"),
        ({"from_version": None}, "from_version is required"),
        ({"version": -1}, r"version must be in \[0, 2\*\*31\)"),
        ({"action": "pin"}, "only a rollback has a from_version"),
        ({"action": "unpin", "from_version": None}, "unpin takes no version"),
        ({"by": "x" * 501}, "by is 501 characters"),
        ({"at": "now"}, "at must be number"),
        ({"lineage": None}, "lineage is required"),
    ],
)
def test_an_adapter_action_that_makes_no_sense_is_refused_naming_the_field(
    change: dict[str, object], detail: str
) -> None:
    action = AdapterAction("rollback", 2, "lineage", "ops@host", 1.0, from_version=4)
    with pytest.raises(MessageError, match=detail):
        decode_adapters_message(dumps(encode_action(action) | change))


def test_dead_letter_keeps_bytes_key_and_headers_exactly() -> None:
    letter = DeadLetter(
        reason="not_utf8",
        detail="bad byte",
        topic="raft.prompts",
        partition=1,
        offset=42,
        timestamp_ms=1_700_000_000_000,
        value=b"\xff\x00{\n",
        key=b"\x80k",
        headers=(("trace", b"\x01\x02"), ("empty", None)),
    )
    assert decode_dead_letter(dumps(encode_dead_letter(letter))) == letter
    tombstone = DeadLetter("not_json", "empty message", "t", 0, 1, 0, value=None)
    assert decode_dead_letter(dumps(encode_dead_letter(tombstone))) == tombstone


def test_dead_letter_cuts_an_original_too_large_for_a_kafka_message() -> None:
    letter = DeadLetter("too_large", "big", "t", 0, 0, 0, value=b"x" * 5000)
    fitted = fit_dead_letter(letter, max_bytes=2048)
    decoded = decode_dead_letter(dumps(encode_dead_letter(fitted)))
    assert decoded.value is not None and 0 < len(decoded.value) < 5000
    assert decoded.value == b"x" * len(decoded.value)
    assert (decoded.original_size, decoded.cut) == (5000, ("original",))
    assert len(dumps(encode_dead_letter(fitted))) + RECORD_OVERHEAD_BYTES <= 2048


def test_kafka_client_kwargs_reads_the_sasl_password_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cfg = KafkaConfig(
        bootstrap_servers="a:9092,b:9092",
        security_protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username="raft",
        ssl_cafile=Path("/etc/ca.pem"),
    )
    with pytest.raises(ConfigError, match="RAFT_STREAM_SASL_PASSWORD"):
        kafka_client_kwargs(cfg)
    monkeypatch.setenv("RAFT_STREAM_SASL_PASSWORD", "s3cret")
    assert kafka_client_kwargs(cfg) == {
        "bootstrap_servers": ["a:9092", "b:9092"],
        "security_protocol": "SASL_SSL",
        "client_id": "raft-stream",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "raft",
        "sasl_plain_password": "s3cret",
        "ssl_cafile": "/etc/ca.pem",
    }


def test_kafka_client_kwargs_raises_error_without_bootstrap_servers() -> None:
    with pytest.raises(ConfigError, match=r"kafka\.bootstrap_servers"):
        kafka_client_kwargs(KafkaConfig())


# -- issue 7: inputs that crashed a decoder or were accepted, each a test -------------------

HUGE_INT = b"1" + b"0" * 400
"""A 400-digit integer: json.loads keeps it exactly, float() of it raises OverflowError."""


def test_decode_adapter_raises_error_when_created_at_is_a_400_digit_integer() -> None:
    value = b'{"version":1,"sha256":"0","uri":"file:///x","base_model":"b","created_at":%s}'
    with pytest.raises(MessageError, match="created_at") as caught:
        decode_adapter(value % HUGE_INT)
    assert caught.value.reason == "number_out_of_range"


def test_decode_prompt_raises_error_when_temperature_is_a_400_digit_integer() -> None:
    value = b'{"id":"a","prompt":"hi","sampling":{"temperature":%s}}' % HUGE_INT
    with pytest.raises(MessageError, match=r"sampling\.temperature") as caught:
        decode_prompt(value, max_bytes=10_000)
    assert caught.value.reason == "number_out_of_range"


def test_decode_sample_raises_error_when_reward_is_a_400_digit_integer() -> None:
    message = dumps(encode_sample(Sample("p1", "Hi", "Hi", "Hello", 1, 0, reward=0.5)))
    value = message.replace(b'"reward":0.5', b'"reward":' + HUGE_INT)
    with pytest.raises(MessageError, match="reward") as caught:
        decode_sample(value)
    assert caught.value.reason == "number_out_of_range"


def test_decode_prompt_raises_error_when_the_id_holds_a_lone_surrogate() -> None:
    # Accepted before, then encoding its sample raised UnicodeEncodeError: a crash loop.
    with pytest.raises(MessageError, match=r"id holds a lone surrogate U\+D800") as caught:
        decode_prompt(b'{"id":"\\ud800","prompt":"hi"}', max_bytes=100)
    assert caught.value.reason == "bad_text"


@pytest.mark.parametrize(
    ("value", "reason", "detail"),
    [
        (b'{"prompt": "a\\u0000b"}', "bad_text", "prompt holds NUL at character 1"),
        (b'{"prompt": "x", "metadata": {"\\udfff": 1}}', "bad_text", "a key of metadata"),
        (b'{"prompt": "x", "metadata": {"a": [1, "\\udc80"]}}', "bad_text", "metadata.a[1]"),
        (b'{"prompt": "x", "m": ' + b"[" * 33 + b"]" * 33 + b"}", "too_deep", "deeper than 32"),
        (b'{"prompt": "x", "m": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "not_json", ""),
        (b'{"prompt": "x", "n": -9223372036854775809}', "number_out_of_range", "n: the integer"),
        (b'{"prompt": "x", "n": ' + b"9" * 5000 + b"}", "not_json", "digits"),
        (b'{"prompt": "x", "n": -1e309}', "number_out_of_range", "n: the number"),
    ],
)
def test_decode_prompt_raises_error_for_what_no_field_may_hold(
    value: bytes, reason: str, detail: str
) -> None:
    with pytest.raises(MessageError) as caught:
        decode_prompt(value, max_bytes=1_000_000)
    assert (caught.value.reason, detail in caught.value.detail) == (reason, True)


def test_decode_prompt_takes_64_bit_numbers_at_the_edges() -> None:
    value = b'{"prompt": "x", "metadata": {"a": 9223372036854775807, "b": 1.7e308}}'
    assert decode_prompt(value, max_bytes=1000).metadata == {"a": 2**63 - 1, "b": 1.7e308}


def test_errors_show_a_short_excerpt_of_a_huge_field() -> None:
    value = dumps({"prompt": "x", "id": ["a" * 450_000]})
    with pytest.raises(MessageError) as caught:
        decode_prompt(value, max_bytes=1_000_000)
    assert caught.value.reason == "bad_field_type" and len(caught.value.detail) < 200


# -- sampling overrides within the operator's limits ----------------------------------------


def test_decode_prompt_raises_error_when_an_override_asks_for_more_than_the_limit() -> None:
    # Accepted before: one message asked for ~300x the configured work.
    value = b'{"id":"a","prompt":"hi","sampling":{"k":256,"max_new_tokens":1000000000}}'
    with pytest.raises(MessageError, match=r"sampling\.k 256 is above this service's limit of 8"):
        decode_prompt(value, max_bytes=1000)
    with pytest.raises(
        MessageError, match=r"limit of 48 \(generation\.sampling\.prompt_max_new_tokens\)"
    ) as caught:
        decode_prompt(value.replace(b'"k":256,', b""), max_bytes=1000)
    assert caught.value.reason == "override_out_of_bounds"


@pytest.mark.parametrize(
    ("override", "within"),
    [
        ({"k": 16}, True),
        ({"k": 17}, False),
        ({"max_new_tokens": 96}, True),
        ({"max_new_tokens": 97}, False),
        ({"temperature": 0}, True),
        ({"temperature": 1.5}, True),
        ({"temperature": 1.6}, False),
        ({"top_p": 0.5}, True),
        ({"top_p": 0.95}, False),
    ],
)
def test_overrides_are_bounded_by_the_configured_per_prompt_maxima(
    override: dict[str, float], within: bool
) -> None:
    limits = SamplingConfig(
        prompt_max_k=16,
        prompt_max_new_tokens=96,
        prompt_max_temperature=1.5,
        prompt_max_top_p=0.9,
    )
    value = dumps({"prompt": "hi", "sampling": override})
    if within:
        assert decode_prompt(value, 1000, sampling=limits).sampling == override
    else:
        with pytest.raises(MessageError, match="above this service's limit") as caught:
            decode_prompt(value, 1000, sampling=limits)
        assert caught.value.reason == "override_out_of_bounds"


def test_override_maxima_default_to_the_configured_sampling_values() -> None:
    cfg = SamplingConfig(k=4, max_new_tokens=32, temperature=0.0, top_p=0.8)
    assert cfg.override_maxima() == {"k": 4, "max_new_tokens": 32, "temperature": 0.0, "top_p": 0.8}


# -- bounded outputs ---------------------------------------------------------------------------


def _letter(**fields: object) -> DeadLetter:
    base: dict[str, object] = {
        "reason": "bad_field_type",
        "detail": "d",
        "topic": "raft.prompts",
        "partition": 3,
        "offset": 42,
        "timestamp_ms": 1,
        "value": b"v",
    }
    return DeadLetter(**(base | fields))  # type: ignore[arg-type]


def test_dead_letter_echoing_a_450_kb_field_is_cut_to_fit_the_limit() -> None:
    # Before: the envelope (450 KB detail + 600 KB of base64) was over the producer's 1 MiB.
    field_value = "a" * 450_000
    original = dumps({"prompt": "x", "id": [field_value]})
    letter = _letter(detail=f"id must be a non-empty str, got {field_value!r}", value=original)
    fitted = fit_dead_letter(letter, max_bytes=1_000_000)
    envelope = dumps(encode_dead_letter(fitted))
    assert len(envelope) + RECORD_OVERHEAD_BYTES <= 1_000_000
    assert fitted.value == original  # the original still fits whole
    assert len(fitted.detail) <= 1000 and fitted.cut == ("detail",)
    assert decode_dead_letter(envelope) == fitted


@pytest.mark.parametrize("max_bytes", [1024, 4096, 1_000_000])
def test_every_envelope_field_is_cut_to_fit_even_a_tiny_limit(max_bytes: int) -> None:
    letter = _letter(
        detail="é" * 100_000,
        key=b"k" * 600_000,
        headers=tuple((f"h{i}", b"x" * 10_000) for i in range(100)),
        value=b"\x00" * 900_000,
    )
    fitted = fit_dead_letter(letter, max_bytes=max_bytes)
    size = len(dumps(encode_dead_letter(fitted))) + len(fitted.key or b"")
    assert size + RECORD_OVERHEAD_BYTES <= max_bytes
    assert set(fitted.cut) <= {"detail", "key", "headers", "original"} and "original" in fitted.cut
    assert fitted.original_size == 900_000 and fitted.reason == letter.reason


def test_a_dead_letter_that_fits_is_kept_whole() -> None:
    letter = _letter(key=b"k", headers=(("h", b"v"),), value=b"{bad json")
    assert fit_dead_letter(letter) == letter


def test_a_dead_letter_detail_with_a_lone_surrogate_can_still_be_sent() -> None:
    fitted = fit_dead_letter(_letter(detail="KeyError: '\ud800'"))
    assert decode_dead_letter(dumps(encode_dead_letter(fitted))).detail == "KeyError: '?'"


def test_check_output_size_raises_error_when_a_sample_exceeds_the_limit() -> None:
    sample = Sample("p" * 530_000, "hi", "hi", "ok", 1, 0, reward=0.5)
    value = dumps(encode_sample(sample))
    assert len(value) < 1_000_000  # the sample alone fits; with its key it does not
    with pytest.raises(MessageError, match=r"kafka\.max_message_bytes \(1000000\)") as caught:
        check_output_size(value, sample.prompt_id.encode(), 1_000_000, "sample")
    assert caught.value.reason == "output_too_large"
    check_output_size(value, b"p", 1_000_000, "sample")

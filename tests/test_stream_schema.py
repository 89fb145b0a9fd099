"""Message schemas: strict decoding with exact reasons, and lossless round trips."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from raft_stream.config import KafkaConfig
from raft_stream.errors import ConfigError, MessageError
from raft_stream.stream.kafka import kafka_client_kwargs
from raft_stream.stream.schema import (
    REASONS,
    DeadLetter,
    decode_adapter,
    decode_dead_letter,
    decode_prompt,
    decode_sample,
    dumps,
    encode_adapter,
    encode_dead_letter,
    encode_sample,
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
    (b'{"prompt": "x", "sampling": {"temperature": 1e400}}', "bad_field_type", "temperature"),
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
    )
    message = encode_sample(sample, created_at=123.0)
    assert message["created_at"] == 123.0
    assert decode_sample(dumps(message)) == sample

    rejected = Sample("p1", "Hi", "Hi", "", 0, 2, reward=math.nan, reject_reason="too_short")
    assert decode_sample(dumps(encode_sample(rejected))).reward is None


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


def test_adapter_announcement_round_trips(tmp_path: Path) -> None:
    adapter = AdapterVersion(3, tmp_path / "v000003", "ab" * 32, "demo", 1700.5, {"loss": 1.25})
    message = encode_adapter(adapter)
    assert message["uri"] == (tmp_path / "v000003").resolve().as_uri()
    announced = decode_adapter(dumps(message))
    assert (announced.version, announced.sha256, announced.base_model) == (3, "ab" * 32, "demo")
    assert (announced.metrics, announced.created_at) == ({"loss": 1.25}, 1700.5)
    with pytest.raises(MessageError, match=r"metrics\.loss"):
        decode_adapter(dumps(message | {"metrics": {"loss": "low"}}))


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
    letter = DeadLetter("too_large", "big", "t", 0, 0, 0, value=b"x" * 100)
    decoded = decode_dead_letter(dumps(encode_dead_letter(letter, max_original_bytes=10)))
    assert (decoded.value, decoded.original_size) == (b"x" * 10, 100)


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

"""The real all-in-one daemon against hostile records on every topic (issue 7).

``raft-stream run`` in a subprocess (vLLM-CPU, the tiny model, the session broker) is fed
good prompts with hostile records between them: 16 kinds on the prompts topic, 8 on the
samples topic, 10 on the adapters topic. Every good prompt gets its samples; every hostile
prompt and sample is dead-lettered with its reason and counted; every hostile announcement
is refused with a counted reason; the daemon never restarts; and the adapter it serves only
ever changes to versions its own trainer stored.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from bench.crash_trials import DaemonProcess, daemon_config
from raft_stream.config import KafkaConfig, RaftConfig
from raft_stream.roles.adapters import adapter_store_root
from raft_stream.stream.schema import dumps, encode_sample
from raft_stream.training.store import AdapterStore
from raft_stream.types import Sample
from tests.roles_support import dead_letter_reader, produce_raw, prompt_ids, sample_reader

pytestmark = [pytest.mark.kafka, pytest.mark.vllm, pytest.mark.slow]

MakeConfig = Callable[..., KafkaConfig]
LIMIT = 200_000
"""kafka.max_message_bytes of this run: hostile sizes are measured against it."""
HUGE_INT = "1" + "0" * 400
DEEP = "[" * 5000 + "]" * 5000


def _prompt(ident: str, **fields: object) -> bytes:
    return json.dumps({"id": ident, "prompt": "the movie was", **fields}).encode()


HOSTILE_PROMPTS: dict[bytes, str] = {
    b"\xff\xfe not utf-8": "not_utf8",
    b"{not json": "not_json",
    b"[1, 2, 3]": "not_object",
    b'{"id": "x", "prompt": "hi", "schema_version": 99}': "unknown_schema_version",
    b'{"id": "x"}': "missing_prompt",
    b'{"id": "x", "prompt": ""}': "empty_prompt",
    b'{"id": "x", "prompt": 7}': "bad_field_type",
    b'{"id": "\\ud800", "prompt": "hi"}': "bad_text",
    b'{"id": "x", "prompt": "nul \\u0000 inside"}': "bad_text",
    b'{"id": "x", "prompt": "hi", "metadata": ' + DEEP.encode() + b"}": "not_json",
    _prompt("x", sampling={"temperature": int(HUGE_INT)}): "number_out_of_range",
    _prompt("x", sampling={"k": 256, "max_new_tokens": 1_000_000_000}): "override_out_of_bounds",
    _prompt("x", sampling={"top_p": "all"}): "bad_field_type",
    b"x" * (LIMIT + 1): "too_large",
    # Fits the limit, but its sample (the id as key and in the value) would not.
    _prompt("i" * int(LIMIT * 0.55)): "output_too_large",
    # The detail must not echo a huge invalid field whole.
    json.dumps({"id": ["a" * int(LIMIT * 0.45)], "prompt": "hi"}).encode(): "bad_field_type",
}


def _sample(prompt_id: str, reward: str = "0.5") -> bytes:
    sample = Sample(prompt_id, "the movie was", "the movie was", "great fun", 3, 0, reward=0.5)
    return dumps(encode_sample(sample)).replace(b'"reward":0.5', b'"reward":' + reward.encode())


HOSTILE_SAMPLES: dict[bytes, str] = {
    _sample("s-int", HUGE_INT): "number_out_of_range",
    _sample("s-1e300", "1e300"): "reward_out_of_bounds",
    _sample("s-big", "1.7e308"): "reward_out_of_bounds",
    _sample("s-low", "-5"): "reward_out_of_bounds",
    _sample("SURROGATE").replace(b"SURROGATE", b"\\udc00"): "bad_text",
    _sample("s-type").replace(b'"adapter_version":0', b'"adapter_version":"0"'): "bad_field_type",
    b'{"prompt_id": "s-missing"}': "missing_field",
    b"\xc3\x28 invalid": "not_utf8",
}


def _versions_beyond(store: Path, versions: set[int], timeout_s: float) -> set[int]:
    """The store's versions once it holds one beyond ``versions``; fails after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not (stored := set(_reader(store).versions())) > versions:
        assert time.monotonic() < deadline, f"no version beyond {sorted(versions)} was stored"
        time.sleep(0.5)
    return stored


def _reader(store: Path) -> AdapterStore:
    return AdapterStore(store, base_model="", readonly=True)


def _announcement(store: Path, **fields: object) -> bytes:
    """A version announcement: the newest real one, with ``fields`` changed."""
    newest = _reader(store).latest()
    assert newest is not None
    real = {
        "schema_version": 1,
        "version": newest.version,
        "sha256": newest.sha256,
        "uri": newest.path.resolve().as_uri(),
        "base_model": newest.base_model,
        "metrics": {},
        "created_at": newest.created_at,
        "lineage": newest.lineage,
    }
    return json.dumps(real | fields).encode()


def _hostile_adapters(store: Path, model_dir: Path) -> dict[bytes, str]:
    """Ten forged announcements and the reason each is refused for (version 10**9 + i is
    never served)."""
    forged = 10**9
    return {
        b"{not json": "malformed",
        _announcement(store, version=forged, created_at=int(HUGE_INT)): "malformed",
        _announcement(store, version=forged + 1, uri="file:///etc"): "outside_store",
        _announcement(store, version=forged + 2, uri=model_dir.resolve().as_uri()): "outside_store",
        _announcement(store, version=forged + 3, sha256="0" * 64): "manifest_mismatch",
        _announcement(store, version=forged + 4, base_model="someone/else"): "base_model_mismatch",
        _announcement(store, version=forged + 5, lineage="another-store"): "lineage_mismatch",
        _announcement(store, version=forged + 6, uri="http://127.0.0.1:1/v1"): "fetch_failed",
        _announcement(store, version=forged + 7, uri=(store / "v9999").resolve().as_uri()): (
            "fetch_failed"
        ),
        _announcement(store, version=forged + 8, metrics={"loss": "low"}): "malformed",
    }


def _scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(url + "/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _by_label(scraped: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str) -> Counter:
    return Counter(
        {dict(labels)["reason"]: int(v) for (n, labels), v in scraped.items() if n == name}
    )


@pytest.fixture
def daemon_cfg(kafka_config: MakeConfig, tiny_model_dir: Path, tmp_path: Path) -> RaftConfig:
    base = daemon_config(
        kafka_config(partitions=1, max_message_bytes=LIMIT), tmp_path / "state", tiny_model_dir
    )
    return base.model_copy(
        update={
            "buffer": base.buffer.model_copy(update={"reward_min": -1.0, "reward_max": 1.0}),
        }
    )


@pytest.fixture
def daemon(daemon_cfg: RaftConfig, tmp_path: Path) -> Iterator[DaemonProcess]:
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(daemon_cfg.model_dump(mode="json")))
    process = DaemonProcess(config_path, tmp_path / "daemon.log")
    process.start()
    try:
        yield process
    finally:
        process.close()


def test_no_record_on_any_topic_stops_the_daemon_or_changes_what_it_serves(
    daemon: DaemonProcess, daemon_cfg: RaftConfig, tiny_model_dir: Path
) -> None:
    kafka = daemon_cfg.kafka
    store = adapter_store_root(daemon_cfg)
    url = daemon.wait_for_log("metrics and probes on", 60)["msg"].rsplit(" ", 1)[-1]
    daemon.wait_for_log("generator serving", 300)
    samples, letters = sample_reader(kafka), dead_letter_reader(kafka)
    try:
        # Round 1: good prompts with every hostile prompt and sample between them, until
        # the trainer has stored a version (so forged announcements can copy a real one).
        good: set[str] = set()
        for round_ in range(3):
            ids = [f"good-{round_}-{i}" for i in range(16)]
            good.update(ids)
            corpus = [_prompt(i) for i in ids]
            if round_ == 0:
                corpus = [m for pair in zip(corpus, HOSTILE_PROMPTS, strict=False) for m in pair]
                corpus += [_prompt(i) for i in ids[len(HOSTILE_PROMPTS) :]]
                produce_raw(kafka, list(HOSTILE_SAMPLES), topic=kafka.topics.samples)
            produce_raw(kafka, corpus)
            samples.read_until(lambda s, want=set(ids): want <= prompt_ids(s), 180, "samples")
        trained_before = _versions_beyond(store, set(), 180)

        # Round 2: forged announcements, then more good prompts (so more versions follow).
        forgeries = _hostile_adapters(store, tiny_model_dir)
        produce_raw(kafka, list(forgeries), topic=kafka.topics.adapters)
        ids = [f"after-{i}" for i in range(48)]
        good.update(ids)
        produce_raw(kafka, [_prompt(i) for i in ids])
        samples.read_until(lambda s: set(ids) <= prompt_ids(s), 240, "samples after")
        letters.read_until(
            lambda d: len(d) >= len(HOSTILE_PROMPTS) + len(HOSTILE_SAMPLES), 60, "dead letters"
        )
        # Training went on after the forgeries (its round may finish after the samples).
        _versions_beyond(store, trained_before, 180)
        scraped = _scrape(url)
    finally:
        samples.close()
        letters.close()

    # Every good prompt got its samples, and the daemon never restarted.
    assert good <= prompt_ids(samples.items)
    assert daemon.process is not None and daemon.process.poll() is None
    assert not [line for line in daemon.log_lines() if "shutting the process down" in line["msg"]]

    # Every hostile prompt and sample was dead-lettered with its reason, and counted.
    expected = Counter(HOSTILE_PROMPTS.values()) + Counter(HOSTILE_SAMPLES.values())
    got = Counter(d.reason for d in letters.items)
    assert got == expected
    assert _by_label(scraped, "raft_stream_dead_letter_total") >= expected
    for letter in letters.items:
        assert len(letter.detail) <= 1000

    # Every forged announcement was refused with a counted reason; the served version and
    # every sample's version are ones this daemon's trainer stored.
    refusals = _by_label(scraped, "raft_stream_adapter_load_failures_total")
    assert +refusals == Counter(forgeries.values())
    stored = set(_reader(store).versions())
    served = scraped[("raft_stream_adapter_version_served", ())]
    assert served in stored | {0}
    assert {s.adapter_version for s in samples.items} <= stored | {0}

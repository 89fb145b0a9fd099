"""Adapter trust: a generator serves an announced version only when the announcement is
for its base model and lineage, points inside the adapter store, agrees with the store's
manifest and its files hash to it within a bounded size (and, with a key, is signed).

The announcements are real adapters-topic messages (encoded, then decoded) on real store
folders; the role-level tests run a generator on the embedded broker with the
transformers backend and the tiny model.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from raft_stream.config import KafkaConfig, load_config
from raft_stream.errors import ConfigError
from raft_stream.roles.adapters import (
    AdapterFetchError,
    AdapterTrust,
    adapter_store_root,
    announcement_of,
    fetch_adapter,
    signature_of,
)
from raft_stream.stream.kafka import StreamProducer, ensure_topics
from raft_stream.stream.schema import (
    AdapterAction,
    AdapterAnnouncement,
    decode_adapter,
    decode_adapters_message,
    dumps,
    encode_action,
)
from raft_stream.training.store import TRAINER_STATE, AdapterStore, adapter_sha256
from raft_stream.types import AdapterVersion
from tests.roles_support import role_config, transformers_generator, wait_for

BASE = "org/base-model"
KEY = b"a key from a Kubernetes Secret"


def adapter_files(weights: bytes, optimizer_state: bytes = b"adam") -> Callable[[Path], None]:
    """What LoRATrainer.save writes: peft's two files and the optimizer state beside them."""

    def save(folder: Path) -> None:
        (folder / "adapter_model.safetensors").write_bytes(weights)
        (folder / "adapter_config.json").write_text('{"r": 8}')
        (folder / TRAINER_STATE).mkdir()
        (folder / TRAINER_STATE / "optimizer.pt").write_bytes(optimizer_state)

    return save


@pytest.fixture
def store(tmp_path: Path) -> Iterator[AdapterStore]:
    """A trainer's store holding versions 1 and 2."""
    with AdapterStore(tmp_path / "adapters", base_model=BASE) as written:
        written.write(adapter_files(b"one"), {"loss": 1.0})
        written.write(adapter_files(b"two"), {"loss": 0.5})
        yield written


def on_the_wire(message: dict[str, object]) -> AdapterAnnouncement:
    """An announcement as a generator receives it from the topic."""
    return decode_adapter(dumps(message))


def announced(
    adapter: AdapterVersion, key: bytes | None = None, **changes: Any
) -> AdapterAnnouncement:
    return on_the_wire({**announcement_of(adapter, key), **changes})


def refusal(trust: AdapterTrust, announcement: AdapterAnnouncement) -> AdapterFetchError:
    with pytest.raises(AdapterFetchError) as caught:
        fetch_adapter(announcement, trust)
    return caught.value


def test_a_version_announced_by_the_stores_trainer_is_served(store: AdapterStore) -> None:
    adapter = fetch_adapter(announced(store.get(2)), AdapterTrust(store.root, BASE))
    assert (adapter.version, adapter.path, adapter.lineage) == (2, store.path_of(2), store.lineage)


def test_a_uri_to_the_model_volume_is_refused_without_hashing_it(
    store: AdapterStore, tmp_path: Path
) -> None:
    models = tmp_path / "models"
    models.mkdir()
    (models / "model.safetensors").write_bytes(b"\0" * 1_000_000)
    err = refusal(AdapterTrust(store.root, BASE), announced(store.get(2), uri=models.as_uri()))
    assert err.reason == "outside_store"
    assert "outside the adapter store" in str(err) and "adapters.allowed_roots" in str(err)


def test_a_uri_that_leaves_the_store_by_dot_dot_or_symlink_is_refused(
    store: AdapterStore, tmp_path: Path
) -> None:
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(store.path_of(2), elsewhere)  # a faithful copy, manifest and all
    (store.root / "v000009").symlink_to(elsewhere)
    trust = AdapterTrust(store.root, BASE)
    for uri in (
        elsewhere.as_uri(),
        f"{store.root.as_uri()}/v000002/../../elsewhere",
        (store.root / "v000009").as_uri(),
        store.root.as_uri(),  # the store itself is no version folder
    ):
        assert refusal(trust, announced(store.get(2), uri=uri)).reason == "outside_store", uri


def test_an_explicit_allowed_root_replaces_the_store_root(
    store: AdapterStore, tmp_path: Path
) -> None:
    mirror = tmp_path / "mirror"
    shutil.copytree(store.root, mirror)
    trust = AdapterTrust(store.root, BASE, allowed_roots=(mirror,))
    served = fetch_adapter(announced(store.get(2), uri=(mirror / "v000002").as_uri()), trust)
    assert served.path == mirror / "v000002"
    assert refusal(trust, announced(store.get(2))).reason == "outside_store"


def test_a_sha256_the_store_manifest_does_not_record_is_refused(store: AdapterStore) -> None:
    # Weights swapped on the volume, and an announcement claiming the swapped files' hash:
    # the message agrees with the files, but not with the store's manifest.
    (store.path_of(2) / "adapter_model.safetensors").write_bytes(b"swapped")
    claimed = adapter_sha256(store.path_of(2))
    err = refusal(AdapterTrust(store.root, BASE), announced(store.get(2), sha256=claimed))
    assert err.reason == "manifest_mismatch" and "disagrees on sha256" in str(err)


def test_files_that_no_longer_hash_to_the_manifest_are_refused(store: AdapterStore) -> None:
    (store.path_of(2) / "adapter_model.safetensors").write_bytes(b"bit rot")
    err = refusal(AdapterTrust(store.root, BASE), announced(store.get(2)))
    assert err.reason == "checksum_mismatch" and "fails its checksum" in str(err)


def test_an_adapter_for_another_base_model_is_refused(store: AdapterStore) -> None:
    err = refusal(AdapterTrust(store.root, BASE), announced(store.get(2), base_model="other/llm"))
    assert err.reason == "base_model_mismatch"
    assert "'other/llm'" in str(err) and f"serves '{BASE}'" in str(err)


def test_a_version_of_another_lineage_is_refused(store: AdapterStore, tmp_path: Path) -> None:
    # Another trainer (a laptop with default settings) with a store of its own.
    with AdapterStore(tmp_path / "laptop", base_model=BASE) as foreign:
        theirs = foreign.write(adapter_files(b"theirs"), {})
    assert theirs.lineage != store.lineage
    trust = AdapterTrust(store.root, BASE, allowed_roots=(store.root, foreign.root))
    err = refusal(trust, announced(theirs))
    assert err.reason == "lineage_mismatch" and "another trainer" in str(err)
    assert refusal(trust, announced(store.get(2), lineage=None)).reason == "lineage_mismatch"


def test_a_configured_lineage_is_followed_instead_of_the_stores(store: AdapterStore) -> None:
    trust = AdapterTrust(store.root, BASE, lineage="a-lineage-chosen-by-the-operator")
    assert refusal(trust, announced(store.get(2))).reason == "lineage_mismatch"


def test_a_forged_version_number_on_a_real_folder_is_refused(store: AdapterStore) -> None:
    forged = announced(store.get(2), version=1_000_000_000)
    err = refusal(AdapterTrust(store.root, BASE), forged)
    assert err.reason == "manifest_mismatch" and "records version 2" in str(err)


def test_only_the_adapter_files_are_hashed_and_bounded_not_the_optimizer_state(
    tmp_path: Path,
) -> None:
    with AdapterStore(tmp_path / "adapters", base_model=BASE) as writer:
        adapter = writer.write(adapter_files(b"w" * 1000, optimizer_state=b"o" * 100_000), {})
    adapter_bytes = 1000 + len('{"r": 8}')
    trust = AdapterTrust(writer.root, BASE, max_adapter_bytes=adapter_bytes)
    assert fetch_adapter(announced(adapter), trust).version == 1
    (adapter.path / TRAINER_STATE / "optimizer.pt").write_bytes(b"changed by nobody we know")
    assert fetch_adapter(announced(adapter), trust).version == 1  # the generator never reads it


def test_an_adapter_over_the_size_limit_is_refused_before_it_is_read(store: AdapterStore) -> None:
    err = refusal(AdapterTrust(store.root, BASE, max_adapter_bytes=5), announced(store.get(2)))
    assert err.reason == "too_large" and "adapters.max_adapter_bytes" in str(err)


def test_a_symlink_inside_a_version_folder_is_refused(store: AdapterStore, tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("not an adapter")
    (store.path_of(2) / "extra.bin").symlink_to(tmp_path / "secret")
    err = refusal(AdapterTrust(store.root, BASE), announced(store.get(2)))
    assert err.reason == "fetch_failed" and "symlink" in str(err)


def test_with_a_key_only_announcements_signed_with_it_are_served(store: AdapterStore) -> None:
    trust = AdapterTrust(store.root, BASE, key=KEY)
    assert fetch_adapter(announced(store.get(2), KEY), trust).version == 2
    unsigned = announced(store.get(2))
    assert refusal(trust, unsigned).reason == "bad_signature"
    assert "unsigned" in str(refusal(trust, unsigned))
    assert refusal(trust, announced(store.get(2), b"another key")).reason == "bad_signature"
    signed = announced(store.get(2), KEY)
    tampered = dataclasses.replace(signed, uri=store.path_of(1).as_uri())
    assert refusal(trust, tampered).reason == "bad_signature"


def test_the_signature_covers_the_canonical_announcement_not_its_json_spelling(
    store: AdapterStore,
) -> None:
    message = announcement_of(store.get(2), KEY)
    reordered = json.dumps(dict(reversed(list(message.items()))), indent=2).encode()
    announcement = decode_adapter(reordered)
    assert announcement.signature == signature_of(announcement, KEY)


def test_an_action_is_followed_only_when_signed_with_the_key_and_of_the_lineage(
    store: AdapterStore,
) -> None:
    action = AdapterAction("rollback", 1, str(store.lineage), "ops@host", 5.0, from_version=2)
    trust = AdapterTrust(store.root, BASE, key=KEY)
    signed = dataclasses.replace(action, signature=signature_of(action, KEY))
    trust.check(decode_adapters_message(dumps(encode_action(signed))))  # passes
    for refused, reason in (
        (action, "bad_signature"),  # unsigned
        (dataclasses.replace(signed, version=0), "bad_signature"),  # tampered after signing
        (dataclasses.replace(signed, signature=signature_of(action, b"x")), "bad_signature"),
    ):
        with pytest.raises(AdapterFetchError) as caught:
            trust.check(refused)
        assert caught.value.reason == reason
    elsewhere = dataclasses.replace(action, lineage="another-store")
    with pytest.raises(AdapterFetchError, match="another-store") as caught:
        AdapterTrust(store.root, BASE).check(elsewhere)
    assert caught.value.reason == "lineage_mismatch"


def test_the_signing_key_file_must_be_readable_and_non_empty(tmp_path: Path) -> None:
    empty = tmp_path / "key"
    empty.write_text("\n")
    for path, message in ((tmp_path / "missing", "cannot be read"), (empty, "is empty")):
        cfg = load_config(overrides={"adapters.signing_key_file": str(path)})
        with pytest.raises(ConfigError, match=f"adapters.signing_key_file .*{message}"):
            AdapterTrust.from_config(cfg)


# -- a generator on the broker ------------------------------------------------------------


def _copy_of(adapter: AdapterVersion) -> Callable[[Path], None]:
    return lambda folder: shutil.copytree(adapter.path, folder, dirs_exist_ok=True)


HostileCase = Callable[[AdapterStore, list[AdapterVersion], Path], dict[str, object]]


def _outside_the_store(
    store: AdapterStore, _: list[AdapterVersion], tmp: Path
) -> dict[str, object]:
    shutil.copytree(store.path_of(1), tmp / "elsewhere")
    return {**announcement_of(store.get(1)), "version": 3, "uri": (tmp / "elsewhere").as_uri()}


def _swapped_weights(
    store: AdapterStore, loras: list[AdapterVersion], _: Path
) -> dict[str, object]:
    store.write(_copy_of(loras[0]), {})  # v3, then its weights swapped on the volume
    v3 = store.path_of(3)
    shutil.copy(loras[2].path / "adapter_model.safetensors", v3 / "adapter_model.safetensors")
    return {**announcement_of(store.get(3)), "sha256": adapter_sha256(v3)}


def _another_base_model(
    store: AdapterStore, _: list[AdapterVersion], tmp: Path
) -> dict[str, object]:
    return {**announcement_of(store.get(1)), "version": 3, "base_model": "other/llm"}


def _another_lineage(
    store: AdapterStore, loras: list[AdapterVersion], tmp: Path
) -> dict[str, object]:
    with AdapterStore(tmp / "laptop", base_model=store.base_model) as laptop:
        for _ in range(3):
            theirs = laptop.write(_copy_of(loras[2]), {})
    return announcement_of(theirs)


def _version_one_billion(
    store: AdapterStore, _: list[AdapterVersion], tmp: Path
) -> dict[str, object]:
    return {**announcement_of(store.get(1)), "version": 1_000_000_000}


@pytest.mark.kafka
@pytest.mark.parametrize(
    ("hostile", "reason"),
    [
        (_outside_the_store, "outside_store"),
        (_swapped_weights, "manifest_mismatch"),
        (_another_base_model, "base_model_mismatch"),
        (_another_lineage, "lineage_mismatch"),
        (_version_one_billion, "manifest_mismatch"),
    ],
    ids=["outside-store", "swapped-weights", "base-model", "lineage", "version-1e9"],
)
def test_a_hostile_announcement_is_refused_and_a_later_real_version_is_served(
    kafka_config: Callable[..., KafkaConfig],
    tiny_model_dir: Path,
    tiny_lora_adapters: list[AdapterVersion],
    tmp_path: Path,
    hostile: HostileCase,
    reason: str,
) -> None:
    store = AdapterStore(tmp_path / "adapters", base_model=str(tiny_model_dir))
    for lora in tiny_lora_adapters[:2]:
        store.write(_copy_of(lora), {})
    message = hostile(store, tiny_lora_adapters, tmp_path)
    cfg = role_config(
        kafka_config(),
        tmp_path / "state",
        tiny_model_dir,
        **{"store.root": str(store.root), "generation.backend": "transformers"},
    )
    assert adapter_store_root(cfg) == store.root

    def announce(*messages: dict[str, object]) -> None:
        ensure_topics(cfg.kafka, [cfg.kafka.topics.adapters])
        with StreamProducer(cfg.kafka) as producer:
            producer.send_and_wait(cfg.kafka.topics.adapters, [(None, m) for m in messages], 10)

    with transformers_generator(cfg, tiny_model_dir) as roles:
        role, metrics = roles.generator, roles.metrics

        def refusals(label: str) -> float:
            name = "raft_stream_adapter_load_failures_total"
            return metrics.registry.get_sample_value(name, {"reason": label}) or 0.0

        announce(message)
        wait_for(lambda: refusals(reason) == 1, 30, f"a {reason} refusal")
        assert role.served_version == 0
        stored = metrics.registry.get_sample_value("raft_stream_adapter_version_stored")
        assert stored == 0  # a refused version moves no gauge
        announce(announcement_of(store.get(2)))
        wait_for(lambda: role.served_version == 2, 30, "the real v2 served")
        assert role.adapter is not None and role.adapter.path == store.path_of(2)
    store.close()

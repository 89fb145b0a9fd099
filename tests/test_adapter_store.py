"""The adapter store: atomic immutable versions, a latest pointer, checksums, retention."""

from __future__ import annotations

import errno
import threading
import time
from pathlib import Path

import pytest

from raft_stream.errors import AdapterError
from raft_stream.training.store import AdapterStore, folder_sha256


def writer(payload: bytes, delay_s: float = 0.0):  # type: ignore[no-untyped-def]
    def save(folder: Path) -> None:
        (folder / "adapter_model.safetensors").write_bytes(payload)
        time.sleep(delay_s)  # a slow save widens the window a reader could catch
        (folder / "adapter_config.json").write_text('{"r": 8}')

    return save


def test_write_stores_numbered_versions_and_moves_latest(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path, base_model="base")
    first = store.write(writer(b"one"), {"loss": 1.0})
    second = store.write(writer(b"two"), {"loss": 0.5})
    assert (first.version, second.version) == (1, 2)
    assert store.versions() == [1, 2]
    latest = store.latest()
    assert latest is not None and latest.version == 2
    assert latest.metrics == {"loss": 0.5}
    assert latest.path.name == "v000002"


def test_manifest_checksum_matches_the_files(tmp_path: Path) -> None:
    adapter = AdapterStore(tmp_path, base_model="base").write(writer(b"x"), {})
    assert adapter.sha256 == folder_sha256(adapter.path)


def test_corrupted_file_fails_verification(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path, base_model="base")
    adapter = store.write(writer(b"x"), {})
    (adapter.path / "adapter_model.safetensors").write_bytes(b"tampered")
    with pytest.raises(AdapterError, match="fails its checksum"):
        store.get(adapter.version, verify=True)


def test_failed_save_leaves_the_store_unchanged(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path, base_model="base")
    store.write(writer(b"good"), {})

    def full_disk(folder: Path) -> None:
        (folder / "adapter_model.safetensors").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        store.write(full_disk, {})
    assert store.versions() == [1]
    latest = store.latest()
    assert latest is not None and latest.version == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "v000001"]


def test_a_reader_never_sees_a_half_written_version(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path, base_model="base", keep_last=100)
    stop = threading.Event()
    seen: set[int] = set()
    failures: list[str] = []

    def read_continuously() -> None:
        reader = AdapterStore(tmp_path, base_model="base", readonly=True)
        while not stop.is_set():
            time.sleep(0.001)
            for version in reader.versions():
                try:
                    reader.get(version, verify=True)
                    seen.add(version)
                except AdapterError as err:
                    failures.append(str(err))
            latest = reader.latest()
            if latest is not None:
                seen.add(latest.version)

    thread = threading.Thread(target=read_continuously)
    thread.start()
    for i in range(15):
        store.write(writer(bytes([i]) * 4096, delay_s=0.01), {})
    stop.set()
    thread.join()
    assert failures == []
    assert len(seen) > 1


def test_stale_temporary_folders_are_removed_at_start(tmp_path: Path) -> None:
    (tmp_path / ".tmp-v000003-deadbeef").mkdir()
    AdapterStore(tmp_path, base_model="base")
    assert list(tmp_path.iterdir()) == []


def test_keeps_only_the_last_versions(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path, base_model="base", keep_last=2)
    for i in range(5):
        store.write(writer(bytes([i])), {})
    assert store.versions() == [4, 5]


def test_set_latest_rolls_back_to_an_older_version(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path, base_model="base")
    store.write(writer(b"1"), {})
    store.write(writer(b"2"), {})
    store.set_latest(1)
    latest = store.latest()
    assert latest is not None and latest.version == 1


def test_a_readonly_store_refuses_to_write(tmp_path: Path) -> None:
    reader = AdapterStore(tmp_path, base_model="base", readonly=True)
    with pytest.raises(AdapterError, match="read-only"):
        reader.write(writer(b"x"), {})


def test_latest_is_none_before_the_first_version(tmp_path: Path) -> None:
    assert AdapterStore(tmp_path, base_model="base").latest() is None

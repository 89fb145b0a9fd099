"""The adapter store: atomic immutable versions, a latest pointer, checksums, retention,
one lineage per store and one writer at a time."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from raft_stream.errors import AdapterError, RaftStreamError
from raft_stream.training.store import (
    TRAINER_STATE,
    AdapterStore,
    StoreLockedError,
    adapter_sha256,
    folder_sha256,
    read_version,
)


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
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".writer.lock",
        "latest",
        "lineage",
        "v000001",
    ]


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
    assert sorted(p.name for p in tmp_path.iterdir()) == [".writer.lock", "lineage"]


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


def test_the_first_writer_creates_a_lineage_that_every_version_carries(tmp_path: Path) -> None:
    with AdapterStore(tmp_path, base_model="base") as store:
        lineage = store.lineage
        first = store.write(writer(b"1"), {})
    assert lineage is not None and (tmp_path / "lineage").read_text().strip() == lineage
    with AdapterStore(tmp_path, base_model="base") as reopened:  # a restarted trainer
        second = reopened.write(writer(b"2"), {})
    assert first.lineage == second.lineage == lineage
    assert AdapterStore(tmp_path / "other", base_model="base").lineage != lineage


def test_a_second_writer_on_the_same_store_is_refused_until_the_first_closes(
    tmp_path: Path,
) -> None:
    first = AdapterStore(tmp_path, base_model="base")
    with pytest.raises(StoreLockedError, match=f"held by another trainer \\(pid {os.getpid()} "):
        AdapterStore(tmp_path, base_model="base")
    assert isinstance(StoreLockedError("x"), RaftStreamError)  # the CLI prints a message
    AdapterStore(tmp_path, base_model="base", readonly=True).versions()  # readers never wait
    first.close()
    with pytest.raises(AdapterError, match="closed"):
        first.write(writer(b"x"), {})
    AdapterStore(tmp_path, base_model="base").write(writer(b"y"), {})


def test_a_trainer_in_another_process_is_named_by_pid_and_host(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from raft_stream.training.store import AdapterStore; "
            f"s = AdapterStore({str(tmp_path)!r}, base_model='base'); print('held', flush=True); "
            "sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        with pytest.raises(StoreLockedError) as caught:
            AdapterStore(tmp_path, base_model="base")
        message = str(caught.value)
        assert f"pid {holder.pid} on host {socket.gethostname()}" in message
        assert "stop that one, or give this one its own store.root" in message
    finally:
        holder.kill()  # the kernel drops a dead holder's lock
        holder.wait()
    AdapterStore(tmp_path, base_model="base").close()


def test_the_trainer_verifies_its_optimizer_state_which_generators_never_hash(
    tmp_path: Path,
) -> None:
    def with_state(folder: Path) -> None:
        writer(b"weights")(folder)
        (folder / TRAINER_STATE).mkdir()
        (folder / TRAINER_STATE / "optimizer.pt").write_bytes(b"adam moments")

    with AdapterStore(tmp_path, base_model="base") as store:
        adapter = store.write(with_state, {})
    assert adapter.sha256 == adapter_sha256(adapter.path) != folder_sha256(adapter.path)
    (adapter.path / TRAINER_STATE / "optimizer.pt").write_bytes(b"torn write")
    with pytest.raises(AdapterError, match="trainer state hash to"):
        store.get(1, verify=True)


def test_versions_stored_before_the_split_checksum_still_verify(tmp_path: Path) -> None:
    folder = tmp_path / "v000001"
    folder.mkdir()
    writer(b"old")(folder)
    (folder / TRAINER_STATE).mkdir()
    (folder / TRAINER_STATE / "optimizer.pt").write_bytes(b"adam")
    manifest = {"version": 1, "sha256": folder_sha256(folder), "base_model": "base"}
    (folder / "manifest.json").write_text(json.dumps(manifest | {"created_at": 0.0}))
    assert read_version(folder, verify=True).lineage is None


def test_a_second_trainer_on_the_same_store_refuses_to_start(tmp_path: Path) -> None:
    from prometheus_client import CollectorRegistry

    from raft_stream.config import load_config
    from raft_stream.metrics import RaftMetrics
    from raft_stream.roles.lifecycle import Shutdown
    from raft_stream.roles.trainer import TrainerRole

    cfg = load_config(overrides={"daemon.state_dir": str(tmp_path), "model.name_or_path": "m"})

    def trainer() -> TrainerRole:
        return TrainerRole(cfg, "m", RaftMetrics(CollectorRegistry()), Shutdown(1.0))

    first = trainer()
    with pytest.raises(StoreLockedError, match=f"{tmp_path / 'adapters'} is held by"):
        trainer()
    first.store.close()  # what the first trainer's run() does when it returns
    trainer()


# -- durable state after a crash (issue 8) ------------------------------------------------


def test_a_new_version_and_latest_reach_the_disk_before_write_returns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import raft_stream.durable as durable
    import raft_stream.training.store as store_module

    synced: list[tuple[str, list[str]]] = []
    real = durable.fsync_dir

    def spy(folder: Path) -> None:
        synced.append((Path(folder).name, sorted(p.name for p in Path(folder).iterdir())))
        real(folder)

    monkeypatch.setattr(durable, "fsync_dir", spy)
    monkeypatch.setattr(store_module, "fsync_dir", spy)
    store = AdapterStore(tmp_path, base_model="base")
    synced.clear()
    store.write(writer(b"w"), {})
    # The folder was flushed once the version was renamed in, and again after latest.
    assert [name for name, _ in synced] == [tmp_path.name, tmp_path.name]
    assert "v000001" in synced[0][1] and "latest" not in synced[0][1]
    assert "latest" in synced[1][1]


def test_what_a_crash_mid_write_or_mid_prune_left_is_removed_when_the_writer_opens(
    tmp_path: Path,
) -> None:
    store = AdapterStore(tmp_path, base_model="base")
    store.write(writer(b"a"), {})
    store.close()
    (tmp_path / ".tmp-v000002-0badcafe").mkdir()  # a save in progress
    (tmp_path / ".tmp-pruned-v000000-0badcafe").mkdir()  # a prune in progress
    (tmp_path / "v000003").mkdir()  # no manifest: never a complete version
    (tmp_path / ".latest.0badcafe").write_text("9\n")
    AdapterStore(tmp_path, base_model="base").close()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != ".writer.lock") == [
        "latest",
        "lineage",
        "v000001",
    ]


@pytest.mark.parametrize("pointer", [None, "", "garbage\n", "7\n"])
def test_a_missing_or_broken_latest_is_repaired_from_the_newest_version(
    tmp_path: Path, pointer: str | None
) -> None:
    store = AdapterStore(tmp_path, base_model="base")
    store.write(writer(b"a"), {})
    store.write(writer(b"b"), {})
    store.close()
    if pointer is None:
        (tmp_path / "latest").unlink()
    else:
        (tmp_path / "latest").write_text(pointer)  # "7": a version that is not there
    reader = AdapterStore(tmp_path, base_model="", readonly=True)
    latest = reader.latest()
    assert latest is not None and latest.version == 2  # readers read past it
    with AdapterStore(tmp_path, base_model="base") as repaired:
        assert (tmp_path / "latest").read_text() == "2\n"
        latest = repaired.latest()
        assert latest is not None and latest.version == 2


def test_retention_never_prunes_the_pinned_version(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path, base_model="base", keep_last=2, pinned_version=1)
    for payload in (b"a", b"b", b"c", b"d"):
        store.write(writer(payload), {})
    assert store.versions() == [1, 3, 4]


def test_retention_never_prunes_a_served_version(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path, base_model="base", keep_last=1)
    store.write(writer(b"a"), {})
    store.write(writer(b"b"), {}, served={1})
    store.write(writer(b"c"), {}, served={1, 2})
    assert store.versions() == [1, 2, 3]
    store.write(writer(b"d"), {}, served={3})  # no generator serves 1 or 2 any more
    assert store.versions() == [3, 4]

"""The adapter store: immutable, numbered, checksummed LoRA adapter versions.

Layout under ``root``::

    v000001/            one complete version: adapter files, trainer_state/, manifest.json
    v000002/
    latest              the newest complete version number, replaced last
    lineage             this store's id, created once by its first writer
    .writer.lock        held (flock) by the one writer; names its pid and host

A version is written into a hidden temporary folder and renamed into place, so a reader
(or a restart after a crash) only ever sees complete versions; ``latest`` is replaced after
the rename, so it never points at a missing one. Each rename is fsynced with its folder
(``raft_stream.durable``) before the trainer commits what the version was trained on.
Retention renames a version out of the way before deleting it, so a crash mid-delete leaves
a temporary folder, not a broken version; the writer removes temporaries and version
folders without a manifest when it opens the store, and repairs a missing or broken
``latest`` from the newest complete version. It never prunes ``latest``'s version or the
one generators are pinned to.

The manifest's ``sha256`` covers the adapter (weights and config) that generators load;
``trainer_state_sha256`` covers the optimizer state beside it, which only the trainer reads.
So a generator hashes what it serves and nothing more, within a size it bounds.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Collection, Iterable
from pathlib import Path
from types import TracebackType
from typing import Self

from raft_stream.durable import fsync_dir, replace_durably
from raft_stream.errors import AdapterError, RaftStreamError
from raft_stream.types import AdapterVersion

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
LATEST = "latest"
LINEAGE = "lineage"
WRITER_LOCK = ".writer.lock"
TRAINER_STATE = "trainer_state"
"""Subfolder of a version with the optimizer state; the trainer's alone, never served."""

MAX_ADAPTER_FILES = 1000
"""Most files one adapter version may hold (peft writes two); more is not an adapter."""


class AdapterTooLargeError(AdapterError):
    """An adapter version holds more bytes (or files) than the reader agreed to hash."""


class StoreLockedError(RaftStreamError):
    """Another writer (trainer) holds the adapter store; the message names it."""


def _files_below(folder: Path, skip: Iterable[str]) -> list[Path]:
    """Regular files below ``folder``, sorted, leaving out the top-level names in ``skip``.

    A symlink anywhere is an AdapterError: it could make a reader hash or load files
    outside the version folder. At most MAX_ADAPTER_FILES (AdapterTooLargeError).
    """
    skipped = set(skip)
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        here = Path(dirpath)
        if here == folder:
            dirnames[:] = [d for d in dirnames if d not in skipped]
            filenames = [f for f in filenames if f not in skipped]
        for name in [*dirnames, *filenames]:
            if (here / name).is_symlink():
                raise AdapterError(f"{here / name} is a symlink; adapter versions hold none")
        found += [here / name for name in filenames]
        if len(found) > MAX_ADAPTER_FILES:
            raise AdapterTooLargeError(
                f"{folder} holds more than {MAX_ADAPTER_FILES} files: not an adapter version"
            )
    return sorted(found)


def _sha256_of(folder: Path, files: list[Path], max_bytes: int | None) -> str:
    """sha256 over ``files``: relative path, NUL, bytes; refuses past ``max_bytes``."""
    if max_bytes is not None:
        total = sum(path.stat().st_size for path in files)
        if total > max_bytes:
            raise AdapterTooLargeError(
                f"{folder} holds {total} bytes of adapter files, over the limit of {max_bytes}"
            )
    digest = hashlib.sha256()
    read = 0
    for path in files:
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                read += len(chunk)
                if max_bytes is not None and read > max_bytes:  # a file grew meanwhile
                    raise AdapterTooLargeError(f"{folder} grew past {max_bytes} bytes")
                digest.update(chunk)
    return digest.hexdigest()


def adapter_sha256(folder: Path, max_bytes: int | None = None) -> str:
    """sha256 of what a generator loads: every file below ``folder`` but the manifest and
    the trainer state; AdapterTooLargeError past ``max_bytes`` (None: no limit)."""
    return _sha256_of(folder, _files_below(folder, (MANIFEST, TRAINER_STATE)), max_bytes)


def trainer_state_sha256(folder: Path) -> str:
    """sha256 of a version's trainer state (``trainer_state/``)."""
    return _sha256_of(folder, _files_below(folder / TRAINER_STATE, ()), None)


def folder_sha256(folder: Path) -> str:
    """sha256 over every file below ``folder`` but the manifest: relative path, then bytes.

    The checksum of manifests written before ``trainer_state_sha256`` existed; equal to
    ``adapter_sha256`` for a folder without trainer state.
    """
    return _sha256_of(folder, _files_below(folder, (MANIFEST,)), None)


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())


def version_dirname(version: int) -> str:
    return f"v{version:06d}"


def read_version(folder: Path, verify: bool = False) -> AdapterVersion:
    """Load a version folder's manifest; with ``verify`` also check its checksum."""
    manifest_path = folder / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
    except FileNotFoundError as exc:
        raise AdapterError(f"{folder} has no {MANIFEST}: not a complete adapter version") from exc
    except json.JSONDecodeError as exc:
        raise AdapterError(f"{manifest_path} is not valid JSON: {exc}") from exc
    adapter = AdapterVersion(
        version=int(manifest["version"]),
        path=folder,
        sha256=manifest["sha256"],
        base_model=manifest["base_model"],
        created_at=float(manifest["created_at"]),
        metrics=manifest.get("metrics", {}),
        lineage=manifest.get("lineage"),
        verdict=manifest.get("verdict"),
    )
    if verify:
        state_sha = manifest.get("trainer_state_sha256")
        if state_sha is None:  # written before the adapter and its state had checksums apart
            _check_sha256(folder, "files", adapter.sha256, folder_sha256(folder))
        else:
            _check_sha256(folder, "adapter files", adapter.sha256, adapter_sha256(folder))
            _check_sha256(folder, "trainer state", state_sha, trainer_state_sha256(folder))
    return adapter


def _check_sha256(folder: Path, what: str, expected: str, actual: str) -> None:
    if actual != expected:
        raise AdapterError(
            f"adapter {folder} fails its checksum: manifest says {expected[:12]}, "
            f"{what} hash to {actual[:12]}"
        )


class StoreLock:
    """An exclusive ``flock`` on ``root/.writer.lock``, held for the writer's life.

    The file names the holder (pid, host, since), so a second writer's error says who to
    stop. The kernel drops the lock when the holder's process dies, however it dies (and
    every child it forked with the descriptor, hence ``wait_s`` for a restart).
    """

    def __init__(self, root: Path, wait_s: float = 0.0) -> None:
        self._fd: int | None = None
        self.path = root / WRITER_LOCK
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise
                if time.monotonic() >= deadline:
                    holder = os.pread(fd, 4096, 0).decode(errors="replace").strip()
                    os.close(fd)
                    raise StoreLockedError(
                        f"the adapter store at {root} is held by another trainer "
                        f"({holder or 'unknown'}; waited {wait_s:g} s); one trainer writes a "
                        "store: stop that one, or give this one its own store.root (and its "
                        "own topics and kafka.trainer_group)"
                    ) from None
                time.sleep(0.1)
        holder = f"pid {os.getpid()} on host {socket.gethostname()} since {time.ctime()}"
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder.encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __del__(self) -> None:  # a writer dropped without close() must not keep the store
        self.release()


def read_lineage(root: Path) -> str | None:
    """The lineage id of the store at ``root``; None before its first writer opened it."""
    try:
        return (Path(root) / LINEAGE).read_text().strip() or None
    except FileNotFoundError:
        return None


class AdapterStore:
    """Writes and reads adapter versions under one root folder.

    One writer (the trainer) per root, enforced by a lock held until ``close``
    (StoreLockedError for a second one); any number of ``readonly`` readers (generators).
    The first writer creates the store's ``lineage`` id, stamped on every version.
    """

    def __init__(
        self,
        root: Path,
        base_model: str,
        keep_last: int = 5,
        readonly: bool = False,
        lock_wait_s: float = 0.0,
        pinned_version: int | None = None,
    ) -> None:
        self.root = Path(root)
        self.base_model = base_model
        self.keep_last = keep_last
        self.readonly = readonly
        self.pinned_version = pinned_version
        """Never pruned (``store.pinned_version``: generators serve it)."""
        self._lock: StoreLock | None = None
        if not readonly:
            self.root.mkdir(parents=True, exist_ok=True)
            self._lock = StoreLock(self.root, lock_wait_s)
            self._remove_stale_temporaries()
            if read_lineage(self.root) is None:
                self._write_small(LINEAGE, uuid.uuid4().hex)
            self._repair_latest()
        self.lineage = read_lineage(self.root)

    def close(self) -> None:
        """Release the writer's lock (a reader has none); the store stays readable."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _remove_stale_temporaries(self) -> None:
        """What a writer's crash mid-write or mid-prune left; only the (single) writer
        may delete it: temporary folders and files, and version folders without a
        manifest (a manifest is written last and renamed in with its folder)."""
        removed = []
        for path in [*self.root.glob(".tmp-*"), *self.root.glob("v[0-9]*")]:
            if path.name.startswith("v") and (path / MANIFEST).exists():
                continue
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
        for path in [*self.root.glob(f".{LATEST}.*"), *self.root.glob(f".{LINEAGE}.*")]:
            path.unlink(missing_ok=True)
            removed.append(path.name)
        if removed:
            logger.warning("removed what a crash left in the adapter store: %s", removed)

    def _repair_latest(self) -> None:
        """Point a missing, unreadable or dangling ``latest`` at the newest version the
        promotion gate did not reject."""
        newest = self._newest_servable()
        if newest is None or self._pointed() is not None:
            return
        logger.warning(
            "the adapter store's latest pointer is missing or broken; repaired to %s",
            version_dirname(newest.version),
        )
        self.set_latest(newest.version)

    def _newest_servable(self) -> AdapterVersion | None:
        """The newest complete version not rejected by the promotion gate."""
        for version in reversed(self.versions()):
            adapter = self.get(version)
            if adapter.verdict != "rejected":
                return adapter
        return None

    def _pointed(self) -> AdapterVersion | None:
        """The complete version ``latest`` names; None if it is missing or broken."""
        try:
            return self.get(int((self.root / LATEST).read_text().strip()))
        except (OSError, ValueError, KeyError, AdapterError):
            return None

    def versions(self) -> list[int]:
        """Complete versions present, oldest first."""
        if not self.root.exists():
            return []
        found = []
        for path in self.root.glob("v[0-9]*"):
            if path.is_dir() and (path / MANIFEST).exists():
                found.append(int(path.name[1:]))
        return sorted(found)

    def path_of(self, version: int) -> Path:
        return self.root / version_dirname(version)

    def get(self, version: int, verify: bool = False) -> AdapterVersion:
        return read_version(self.path_of(version), verify=verify)

    def latest(self) -> AdapterVersion | None:
        """The version ``latest`` names (a rollback, or the newest the promotion gate did
        not reject), or None before the first. A broken pointer (a reader may see one the
        writer has not repaired yet) reads as the newest complete version not rejected."""
        pointed = self._pointed()
        if pointed is not None:
            return pointed
        return self._newest_servable()

    def set_latest(self, version: int) -> None:
        """Point ``latest`` at a complete version (used for rollback)."""
        self._check_writable()
        self.get(version, verify=True)
        self._write_small(LATEST, str(version))

    def _write_small(self, name: str, text: str) -> None:
        """Replace the one-line file ``name`` durably (tmp, fsync, rename, fsync folder)."""
        tmp = self.root / f".{name}.{uuid.uuid4().hex}"
        with tmp.open("w") as handle:
            handle.write(f"{text}\n")
            handle.flush()
            os.fsync(handle.fileno())
        replace_durably(tmp, self.root / name)

    def write(
        self,
        save: Callable[[Path], None],
        metrics: dict[str, float],
        served: Collection[int] = (),
        verdict: str | None = None,
    ) -> AdapterVersion:
        """Store a new version: ``save(folder)`` writes the files; the store does the rest.
        Retention then prunes all but the ``keep_last`` newest, never the ``latest`` one, the
        pinned one or one in ``served`` (versions generators are seen serving).

        ``verdict`` is the promotion gate's (recorded in the manifest): a ``rejected``
        version is stored but ``latest`` stays on the version before it, so the trainer
        resumes from the newest version that may be served.

        Raises whatever ``save`` or the disk raises (e.g. OSError on a full disk); the
        store is then unchanged apart from a temporary folder removed on the spot.
        """
        self._check_writable()
        existing = self.versions()
        version = (existing[-1] if existing else 0) + 1
        tmp = self.root / f".tmp-{version_dirname(version)}-{uuid.uuid4().hex[:8]}"
        try:
            tmp.mkdir()
            save(tmp)
            manifest = {
                "version": version,
                "sha256": adapter_sha256(tmp),
                "trainer_state_sha256": trainer_state_sha256(tmp),
                "base_model": self.base_model,
                "lineage": self.lineage,
                "created_at": time.time(),
                "metrics": metrics,
                "verdict": verdict,
            }
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
            _fsync_tree(tmp)
            os.rename(tmp, self.path_of(version))
            fsync_dir(self.root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if verdict != "rejected":
            self.set_latest(version)
        self._prune(served)
        logger.info("stored adapter %s", version_dirname(version))
        return self.get(version)

    def _check_writable(self) -> None:
        if self.readonly:
            raise AdapterError(f"the adapter store at {self.root} was opened read-only")
        if self._lock is None:
            raise AdapterError(f"the adapter store at {self.root} was closed")

    def _prune(self, served: Collection[int]) -> None:
        pointer = self.latest()
        keep = {pointer.version if pointer else None, self.pinned_version, *served}
        for version in self.versions()[: -self.keep_last]:
            if version in keep:
                continue
            # Out of the way first: a crash mid-delete leaves a temporary, not a version
            # whose manifest outlived some of its files.
            doomed = self.root / f".tmp-pruned-{version_dirname(version)}-{uuid.uuid4().hex[:8]}"
            os.rename(self.path_of(version), doomed)
            shutil.rmtree(doomed, ignore_errors=True)

"""The adapter store: immutable, numbered, checksummed LoRA adapter versions.

Layout under ``root``::

    v000001/            one complete version: adapter files, trainer state, manifest.json
    v000002/
    latest              the newest complete version number, replaced last

A version is written into a hidden temporary folder and renamed into place, so a reader
(or a restart after a crash) only ever sees complete versions; ``latest`` is replaced after
the rename, so it never points at a missing one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from raft_stream.errors import AdapterError
from raft_stream.types import AdapterVersion

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
LATEST = "latest"


def folder_sha256(folder: Path) -> str:
    """sha256 over every file below ``folder`` but the manifest: relative path, then bytes."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


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
    )
    if verify:
        actual = folder_sha256(folder)
        if actual != adapter.sha256:
            raise AdapterError(
                f"adapter {folder} fails its checksum: manifest says {adapter.sha256[:12]}, "
                f"files hash to {actual[:12]}"
            )
    return adapter


class AdapterStore:
    """Writes and reads adapter versions under one root folder.

    One writer (the trainer) per root; any number of ``readonly`` readers (generators).
    """

    def __init__(
        self, root: Path, base_model: str, keep_last: int = 5, readonly: bool = False
    ) -> None:
        self.root = Path(root)
        self.base_model = base_model
        self.keep_last = keep_last
        self.readonly = readonly
        if not readonly:
            self.root.mkdir(parents=True, exist_ok=True)
            self._remove_stale_temporaries()

    def _remove_stale_temporaries(self) -> None:
        # Left by the writer's crash mid-write; only the (single) writer may delete them.
        for path in self.root.glob(".tmp-*"):
            shutil.rmtree(path, ignore_errors=True)

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
        """The version ``latest`` names (a pin or the newest), or None before the first."""
        pointer = self.root / LATEST
        if not pointer.exists():
            return None
        return self.get(int(pointer.read_text().strip()))

    def set_latest(self, version: int) -> None:
        """Point ``latest`` at a complete version (used for rollback)."""
        self._check_writable()
        self.get(version, verify=True)
        tmp = self.root / f".latest.{uuid.uuid4().hex}"
        tmp.write_text(f"{version}\n")
        os.replace(tmp, self.root / LATEST)

    def write(self, save: Callable[[Path], None], metrics: dict[str, float]) -> AdapterVersion:
        """Store a new version: ``save(folder)`` writes the files; the store does the rest.

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
                "sha256": folder_sha256(tmp),
                "base_model": self.base_model,
                "created_at": time.time(),
                "metrics": metrics,
            }
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
            _fsync_tree(tmp)
            os.rename(tmp, self.path_of(version))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.set_latest(version)
        self._prune()
        logger.info("stored adapter %s", version_dirname(version))
        return self.get(version)

    def _check_writable(self) -> None:
        if self.readonly:
            raise AdapterError(f"the adapter store at {self.root} was opened read-only")

    def _prune(self) -> None:
        pointer = self.latest()
        for version in self.versions()[: -self.keep_last]:
            if pointer is not None and version == pointer.version:
                continue
            shutil.rmtree(self.path_of(version), ignore_errors=True)

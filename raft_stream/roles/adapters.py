"""Adapter distribution: the trainer announces stored versions on the adapters topic;
generators follow the topic, fetch each newer version and verify its checksum.

Fetching dispatches on the URI scheme (``FETCHERS``): ``file://`` reads the folder in
place from a shared volume (all-in-one, or a ReadWriteMany volume on Kubernetes). Another
transport (``http://`` from the trainer) is one more entry that downloads the folder into a
local cache and returns its path; the checksum check stays the same.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from urllib.parse import unquote, urlparse
from urllib.request import url2pathname

from raft_stream.config import KafkaConfig, RaftConfig
from raft_stream.errors import AdapterError
from raft_stream.stream.kafka import StreamProducer, adapter_reader
from raft_stream.stream.schema import AdapterAnnouncement, encode_adapter
from raft_stream.training.store import AdapterStore, folder_sha256
from raft_stream.types import AdapterVersion

__all__ = [
    "FETCHERS",
    "AdapterFetchError",
    "AdapterWatcher",
    "adapter_store_root",
    "announcement_of",
    "fetch_adapter",
    "stored_announcement",
]

log = logging.getLogger(__name__)

FETCH_FAILED = "fetch_failed"
CHECKSUM_MISMATCH = "checksum_mismatch"


class AdapterFetchError(AdapterError):
    """An announced version cannot be used; ``reason`` is the metric label."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _fetch_file(uri: str) -> Path:
    parsed = urlparse(uri)
    if parsed.netloc not in ("", "localhost"):
        raise AdapterFetchError(FETCH_FAILED, f"{uri}: file URIs on another host are not readable")
    path = Path(url2pathname(unquote(parsed.path)))
    if not path.is_dir():
        raise AdapterFetchError(FETCH_FAILED, f"{uri}: no adapter folder at {path}")
    return path


FETCHERS: dict[str, Callable[[str], Path]] = {"file": _fetch_file}
"""URI scheme -> function returning a local folder holding the announced version."""


def fetch_adapter(announcement: AdapterAnnouncement) -> AdapterVersion:
    """A local, checksum-verified copy of an announced version, or AdapterFetchError."""
    scheme = urlparse(announcement.uri).scheme
    fetcher = FETCHERS.get(scheme)
    if fetcher is None:
        raise AdapterFetchError(
            FETCH_FAILED,
            f"adapter v{announcement.version}: URI scheme {scheme!r} of {announcement.uri} is "
            f"not supported (supported: {', '.join(sorted(FETCHERS))})",
        )
    path = fetcher(announcement.uri)
    try:
        actual = folder_sha256(path)
    except OSError as exc:
        raise AdapterFetchError(FETCH_FAILED, f"reading {path} failed: {exc}") from exc
    if actual != announcement.sha256:
        raise AdapterFetchError(
            CHECKSUM_MISMATCH,
            f"adapter v{announcement.version} at {path} fails its checksum: announced "
            f"{announcement.sha256[:12]}, files hash to {actual[:12]}",
        )
    return AdapterVersion(
        version=announcement.version,
        path=path,
        sha256=announcement.sha256,
        base_model=announcement.base_model,
        created_at=announcement.created_at,
        metrics=dict(announcement.metrics),
    )


def announcement_of(adapter: AdapterVersion) -> dict[str, object]:
    """The adapters-topic message for a stored version (uri = its absolute file:// URI)."""
    return encode_adapter(adapter, adapter.path.resolve().as_uri())


def adapter_store_root(cfg: RaftConfig) -> Path:
    """Where the daemon roles keep adapter versions: ``store.root`` when set (e.g. the
    shared volume of a split deployment), else ``daemon.state_dir/adapters``.

    The trainer writes there and a pinned generator reads there, so both must ask here.
    """
    if cfg.store.root is not None:
        return Path(cfg.store.root)
    return Path(cfg.daemon.state_dir) / "adapters"


def stored_announcement(store_root: Path, version: int) -> AdapterAnnouncement:
    """The announcement of a version already in a store (a pinned rollback target)."""
    adapter = AdapterStore(store_root, base_model="", readonly=True).get(version)
    return AdapterAnnouncement(
        version=adapter.version,
        sha256=adapter.sha256,
        uri=adapter.path.resolve().as_uri(),
        base_model=adapter.base_model,
        created_at=adapter.created_at,
        metrics=dict(adapter.metrics),
    )


def announce(
    producer: StreamProducer, topic: str, adapter: AdapterVersion, timeout_s: float
) -> None:
    """Send one announcement and wait for the ack (DeliveryError otherwise)."""
    producer.send_and_wait(topic, [(None, announcement_of(adapter))], timeout_s)


class AdapterWatcher:
    """Follows the adapters topic from its beginning (no group, so every replica sees all).

    ``poll`` returns the newest announcement above every version seen so far, or None; the
    caller decides whether it can use it. Malformed announcements are logged and skipped:
    each generator reads them all, so dead-lettering them would duplicate per replica.
    """

    def __init__(self, cfg: KafkaConfig, poll_timeout_s: float = 0.05) -> None:
        self._reader = adapter_reader(cfg)
        self._poll_timeout_s = poll_timeout_s
        self.newest_seen = 0

    def poll(self) -> AdapterAnnouncement | None:
        batch = self._reader.poll(self._poll_timeout_s)
        for letter in batch.dead:
            log.warning(
                "malformed adapter announcement skipped",
                extra={"reason": letter.reason, "detail": letter.detail, "offset": letter.offset},
            )
        fresh = [r.value for r in batch.records if r.value.version > self.newest_seen]
        if not fresh:
            return None
        newest = max(fresh, key=lambda a: a.version)
        self.newest_seen = newest.version
        return newest

    def catch_up(self, timeout_s: float) -> AdapterAnnouncement | None:
        """Read what the topic holds for up to ``timeout_s`` (at start: serve the newest
        version from the first batch on); the newest announcement or None."""
        newest: AdapterAnnouncement | None = None
        saved, self._poll_timeout_s = self._poll_timeout_s, timeout_s / 4
        try:
            for _ in range(4):
                newest = self.poll() or newest
        finally:
            self._poll_timeout_s = saved
        return newest

    def close(self) -> None:
        self._reader.close()

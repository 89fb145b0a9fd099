"""Adapter distribution: the trainer announces stored versions on the adapters topic;
generators follow the topic and serve a newer version only once it passes every check.

The adapters topic is a control plane that anyone with write access to it can reach, so
an announcement is a claim, checked against what the generator already trusts (its config,
the store on its volume) from the cheapest check to the dearest:

1. signature: with ``adapters.signing_key_file``, an HMAC-SHA256 of the announcement;
2. base model: the one this generator serves (``model.name_or_path``);
3. lineage: the store lineage the generator follows (``adapters.lineage`` or the store's
   ``lineage`` file), so another trainer's versions are not served;
4. place: the uri resolves (symlinks and ``..`` followed) inside the store root or
   ``adapters.allowed_roots``;
5. manifest: the store's manifest in that folder agrees on version, sha256, lineage and
   base model (so a forged version number or checksum cannot pass);
6. files: the adapter files (not the optimizer state beside them) hash to the manifest's
   sha256, reading at most ``adapters.max_adapter_bytes``.

A failed check is an AdapterFetchError whose ``reason`` is one of REFUSAL_REASONS.

Fetching dispatches on the URI scheme (``FETCHERS``): ``file://`` reads the folder in
place from a shared volume (all-in-one, or a ReadWriteMany volume on Kubernetes). Another
transport (``http://`` from the trainer) is one more entry that downloads the folder into a
local cache (which must then be an allowed root) and returns its path.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Final
from urllib.parse import unquote, urlparse
from urllib.request import url2pathname

from raft_stream.config import KafkaConfig, RaftConfig, read_secret
from raft_stream.errors import AdapterError
from raft_stream.stream.kafka import StreamProducer, adapter_reader
from raft_stream.stream.schema import AdapterAnnouncement, encode_adapter
from raft_stream.training.store import (
    AdapterStore,
    AdapterTooLargeError,
    adapter_sha256,
    read_lineage,
    read_version,
)
from raft_stream.types import AdapterVersion

__all__ = [
    "FETCHERS",
    "REFUSAL_REASONS",
    "AdapterFetchError",
    "AdapterTrust",
    "AdapterWatcher",
    "adapter_store_root",
    "announcement_of",
    "fetch_adapter",
    "signature_of",
    "stored_announcement",
]

log = logging.getLogger(__name__)

BAD_SIGNATURE: Final = "bad_signature"
BASE_MODEL_MISMATCH: Final = "base_model_mismatch"
LINEAGE_MISMATCH: Final = "lineage_mismatch"
OUTSIDE_STORE: Final = "outside_store"
FETCH_FAILED: Final = "fetch_failed"
MANIFEST_MISMATCH: Final = "manifest_mismatch"
TOO_LARGE: Final = "too_large"
CHECKSUM_MISMATCH: Final = "checksum_mismatch"
ENGINE_ERROR: Final = "engine_error"
GATE_REJECTED: Final = "gate_rejected"
"""A version the promotion gate rejected, pinned (``store.pinned_version``): never served."""
MALFORMED: Final = "malformed"
"""An announcement the decoder refuses (its dead-letter reason is in the log)."""

REFUSAL_REASONS: Final = (
    MALFORMED,
    BAD_SIGNATURE,
    BASE_MODEL_MISMATCH,
    LINEAGE_MISMATCH,
    OUTSIDE_STORE,
    FETCH_FAILED,
    MANIFEST_MISMATCH,
    TOO_LARGE,
    CHECKSUM_MISMATCH,
    ENGINE_ERROR,
    GATE_REJECTED,
)
"""Why a generator refuses an announced version, in the order it checks (a metric label)."""


class AdapterFetchError(AdapterError):
    """An announced version cannot be used; ``reason`` is the metric label."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _fetch_file(uri: str) -> Path:
    parsed = urlparse(uri)
    if parsed.netloc not in ("", "localhost"):
        raise AdapterFetchError(FETCH_FAILED, f"{uri}: file URIs on another host are not readable")
    return Path(url2pathname(unquote(parsed.path)))


FETCHERS: dict[str, Callable[[str], Path]] = {"file": _fetch_file}
"""URI scheme -> function returning a local folder holding the announced version."""


def canonical_announcement(announcement: AdapterAnnouncement) -> bytes:
    """The bytes a signature covers: every field but ``signature``, as sorted, compact,
    ASCII JSON (so signer and checker agree whatever their JSON libraries do). Only hashed,
    never parsed, so a non-finite metric is written as NaN/Infinity rather than refused."""
    fields = dataclasses.asdict(announcement)
    del fields["signature"]
    if fields["verdict"] is None:  # as signed before the promotion gate existed
        del fields["verdict"]
    return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()


def signature_of(announcement: AdapterAnnouncement, key: bytes) -> str:
    """Hex HMAC-SHA256 of the canonical announcement under ``key``."""
    return hmac.new(key, canonical_announcement(announcement), hashlib.sha256).hexdigest()


def signing_key(cfg: RaftConfig) -> bytes | None:
    """The announcement key from ``adapters.signing_key_file``; None when unset."""
    path = cfg.adapters.signing_key_file
    return None if path is None else read_secret(path, "adapters.signing_key_file").encode()


class AdapterTrust:
    """What a generator checks before it serves an announced version (module docstring)."""

    def __init__(
        self,
        store_root: Path,
        base_model: str,
        *,
        allowed_roots: tuple[Path, ...] = (),
        lineage: str | None = None,
        max_adapter_bytes: int = 2 << 30,
        key: bytes | None = None,
    ) -> None:
        self.store_root = Path(store_root)
        self.allowed_roots = tuple(Path(r).resolve() for r in allowed_roots or (store_root,))
        self.base_model = base_model
        self.max_adapter_bytes = max_adapter_bytes
        self.key = key
        self._lineage = lineage

    @classmethod
    def from_config(cls, cfg: RaftConfig) -> AdapterTrust:
        return cls(
            adapter_store_root(cfg),
            cfg.model.name_or_path,
            allowed_roots=tuple(cfg.adapters.allowed_roots),
            lineage=cfg.adapters.lineage,
            max_adapter_bytes=cfg.adapters.max_adapter_bytes,
            key=signing_key(cfg),
        )

    def lineage(self) -> str | None:
        """The lineage followed: configured, or the store's once its trainer created it."""
        if self._lineage is None:
            self._lineage = read_lineage(self.store_root)
        return self._lineage

    def check_claims(self, announcement: AdapterAnnouncement) -> None:
        """Checks 1-3 (no disk access); AdapterFetchError when one fails."""
        a = announcement
        if self.key is not None:
            if a.signature is None:
                raise AdapterFetchError(
                    BAD_SIGNATURE, f"adapter v{a.version}: unsigned, and a signing key is set"
                )
            expected = signature_of(a, self.key)
            if not hmac.compare_digest(a.signature.encode(), expected.encode()):
                raise AdapterFetchError(
                    BAD_SIGNATURE, f"adapter v{a.version}: the signature does not match"
                )
        if a.base_model != self.base_model:
            raise AdapterFetchError(
                BASE_MODEL_MISMATCH,
                f"adapter v{a.version} is for base model {a.base_model[:200]!r}; this "
                f"generator serves {self.base_model!r}",
            )
        followed = self.lineage()
        if followed is None:
            raise AdapterFetchError(
                LINEAGE_MISMATCH,
                f"adapter v{a.version}: no lineage to follow yet (no {self.store_root}/lineage "
                "and adapters.lineage is unset); start the trainer on that store first",
            )
        if a.lineage != followed:
            raise AdapterFetchError(
                LINEAGE_MISMATCH,
                f"adapter v{a.version} is of lineage {str(a.lineage)[:64]!r}; this generator "
                f"follows {followed!r} (another trainer or store announced it)",
            )

    def locate(self, announcement: AdapterAnnouncement) -> Path:
        """Check 4: the announced folder, resolved, strictly inside an allowed root."""
        scheme = urlparse(announcement.uri).scheme
        fetcher = FETCHERS.get(scheme)
        if fetcher is None:
            raise AdapterFetchError(
                FETCH_FAILED,
                f"adapter v{announcement.version}: URI scheme {scheme!r} of "
                f"{announcement.uri[:200]} is not supported (supported: "
                f"{', '.join(sorted(FETCHERS))})",
            )
        try:
            path = fetcher(announcement.uri).resolve()
        except (OSError, RuntimeError, ValueError) as exc:  # symlink loops, NUL bytes
            raise AdapterFetchError(FETCH_FAILED, f"{announcement.uri[:200]}: {exc}") from None
        if not any(root in path.parents for root in self.allowed_roots):
            raise AdapterFetchError(
                OUTSIDE_STORE,
                f"adapter v{announcement.version} at {path} is outside the adapter store "
                f"({', '.join(map(str, self.allowed_roots))}); see adapters.allowed_roots",
            )
        if not path.is_dir():
            raise AdapterFetchError(
                FETCH_FAILED, f"{announcement.uri[:200]}: no adapter folder at {path}"
            )
        return path

    def verify(self, announcement: AdapterAnnouncement, path: Path) -> AdapterVersion:
        """Checks 5 and 6: the store's manifest agrees, and the files hash to it."""
        a = announcement
        try:
            stored = read_version(path)
        except (AdapterError, OSError, ValueError, KeyError, TypeError) as exc:
            message = f"{path}: no usable manifest: {exc}"
            raise AdapterFetchError(MANIFEST_MISMATCH, message) from None
        claimed = (a.version, a.sha256, a.lineage, a.base_model, a.verdict)
        recorded = (
            stored.version,
            stored.sha256,
            stored.lineage,
            stored.base_model,
            stored.verdict,
        )
        if claimed != recorded:
            names = ("version", "sha256", "lineage", "base_model", "verdict")
            differ = [n for n, x, y in zip(names, claimed, recorded, strict=True) if x != y]
            raise AdapterFetchError(
                MANIFEST_MISMATCH,
                f"adapter v{a.version}: the store's manifest at {path} disagrees on "
                f"{', '.join(differ)} (it records version {stored.version})",
            )
        try:
            actual = adapter_sha256(path, self.max_adapter_bytes)
        except AdapterTooLargeError as exc:
            raise AdapterFetchError(
                TOO_LARGE, f"{exc}; raise adapters.max_adapter_bytes if it is genuine"
            ) from None
        except (AdapterError, OSError) as exc:
            raise AdapterFetchError(FETCH_FAILED, f"reading {path} failed: {exc}") from None
        if actual != stored.sha256:
            raise AdapterFetchError(
                CHECKSUM_MISMATCH,
                f"adapter v{a.version} at {path} fails its checksum: the manifest says "
                f"{stored.sha256[:12]}, files hash to {actual[:12]}",
            )
        return stored  # its times and metrics as the store recorded them


def fetch_adapter(announcement: AdapterAnnouncement, trust: AdapterTrust) -> AdapterVersion:
    """A local, verified copy of an announced version, or AdapterFetchError (a reason of
    REFUSAL_REASONS) when any check of ``trust`` fails."""
    trust.check_claims(announcement)
    return trust.verify(announcement, trust.locate(announcement))


def announcement_of(adapter: AdapterVersion, key: bytes | None = None) -> dict[str, object]:
    """The adapters-topic message for a stored version (uri = its absolute file:// URI),
    signed when a ``key`` is given."""
    uri = adapter.path.resolve().as_uri()
    signature = None if key is None else signature_of(_announcement(adapter, uri), key)
    return encode_adapter(adapter, uri, signature)


def _announcement(adapter: AdapterVersion, uri: str) -> AdapterAnnouncement:
    return AdapterAnnouncement(
        version=adapter.version,
        sha256=adapter.sha256,
        uri=uri,
        base_model=adapter.base_model,
        created_at=adapter.created_at,
        metrics=dict(adapter.metrics),
        lineage=adapter.lineage,
        verdict=adapter.verdict,
    )


def adapter_store_root(cfg: RaftConfig) -> Path:
    """Where the daemon roles keep adapter versions: ``store.root`` when set (e.g. the
    shared volume of a split deployment), else ``daemon.state_dir/adapters``.

    The trainer writes there and a pinned generator reads there, so both must ask here.
    """
    if cfg.store.root is not None:
        return Path(cfg.store.root)
    return Path(cfg.daemon.state_dir) / "adapters"


def stored_announcement(
    store_root: Path, version: int, key: bytes | None = None
) -> AdapterAnnouncement:
    """The announcement of a version already in a store (a pinned rollback target), signed
    with ``key`` so it passes the same checks as one from the topic."""
    adapter = AdapterStore(store_root, base_model="", readonly=True).get(version)
    announcement = _announcement(adapter, adapter.path.resolve().as_uri())
    if key is None:
        return announcement
    return dataclasses.replace(announcement, signature=signature_of(announcement, key))


def announce(
    producer: StreamProducer,
    topic: str,
    adapter: AdapterVersion,
    timeout_s: float,
    key: bytes | None = None,
) -> None:
    """Send one announcement (signed with ``key``, if any) and wait for the ack
    (DeliveryError otherwise)."""
    producer.send_and_wait(topic, [(None, announcement_of(adapter, key))], timeout_s)


class AdapterWatcher:
    """Follows the adapters topic from its beginning (no group, so every replica sees all).

    ``poll`` returns the announcements that arrived, newest version first; the caller
    decides which it can use. Nothing is remembered about refused ones, so a forged huge
    version number cannot hide the real versions announced after it. Malformed
    announcements are logged, passed to ``on_refused`` as ``MALFORMED`` and skipped: each
    generator reads them all, so dead-lettering them would duplicate per replica.
    """

    def __init__(
        self,
        cfg: KafkaConfig,
        on_refused: Callable[[str], None],
        poll_timeout_s: float = 0.05,
    ) -> None:
        self._reader = adapter_reader(cfg)
        self._on_refused = on_refused
        self._poll_timeout_s = poll_timeout_s

    def poll(self) -> list[AdapterAnnouncement]:
        batch = self._reader.poll(self._poll_timeout_s)
        for letter in batch.dead:
            log.warning(
                "malformed adapter announcement skipped",
                extra={"reason": letter.reason, "detail": letter.detail, "offset": letter.offset},
            )
            self._on_refused(MALFORMED)
        return sorted((r.value for r in batch.records), key=lambda a: a.version, reverse=True)

    def catch_up(self, timeout_s: float) -> list[AdapterAnnouncement]:
        """Read what the topic holds for up to ``timeout_s`` (at start: serve the newest
        usable version from the first batch on); newest version first."""
        found: list[AdapterAnnouncement] = []
        saved, self._poll_timeout_s = self._poll_timeout_s, timeout_s / 4
        try:
            for _ in range(4):
                found += self.poll()
        finally:
            self._poll_timeout_s = saved
        return sorted(found, key=lambda a: a.version, reverse=True)

    def close(self) -> None:
        self._reader.close()

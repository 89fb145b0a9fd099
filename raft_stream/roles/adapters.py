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

Actions on the topic (promote, rollback, pin, unpin: ``raft_stream.serving``) pass checks
1 and 3 (``AdapterTrust.check_action``); the versions they name pass all six when served.
Every message of a lineage is sent with the lineage as its key, so they share a partition
and every replica reads them in the same order.

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
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from pathlib import Path
from typing import Final
from urllib.parse import unquote, urlparse
from urllib.request import url2pathname

from raft_stream.config import KafkaConfig, RaftConfig, read_secret
from raft_stream.errors import AdapterError, MessageError
from raft_stream.serving import ServingLedger
from raft_stream.stream.kafka import Received, StreamProducer, adapter_reader
from raft_stream.stream.schema import (
    AdapterAction,
    AdapterAnnouncement,
    decode_adapters_message,
    dumps,
    encode_action,
    encode_adapter,
)
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
    "AdapterFeed",
    "AdapterFetchError",
    "AdapterTrust",
    "AdapterWatcher",
    "adapter_store_root",
    "announcement_of",
    "fetch_adapter",
    "fold_checked",
    "read_ledger",
    "send_action",
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


def canonical_message(message: AdapterAnnouncement | AdapterAction) -> bytes:
    """The bytes a signature covers: every field but ``signature``, as sorted, compact,
    ASCII JSON (so signer and checker agree whatever their JSON libraries do). Only hashed,
    never parsed, so a non-finite metric is written as NaN/Infinity rather than refused."""
    fields = dataclasses.asdict(message)
    del fields["signature"]
    if isinstance(message, AdapterAnnouncement) and fields["verdict"] is None:
        del fields["verdict"]  # as signed before the promotion gate existed
    if isinstance(message, AdapterAction):
        fields["at"] = float(fields["at"])  # 1700000000 and 1700000000.0 sign alike
    return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()


def signature_of(message: AdapterAnnouncement | AdapterAction, key: bytes) -> str:
    """Hex HMAC-SHA256 of the canonical message under ``key``."""
    return hmac.new(key, canonical_message(message), hashlib.sha256).hexdigest()


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

    def _check_signature(self, message: AdapterAnnouncement | AdapterAction, what: str) -> None:
        if self.key is None:
            return
        if message.signature is None:
            raise AdapterFetchError(BAD_SIGNATURE, f"{what}: unsigned, and a signing key is set")
        expected = signature_of(message, self.key)
        if not hmac.compare_digest(message.signature.encode(), expected.encode()):
            raise AdapterFetchError(BAD_SIGNATURE, f"{what}: the signature does not match")

    def _check_lineage(self, lineage: str | None, what: str) -> None:
        followed = self.lineage()
        if followed is None:
            raise AdapterFetchError(
                LINEAGE_MISMATCH,
                f"{what}: no lineage to follow yet (no {self.store_root}/lineage "
                "and adapters.lineage is unset); start the trainer on that store first",
            )
        if lineage != followed:
            raise AdapterFetchError(
                LINEAGE_MISMATCH,
                f"{what} is of lineage {str(lineage)[:64]!r}; this generator follows "
                f"{followed!r} (another trainer or store sent it)",
            )

    def check_action(self, action: AdapterAction) -> None:
        """Checks 1 and 3 of an action; AdapterFetchError when one fails."""
        what = f"adapter action {action.action} {action.version} by {action.by[:80]!r}"
        self._check_signature(action, what)
        self._check_lineage(action.lineage, what)

    def check_claims(self, announcement: AdapterAnnouncement) -> None:
        """Checks 1-3 (no disk access); AdapterFetchError when one fails."""
        a = announcement
        self._check_signature(a, f"adapter v{a.version}")
        if a.base_model != self.base_model:
            raise AdapterFetchError(
                BASE_MODEL_MISMATCH,
                f"adapter v{a.version} is for base model {a.base_model[:200]!r}; this "
                f"generator serves {self.base_model!r}",
            )
        self._check_lineage(a.lineage, f"adapter v{a.version}")

    def check(self, message: AdapterAnnouncement | AdapterAction) -> None:
        """The claims of any adapters-topic message (no disk access)."""
        if isinstance(message, AdapterAction):
            self.check_action(message)
        else:
            self.check_claims(message)

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


def fetch_adapter(
    announcement: AdapterAnnouncement,
    trust: AdapterTrust,
    seconds: dict[str, float] | None = None,
) -> AdapterVersion:
    """A local, verified copy of an announced version, or AdapterFetchError (a reason of
    REFUSAL_REASONS) when any check of ``trust`` fails. ``seconds``, when given, receives
    how long ``fetch`` (claims and locating the folder) and ``verify`` (manifest and
    checksum) took."""
    started = time.perf_counter()
    trust.check_claims(announcement)
    path = trust.locate(announcement)
    located = time.perf_counter()
    adapter = trust.verify(announcement, path)
    if seconds is not None:
        seconds["fetch"] = located - started
        seconds["verify"] = time.perf_counter() - located
    return adapter


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
    """Send one announcement (signed with ``key``, if any; keyed by its lineage) and wait
    for the ack (DeliveryError otherwise)."""
    message_key = None if adapter.lineage is None else adapter.lineage.encode()
    producer.send_and_wait(topic, [(message_key, announcement_of(adapter, key))], timeout_s)


def send_action(
    producer: StreamProducer,
    topic: str,
    action: AdapterAction,
    timeout_s: float,
    key: bytes | None = None,
) -> AdapterAction:
    """Sign (with ``key``, if any) and send one action keyed by its lineage, and wait for
    the ack (DeliveryError otherwise); returns the action as sent. Raises MessageError,
    sending nothing, for an action the readers' decoder would refuse."""
    if key is not None:
        action = dataclasses.replace(action, signature=signature_of(action, key))
    try:
        value = dumps(encode_action(action))
    except UnicodeEncodeError as err:
        raise MessageError("not_utf8", f"the action holds text that is not UTF-8: {err}") from None
    decode_adapters_message(value)  # what every replica will do with it
    producer.wait_all([producer.send_bytes(topic, value, action.lineage.encode())], timeout_s)
    return action


Message = AdapterAnnouncement | AdapterAction


class AdapterWatcher:
    """Follows the adapters topic from its beginning (no group, so every replica sees all).

    ``poll`` returns the messages that arrived, in the order of the topic; the caller folds
    them (``raft_stream.serving.ServingLedger``). Malformed messages are logged, passed to
    ``on_refused`` as ``MALFORMED`` and skipped: each generator reads them all, so
    dead-lettering them would duplicate per replica.
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

    def poll(self) -> list[Received[Message]]:
        """The messages that arrived (with where and when the broker got each)."""
        batch = self._reader.poll(self._poll_timeout_s)
        for letter in batch.dead:
            log.warning(
                "malformed adapter announcement skipped",
                extra={"reason": letter.reason, "detail": letter.detail, "offset": letter.offset},
            )
            self._on_refused(MALFORMED)
        return batch.records

    def catch_up(self, timeout_s: float) -> list[Received[Message]]:
        """What the topic holds, in its order: polls until one comes back empty after
        records came, for at most ``timeout_s`` (an empty topic takes all of it)."""
        found: list[Received[Message]] = []
        deadline = time.monotonic() + timeout_s
        saved, self._poll_timeout_s = self._poll_timeout_s, min(0.5, timeout_s / 4)
        try:
            while time.monotonic() < deadline:
                polled = self.poll()
                if not polled and found:
                    break
                found += polled
        finally:
            self._poll_timeout_s = saved
        return found

    def close(self) -> None:
        self._reader.close()


class AdapterFeed:
    """The adapters topic pushed: a thread long-polls ``watcher`` (returning as soon as a
    message arrives) and keeps what came for the engine stage to ``take``; ``pending`` is
    set meanwhile. The generator looks at it before every batch, so a version stored
    while a batch samples serves the very next one, with no poll interval to wait out.

    ``arrival``: a future that completes when messages next arrive, for a caller blocked on
    other work to wake for them. ``error``: what the thread died of (the caller raises
    it). ``close`` stops the thread and closes the watcher.
    """

    def __init__(self, watcher: AdapterWatcher) -> None:
        self._watcher = watcher
        self._lock = threading.Lock()
        self._inbox: list[Received[Message]] = []
        self.pending = threading.Event()
        self._arrival: Future[None] = Future()
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name="raft-stream-adapter-feed", daemon=True
        )
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                received = self._watcher.poll()  # blocks up to its poll timeout
                if received:
                    with self._lock:
                        self._inbox += received
                    self._arrived()
        except BaseException as err:  # raised to the role by whoever takes next
            log.exception("the adapters topic feed failed")
            self.error = err
            self._arrived()

    def _arrived(self) -> None:
        self.pending.set()
        with self._lock:
            arrived, self._arrival = self._arrival, Future()
        arrived.set_result(None)

    @property
    def arrival(self) -> Future[None]:
        """Completes when messages arrive after this call (or the thread dies)."""
        with self._lock:
            return self._arrival

    def take(self) -> list[Received[Message]]:
        """What arrived since the last take, in the topic's order. Raises what the
        thread died of."""
        with self._lock:
            taken, self._inbox = self._inbox, []
            self.pending.clear()
        if self.error is not None:
            raise self.error
        return taken

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the thread (its poll returns within the watcher's poll timeout; a thread
        still stuck after ``timeout_s`` is left, it is a daemon) and close the watcher."""
        self._stop.set()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.warning("the adapters topic feed did not stop; closing its consumer anyway")
        self._watcher.close()


def fold_checked(
    ledger: ServingLedger,
    messages: Iterable[Message],
    trust: AdapterTrust,
    on_refused: Callable[[Message, AdapterFetchError], None],
) -> list[AdapterAction]:
    """Apply to ``ledger`` each message whose claims pass ``trust.check`` (signature, base
    model, lineage); the others go to ``on_refused``. Returns the actions applied."""
    applied: list[AdapterAction] = []
    for message in messages:
        try:
            trust.check(message)
        except AdapterFetchError as err:
            on_refused(message, err)
            continue
        ledger.apply(message)
        if isinstance(message, AdapterAction):
            applied.append(message)
    return applied


def read_ledger(cfg: KafkaConfig, trust: AdapterTrust, timeout_s: float = 5.0) -> ServingLedger:
    """The adapters topic folded as a generator with ``trust`` folds it (what
    ``raft-stream adapters`` shows and acts on); refused messages are logged."""

    def refused(message: Message, err: AdapterFetchError) -> None:
        log.warning(
            "adapters-topic message refused", extra={"reason": err.reason, "error": str(err)}
        )

    watcher = AdapterWatcher(cfg, lambda reason: None)
    try:
        messages = [record.value for record in watcher.catch_up(timeout_s)]
    finally:
        watcher.close()
    ledger = ServingLedger()
    fold_checked(ledger, messages, trust, refused)
    return ledger

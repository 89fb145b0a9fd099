"""Which adapter version serves: the ledger of the adapters topic, and live rollback.

Every generator reads the whole adapters topic (no consumer group) and folds it, in order,
into a ``ServingLedger``: the trainer's announcements (each version with the promotion
gate's verdict) and the actions sent by operators (``raft-stream adapters promote``,
``rollback``, ``pin``, ``unpin``) and by generators (an automatic rollback). The fold is a
pure function of the topic, so every replica reaches the same decision without talking
to the others, and a replica that starts later replays the same history. What the actions
mean:

- ``promote V``: V may serve even if the gate rejected it, or a rollback withdrew it;
  it serves when it is the newest servable version.
- ``rollback V`` (from F): every version in (V, F] is withdrawn and V may serve again;
  versions announced later are servable as usual.
- ``pin V``: serve exactly V, whatever is announced or withdrawn, until ``unpin``.

A servable version is announced, not rejected by the gate (unless promoted since), not
withdrawn by a later rollback (unless promoted or rolled back to since); version 0, the
base model, always is. The target is the pinned version, else the newest servable one.

``LiveRewardWatch`` is a generator's side of automatic rollback: it compares the live
reward of the version it serves with the one served before it, over windows of
``gate.rollback_samples`` rewards, and reports a regression when the new version is worse
by more than ``gate.rollback_margin`` with 95% confidence (Welch's t).
"""

from __future__ import annotations

import math
import statistics
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from raft_stream.errors import RaftStreamError
from raft_stream.learning_health import t_critical_95
from raft_stream.stream.schema import AdapterAction, AdapterAnnouncement

__all__ = [
    "BASE_VERSION",
    "ActionError",
    "LiveRewardWatch",
    "Regression",
    "ServingLedger",
    "plan_action",
]

BASE_VERSION = 0
"""The base model, without an adapter: always servable."""


@dataclass
class ServingLedger:
    """The adapters topic folded in order (module docstring); ``apply`` each message."""

    announced: dict[int, list[AdapterAnnouncement]] = field(default_factory=dict)
    """Version -> its announcements, oldest first (a forged one cannot hide the real one)."""
    pinned: int | None = None
    actions: list[AdapterAction] = field(default_factory=list)
    """Every action applied, oldest first: who did what, when and why."""
    _promoted: set[int] = field(default_factory=set)
    _rollbacks: list[tuple[int, int, int]] = field(default_factory=list)
    """(sequence, to, from) of each rollback: it withdrew the versions in (to, from]."""
    _reinstated: dict[int, int] = field(default_factory=dict)
    """Version -> sequence of the last action that let it serve again (promote, or a
    rollback to it): a withdrawal older than that no longer holds."""
    _signatures: set[str] = field(default_factory=set)

    def apply(self, message: AdapterAnnouncement | AdapterAction) -> None:
        """Fold one message (checked by the caller: signature, lineage) into the ledger.

        Ignored: a signed action seen before (a replay), and an automatic rollback from a
        version that no longer serves (an operator or another replica acted first)."""
        if isinstance(message, AdapterAnnouncement):
            self.announced.setdefault(message.version, []).append(message)
            return
        if message.signature is not None:
            if message.signature in self._signatures:
                return
            self._signatures.add(message.signature)
        if message.trigger == "automatic" and not self.may_roll_back(message.from_version):
            return
        sequence = len(self.actions)
        self.actions.append(message)
        version = message.version
        if message.action == "promote":
            assert version is not None  # the decoder requires it
            self._promoted.add(version)
            self._reinstated[version] = sequence
        elif message.action == "rollback":
            assert version is not None and message.from_version is not None
            self._rollbacks.append((sequence, version, message.from_version))
            self._reinstated[version] = sequence
        elif message.action == "pin":
            self.pinned = version
        else:
            self.pinned = None

    def apply_all(self, messages: Iterable[AdapterAnnouncement | AdapterAction]) -> None:
        for message in messages:
            self.apply(message)

    def may_roll_back(self, version: int | None) -> bool:
        """Whether an automatic rollback from ``version`` still applies: it serves, nothing
        is pinned, and no operator promoted it (a person's decision stands)."""
        return (
            version is not None
            and self.pinned is None
            and version == self.target()
            and not any(a.action == "promote" and a.version == version for a in self.actions)
        )

    def rejected(self, version: int) -> bool:
        """The gate rejected ``version`` (as announced) and no operator promoted it."""
        if version in self._promoted:
            return False
        return any(a.verdict == "rejected" for a in self.announced.get(version, []))

    def servable(self, version: int) -> bool:
        if version == BASE_VERSION:
            return True
        return (
            version in self.announced and not self.rejected(version) and not self.withdrawn(version)
        )

    def withdrawn(self, version: int) -> bool:
        """A rollback withdrew ``version`` and nothing let it serve again since."""
        last = max((seq for seq, low, high in self._rollbacks if low < version <= high), default=-1)
        return last > self._reinstated.get(version, -1)

    def target(self) -> int:
        """The version every replica should serve (0: the base model)."""
        return next(self.candidates())

    def candidates(self) -> Iterator[int]:
        """What to serve, best first: the pinned version alone, else the servable versions
        newest first, ending with the base model. A replica serves the first it can load."""
        if self.pinned is not None:
            yield self.pinned
            return
        yield from sorted((v for v in self.announced if self.servable(v)), reverse=True)
        yield BASE_VERSION

    def previous(self, version: int) -> int:
        """The newest servable version below ``version``: where ``rollback`` goes."""
        return max(
            (v for v in self.announced if v < version and self.servable(v)), default=BASE_VERSION
        )


@dataclass(frozen=True)
class Regression:
    """The served version's live reward fell below the previous version's."""

    version: int
    previous: int
    mean: float
    previous_mean: float
    samples: int

    def describe(self, margin: float) -> str:
        return (
            f"live mean reward of v{self.version} {self.mean:.4f} is below v{self.previous}'s "
            f"{self.previous_mean:.4f} by more than {margin:g} (95% confidence, last "
            f"{self.samples} rewards of each)"
        )


class _Window:
    def __init__(self, version: int, size: int) -> None:
        self.version = version
        self.rewards: deque[float] = deque(maxlen=size)
        self.seen = 0
        self.next_test = size
        """``seen`` at which the next test is due."""


class LiveRewardWatch:
    """Tracks the live rewards of the served version and of the one served before it.

    ``samples``: the window (rewards of each version compared, and how many new rewards
    between two tests); ``margin``: the drop, in reward units, that counts as a
    regression. Only the two versions are kept, so memory is ``2 * samples`` floats.
    """

    def __init__(self, samples: int, margin: float) -> None:
        if samples < 2:
            raise ValueError(f"samples ({samples}) must be >= 2 to estimate a variance")
        self.samples = samples
        self.margin = margin
        self.current: _Window | None = None
        self.previous: _Window | None = None

    def served(self, version: int) -> None:
        """The generator switched to ``version``. A newer one is compared with the one it
        replaces; going back (a rollback) compares with nothing until the next move up."""
        current = self.current
        if current is not None and current.version == version:
            return
        forward = current is not None and version > current.version
        self.previous = current if forward else None
        self.current = _Window(version, self.samples)

    def observe(self, version: int, rewards: Iterable[float]) -> None:
        """Rewards of samples made by ``version`` (others than the served one are ignored)."""
        window = self.current
        if window is None or window.version != version:
            return
        for reward in rewards:
            if math.isfinite(reward):
                window.rewards.append(reward)
                window.seen += 1

    def regression(self) -> Regression | None:
        """A regression, tested each time ``samples`` new rewards of the served version
        have arrived; None otherwise.

        Regressed when mean_previous - mean_current - margin > t * se, where se is Welch's
        standard error of the difference and t the two-sided 95% Student-t value for the
        Welch-Satterthwaite degrees of freedom (so a noisy reward does not flap)."""
        current, previous = self.current, self.previous
        n = self.samples
        if current is None or previous is None or len(previous.rewards) < n:
            return None
        if current.seen < current.next_test:
            return None
        current.next_test = current.seen + n
        mean, previous_mean = statistics.fmean(current.rewards), statistics.fmean(previous.rewards)
        shares = (
            statistics.variance(current.rewards) / n,
            statistics.variance(previous.rewards) / n,
        )
        se = math.sqrt(sum(shares))
        if se > 0:  # Welch-Satterthwaite degrees of freedom
            df = max(1, math.floor(se**4 / sum(share**2 / (n - 1) for share in shares)))
            if previous_mean - mean - self.margin <= t_critical_95(df) * se:
                return None
        elif previous_mean - mean <= self.margin:
            return None
        return Regression(current.version, previous.version, mean, previous_mean, n)


def plan_action(
    ledger: ServingLedger,
    action: str,
    version: int | None,
    *,
    lineage: str,
    by: str,
    reason: str = "",
    at: float | None = None,
) -> AdapterAction:
    """An operator's action checked against the ledger it will be folded into.

    ``rollback`` without a version goes to the newest servable version below the target.
    Raises ActionError (with the fix) for an action that would do nothing or could not
    serve: an unknown version, a rejected one (promote it first), a rollback while pinned
    or with nothing to roll back, an unpin with nothing pinned.
    """
    when = time.time() if at is None else at

    def known(v: int) -> None:
        if v != BASE_VERSION and v not in ledger.announced:
            announced = ", ".join(f"v{x}" for x in sorted(ledger.announced)) or "none"
            raise ActionError(
                f"v{v} was never announced on the adapters topic (announced: {announced}); "
                "see `raft-stream adapters list`"
            )

    if action == "promote":
        if version is None:
            raise ActionError("promote needs a version")
        known(version)
        return AdapterAction("promote", version, lineage, by, when, reason=reason)
    if action == "pin":
        if version is None:
            raise ActionError("pin needs a version (0 pins the base model)")
        known(version)
        if ledger.rejected(version):
            raise ActionError(
                f"the promotion gate rejected v{version}: `raft-stream adapters promote "
                f"{version}` first if it must serve anyway"
            )
        return AdapterAction("pin", version, lineage, by, when, reason=reason)
    if action == "unpin":
        if ledger.pinned is None:
            raise ActionError("nothing is pinned")
        return AdapterAction("unpin", None, lineage, by, when, reason=reason)
    if action != "rollback":
        raise ActionError(f"unknown action {action!r}; one of promote, rollback, pin, unpin")
    if ledger.pinned is not None:
        raise ActionError(
            f"v{ledger.pinned} is pinned: `raft-stream adapters unpin` first, or pin another"
        )
    current = ledger.target()
    if current == BASE_VERSION:
        raise ActionError("the base model serves: there is nothing to roll back")
    to = ledger.previous(current) if version is None else version
    known(to)
    if to >= current:
        raise ActionError(f"a rollback goes back: v{to} is not older than the serving v{current}")
    if ledger.rejected(to):
        raise ActionError(
            f"the promotion gate rejected v{to}: promote it first, or roll back further"
        )
    return AdapterAction("rollback", to, lineage, by, when, from_version=current, reason=reason)


class ActionError(RaftStreamError):
    """An operator's adapter action that cannot be sent as asked; the message says why."""

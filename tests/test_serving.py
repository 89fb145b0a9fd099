"""Which version serves: the adapters topic folded (ServingLedger), operators' actions
checked before they are sent (plan_action), and live rollback's test (LiveRewardWatch)."""

from __future__ import annotations

import dataclasses
import random

import pytest

from raft_stream.serving import ActionError, LiveRewardWatch, ServingLedger, plan_action
from raft_stream.stream.schema import AdapterAction, AdapterAnnouncement

LINEAGE = "lineage-1"


def announced(version: int, verdict: str | None = "promoted") -> AdapterAnnouncement:
    return AdapterAnnouncement(
        version=version,
        sha256=f"{version:064x}",
        uri=f"file:///store/v{version:06d}",
        base_model="tiny",
        created_at=0.0,
        lineage=LINEAGE,
        verdict=verdict,
    )


def act(action: str, version: int | None = None, from_version: int | None = None) -> AdapterAction:
    return AdapterAction(action, version, LINEAGE, "ops@host", 0.0, from_version=from_version)


def ledger_of(*messages: AdapterAnnouncement | AdapterAction) -> ServingLedger:
    ledger = ServingLedger()
    ledger.apply_all(messages)
    return ledger


def test_the_newest_version_the_gate_did_not_reject_serves() -> None:
    assert ledger_of().target() == 0  # nothing announced: the base model
    ledger = ledger_of(announced(1), announced(2), announced(3, "rejected"))
    assert ledger.target() == 2
    assert list(ledger.candidates()) == [2, 1, 0]


def test_a_version_without_a_verdict_serves_as_before_the_gate_existed() -> None:
    assert ledger_of(announced(1), announced(2, None)).target() == 2


def test_a_rollback_withdraws_the_versions_after_its_target_until_a_newer_one_comes() -> None:
    ledger = ledger_of(announced(1), announced(2), announced(3), act("rollback", 1, 3))
    assert ledger.target() == 1
    assert ledger.withdrawn(2) and ledger.withdrawn(3)
    ledger.apply(announced(4))  # the trainer goes on: a newer version serves as usual
    assert ledger.target() == 4


def test_a_rollback_also_withdraws_a_version_of_its_range_announced_after_it() -> None:
    # Replicas read a topic's partitions in their own order; the outcome must not depend
    # on whether v3's announcement or the rollback from it came first.
    ledger = ledger_of(announced(1), announced(2), act("rollback", 1, 3), announced(3))
    assert ledger.target() == 1


def test_promote_lets_a_rejected_or_rolled_back_version_serve() -> None:
    ledger = ledger_of(announced(1), announced(2, "rejected"))
    assert ledger.target() == 1
    ledger.apply(act("promote", 2))
    assert ledger.target() == 2 and not ledger.rejected(2)
    ledger.apply(act("rollback", 1, 2))
    assert ledger.target() == 1
    ledger.apply(act("promote", 2))
    assert ledger.target() == 2


def test_a_version_promoted_after_a_rollback_stays_servable_when_announced_again() -> None:
    # A restarted trainer announces its latest version again.
    ledger = ledger_of(announced(4), announced(5), act("rollback", 4, 5), act("promote", 5))
    ledger.apply(announced(5))
    assert ledger.target() == 5 and not ledger.withdrawn(5)


def test_an_automatic_rollback_never_overrides_an_operator() -> None:
    automatic = AdapterAction(
        "rollback", 1, LINEAGE, "generator@h/1", 0.0, "automatic", from_version=2
    )
    promoted = ledger_of(announced(1), announced(2), act("rollback", 1, 2), act("promote", 2))
    promoted.apply(automatic)  # another replica's late regression report
    assert promoted.target() == 2
    # One sent before an operator's rollback from v3 lands after it: stale, ignored.
    ledger = ledger_of(announced(1), announced(2), announced(3), act("rollback", 1, 3))
    ledger.apply(dataclasses.replace(automatic, version=2, from_version=3))
    assert ledger.target() == 1 and ledger.withdrawn(2)
    pinned = ledger_of(announced(1), announced(2), act("pin", 2))
    pinned.apply(automatic)
    assert pinned.target() == 2 and not pinned.withdrawn(2)


def test_a_replayed_signed_action_is_ignored() -> None:
    pin = dataclasses.replace(act("pin", 1), signature="ab" * 32)
    ledger = ledger_of(announced(1), announced(2), pin, act("unpin"))
    ledger.apply(pin)  # the same bytes sent again by whoever can write to the topic
    assert ledger.target() == 2 and len(ledger.actions) == 2


def test_a_pin_holds_whatever_comes_until_unpin() -> None:
    ledger = ledger_of(announced(1), announced(2), act("pin", 1), announced(3))
    assert ledger.target() == 1 and list(ledger.candidates()) == [1]
    ledger.apply(act("unpin"))
    assert ledger.target() == 3


def test_every_replica_folding_the_same_topic_agrees() -> None:
    messages = [announced(1), announced(2), act("rollback", 1, 2), announced(3), act("pin", 3)]
    assert {ledger_of(*messages).target() for _ in range(3)} == {3}
    assert [a.action for a in ledger_of(*messages).actions] == ["rollback", "pin"]


def test_rollback_without_a_version_goes_to_the_servable_one_before_the_serving_one() -> None:
    ledger = ledger_of(announced(1), announced(2, "rejected"), announced(3))
    action = plan_action(ledger, "rollback", None, lineage=LINEAGE, by="ops@host", at=5.0)
    assert (action.version, action.from_version, action.at) == (1, 3, 5.0)
    ledger.apply(action)
    assert ledger.target() == 1


@pytest.mark.parametrize(
    ("messages", "action", "version", "why"),
    [
        ((announced(1),), "promote", 7, "never announced"),
        ((announced(1), announced(2, "rejected")), "pin", 2, "promote 2` first"),
        ((announced(1),), "unpin", None, "nothing is pinned"),
        ((), "rollback", None, "nothing to roll back"),
        ((announced(1), announced(2)), "rollback", 2, "not older than the serving v2"),
        ((announced(1), act("pin", 1)), "rollback", None, "unpin` first"),
        ((announced(1, "rejected"), announced(2)), "rollback", 1, "rejected v1"),
    ],
)
def test_an_action_that_would_do_nothing_or_could_not_serve_is_refused_with_the_fix(
    messages: tuple[AdapterAnnouncement | AdapterAction, ...],
    action: str,
    version: int | None,
    why: str,
) -> None:
    with pytest.raises(ActionError, match=why):
        plan_action(ledger_of(*messages), action, version, lineage=LINEAGE, by="ops@host")


def test_pinning_the_base_model_is_allowed() -> None:
    ledger = ledger_of(announced(1))
    ledger.apply(plan_action(ledger, "pin", 0, lineage=LINEAGE, by="ops@host"))
    assert ledger.target() == 0


def _feed(watch: LiveRewardWatch, version: int, mean: float, n: int, rng: random.Random) -> None:
    watch.observe(version, [rng.gauss(mean, 0.1) for _ in range(n)])


def test_a_version_whose_live_reward_dropped_beyond_the_margin_is_reported() -> None:
    rng = random.Random(0)
    watch = LiveRewardWatch(samples=32, margin=0.05)
    watch.served(1)
    _feed(watch, 1, 0.8, 40, rng)
    watch.served(2)
    _feed(watch, 2, 0.5, 31, rng)
    assert watch.regression() is None  # not a full window yet
    _feed(watch, 2, 0.5, 1, rng)
    regression = watch.regression()
    assert regression is not None
    assert (regression.version, regression.previous, regression.samples) == (2, 1, 32)
    assert regression.mean < regression.previous_mean - 0.05
    assert "v2" in regression.describe(0.05) and "v1" in regression.describe(0.05)


def test_noise_within_the_margin_is_not_a_regression() -> None:
    rng = random.Random(1)
    watch = LiveRewardWatch(samples=32, margin=0.05)
    watch.served(1)
    _feed(watch, 1, 0.8, 32, rng)
    watch.served(2)
    for _ in range(50):  # 50 windows: a test at 95% per window would flap without the margin
        _feed(watch, 2, 0.79, 32, rng)
        assert watch.regression() is None


def test_after_a_rollback_nothing_is_compared_until_the_next_new_version() -> None:
    rng = random.Random(2)
    watch = LiveRewardWatch(samples=8, margin=0.0)
    watch.served(1)
    _feed(watch, 1, 0.8, 8, rng)
    watch.served(2)
    _feed(watch, 2, 0.1, 8, rng)
    assert watch.regression() is not None
    watch.served(1)  # rolled back
    _feed(watch, 1, 0.0, 64, rng)
    assert watch.regression() is None
    _feed(watch, 9, 0.0, 64, rng)  # a version not served is ignored
    assert watch.current is not None and len(watch.current.rewards) == 8


def test_a_window_needs_two_rewards_to_have_a_variance() -> None:
    with pytest.raises(ValueError, match="samples"):
        LiveRewardWatch(samples=1, margin=0.0)

"""The tables of ``raft-stream adapters list``: the store's versions with their gate
verdicts and canary figures, what the adapters topic made of them, and the actions taken."""

from __future__ import annotations

import time

from rich.markup import escape
from rich.table import Table

from raft_stream.gate import CanaryFigures
from raft_stream.serving import ServingLedger
from raft_stream.training.store import AdapterStore

__all__ = ["actions_table", "adapter_table"]


def adapter_table(
    store: AdapterStore, pinned: int | None = None, ledger: ServingLedger | None = None
) -> Table:
    """The store's versions, newest first: verdict (and what operators and rollbacks made
    of it, from the adapters topic's ``ledger``), canary figures, loss, and which one
    serves: ``pinned`` (the config's pin), else the ledger's target, else ``latest``."""
    if pinned is not None:
        serving = pinned
    elif ledger is not None:
        serving = ledger.target()
    else:
        latest = store.latest()
        serving = latest.version if latest else 0
    table = Table(title=escape(f"adapter versions in {store.root}"))
    for column in ("version", "verdict", "canary reward", "distinct-2", "KL", "loss", "stored"):
        table.add_column(column, justify="right")
    for version in reversed(store.versions()):
        adapter = store.get(version)
        figures = CanaryFigures.from_metrics(adapter.metrics)
        marker = " (serving)" if version == serving else ""
        table.add_row(
            f"v{version}{marker}",
            _status(adapter.verdict, version, ledger),
            f"{figures.reward_mean:.3f} ± {figures.reward_ci95:.3f}" if figures else "-",
            f"{figures.distinct_2:.3f}" if figures else "-",
            f"{figures.kl:.3f}" if figures else "-",
            f"{adapter.metrics['loss']:.3f}" if "loss" in adapter.metrics else "-",
            _when(adapter.created_at),
        )
    if pinned is not None:
        source = " (pinned by store.pinned_version)"
    elif ledger is not None:
        source = " (pinned on the adapters topic)" if ledger.pinned is not None else ""
        source += ", per the adapters topic"
    else:
        source = ", per the store (the adapters topic not read)"
    table.caption = f"serving v{serving}{source}"
    return table


def _status(verdict: str | None, version: int, ledger: ServingLedger | None) -> str:
    status = verdict or "-"
    if ledger is None:
        return status
    if version not in ledger.announced:
        return f"{status}, not announced"
    if verdict == "rejected" and not ledger.rejected(version):
        status = "rejected, promoted by operator"
    if ledger.withdrawn(version):
        status += ", rolled back"
    return status


def actions_table(ledger: ServingLedger, last: int = 20) -> Table:
    """The last ``last`` actions on the adapters topic: when, what, who and why."""
    table = Table(title="adapter actions (adapters topic), newest last")
    for column in ("at", "action", "by", "trigger", "reason"):
        table.add_column(column)
    for action in ledger.actions[-last:]:
        if action.action == "rollback":
            what = f"rollback v{action.from_version} -> v{action.version}"
        else:
            what = " ".join(f"{x}" for x in (action.action, action.version) if x is not None)
        table.add_row(
            _when(action.at), what, escape(action.by), action.trigger, escape(action.reason)
        )
    return table


def _when(unix_s: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(unix_s))

"""Plots people would rather look at than a CSV."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")  # headless: servers and CI have no display
import matplotlib.pyplot as plt

if TYPE_CHECKING:
    from raft_stream.offline import OfflineReport


def plot_learning_curve(report: OfflineReport, path: Path) -> None:
    """Reward of all and of kept samples per iteration, held-out before/after, and loss."""
    rows = report.iterations
    x = [r.iteration for r in rows]
    fig, (ax_reward, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    ax_reward.plot(x, [r.reward_mean for r in rows], marker="o", label="mean reward, all samples")
    ax_reward.plot(x, [r.kept_reward_mean for r in rows], marker="s", label="mean reward, kept")
    for result, style, name in (
        (report.eval_before, "--", "held-out, base model"),
        (report.eval_after, "-.", "held-out, final adapter"),
    ):
        if result is not None:
            ax_reward.axhline(result.reward_mean, linestyle=style, color="gray", label=name)
    ax_reward.set_xlabel("iteration")
    ax_reward.set_ylabel("reward")
    ax_reward.legend(fontsize=8)
    ax_reward.grid(alpha=0.3)
    ax_loss.plot(x, [r.loss for r in rows], marker="o", color="tab:red", label="loss")
    ax_loss.plot(x, [r.distinct_2 for r in rows], marker="^", color="tab:green", label="distinct-2")
    ax_loss.set_xlabel("iteration")
    ax_loss.legend(fontsize=8)
    ax_loss.grid(alpha=0.3)
    fig.suptitle("RAFT learning curve")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)

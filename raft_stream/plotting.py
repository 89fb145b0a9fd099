"""Plots people would rather look at than a CSV."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")  # headless: servers and CI have no display
import matplotlib.pyplot as plt

if TYPE_CHECKING:
    from raft_stream.offline import OfflineReport
    from raft_stream.streaming_demo import StreamWatch


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


# How the streaming demo's plot marks an announced version, by verdict: (label, colour,
# line style).
_ANNOUNCED_STYLE = {
    "promoted": ("promoted version", "tab:green", "-"),
    "rejected": ("rejected version", "tab:red", "--"),
    None: ("new version (no gate)", "tab:green", ":"),
}


def plot_stream_reward(watch: StreamWatch, path: Path, window: int = 16) -> None:
    """The streaming demo's plot: mean reward of each prompt's K samples against prompts
    seen, a running mean over ``window`` prompts, and a vertical line where each adapter
    version was announced, styled by the promotion gate's verdict."""
    prompts = watch.per_prompt()
    seen = range(1, len(prompts) + 1)
    means = [m for _, m in prompts]
    running = [statistics.fmean(means[max(0, i - window + 1) : i + 1]) for i in range(len(means))]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.scatter(seen, means, s=8, alpha=0.35, color="gray", label="prompt (mean of K samples)")
    ax.plot(seen, running, color="tab:blue", linewidth=2, label=f"mean of last {window} prompts")
    labelled: set[str | None] = set()
    for version, announced in sorted(watch.announced.items()):
        label, color, style = _ANNOUNCED_STYLE.get(announced.verdict, _ANNOUNCED_STYLE[None])
        x = max(announced.prompts_seen, 0.5)  # one announced before any prompt: at the axis
        ax.axvline(
            x,
            color=color,
            alpha=0.6,
            linestyle=style,
            label=None if announced.verdict in labelled else label,
        )
        labelled.add(announced.verdict)
        ax.text(x, 1.02, f"v{version}", fontsize=7, color=color)
    ax.set_xlabel("prompts seen")
    ax.set_ylabel("reward")
    ax.set_ylim(-1.05, 1.1)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("raft-stream: reward while learning online (lines: adapter versions announced)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)

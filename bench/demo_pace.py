"""How the promotion gate changes the streaming demo's pace: the real demo
(``raft_stream.streaming_demo``, as ``raft-stream demo`` runs it: embedded broker, the
all-in-one daemon as a child process) for the same time with the gate on and off.

With the gate on, the trainer judges each new version on the demo's canary prompts before
it may serve (``raft_stream/streaming_demo.py`` sizes that run per model), on the training
core: fewer versions are stored in the same time, and only the promoted ones serve. Each
run is fed more prompts than it can answer, so both stream for ``--minutes`` (engine start
included, as in the demo) and the pace is prompts answered per minute of streaming.

    python bench/demo_pace.py                          # demo model, 10 minutes each
    python bench/demo_pace.py --model tiny --minutes 2

Writes bench/results/demo_pace.json (and each run's summary.json and reward.png under
``--runs``).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from raft_stream.generation.engine_dtype import cpu_identity
from raft_stream.streaming_demo import DEMO_MODELS, run_streaming_demo


def run(model: str, gate: bool, minutes: float, prompts: int, out: Path) -> dict[str, Any]:
    """One demo run; its summary's figures and the wall time (model check to drain)."""
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with (out / "demo.log").open("w") as log:
        run_streaming_demo(
            out, prompts, minutes * 60, Console(file=log, width=120), model=model, gate=gate
        )
    wall_s = time.perf_counter() - started
    summary = json.loads((out / "summary.json").read_text())
    streamed_min = summary["elapsed_s"] / 60
    return {
        "gate": summary["gate"],
        "prompts_answered": summary["prompts_done"],
        "versions_stored": len(summary["announced"]),
        "versions_served": len([v for v in summary["adapter_versions"] if v]),
        "promoted": len(summary["promoted"]),
        "rejected": len(summary["rejected"]),
        "streamed_s": summary["elapsed_s"],
        "prompts_per_minute": summary["prompts_done"] / streamed_min if streamed_min else 0.0,
        "versions_per_minute": len(summary["announced"]) / streamed_min if streamed_min else 0.0,
        "wall_s": wall_s,
        "summary": str(out / "summary.json"),
    }


def ratio(gated: float, ungated: float) -> float | None:
    return gated / ungated if ungated else None


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=sorted(DEMO_MODELS), default="demo")
    parser.add_argument("--minutes", type=float, default=10.0, help="streaming time per run")
    parser.add_argument(
        "--prompts", type=int, default=2000, help="prompts fed to each run (more than it answers)"
    )
    parser.add_argument("--runs", type=Path, default=Path("runs/demo_pace"))
    parser.add_argument("--out", type=Path, default=Path("bench/results/demo_pace.json"))
    args = parser.parse_args()
    console = Console()
    rows = []
    for gate in (False, True):
        name = "gated" if gate else "ungated"
        console.print(f"{args.model} demo, {name}, {args.minutes:g} min ...")
        row = run(args.model, gate, args.minutes, args.prompts, args.runs / f"{args.model}-{name}")
        rows.append({"model": args.model, "gated": gate, **row})
        if row["prompts_answered"] >= args.prompts:
            console.print(f"[yellow]all {args.prompts} prompts answered early: raise --prompts")
    ungated, gated = rows
    ratios = {
        "prompts_per_minute": ratio(gated["prompts_per_minute"], ungated["prompts_per_minute"]),
        "versions_stored": ratio(gated["versions_stored"], ungated["versions_stored"]),
    }

    table = Table(title=f"streaming demo pace, {args.model} model, {args.minutes:g} min per run")
    columns = ("gate", "prompts\nanswered", "versions\nstored", "promoted", "rejected")
    for column in (*columns, "prompts\n/min", "streamed\ns", "wall s"):
        table.add_column(column, justify="right")
    for row in rows:
        gate_cfg = row["gate"]
        table.add_row(
            f"{gate_cfg['canary_prompts']} x {gate_cfg['samples_per_prompt']}"
            if gate_cfg
            else "off",
            str(row["prompts_answered"]),
            str(row["versions_stored"]),
            str(row["promoted"]) if gate_cfg else "—",
            str(row["rejected"]) if gate_cfg else "—",
            f"{row['prompts_per_minute']:.1f}",
            f"{row['streamed_s']:.0f}",
            f"{row['wall_s']:.0f}",
        )
    shown = {k: f"{v:.2f}x" if v is not None else "—" for k, v in ratios.items()}
    table.caption = (
        f"gated / ungated: prompts/min {shown['prompts_per_minute']}, "
        f"versions stored {shown['versions_stored']}"
    )
    console.print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "command": "python bench/demo_pace.py " + shlex.join(sys.argv[1:]),
                "machine": {"cpu": cpu_identity()},
                "model": args.model,
                "minutes": args.minutes,
                "rows": rows,
                "gated_over_ungated": ratios,
            },
            indent=2,
        )
    )
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

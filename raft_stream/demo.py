"""The embedded demo: a movie-review chatbot (SmolLM2-135M-Instruct) pushed towards
positive reviews by RAFT with the VADER sentiment reward. Sized for a 2-core laptop.

The offline variant (``raft-stream demo --offline``) lives here; the streaming one, the
default, in ``raft_stream/streaming_demo.py``. Both end with the base model's and the
final adapter's responses to a few held-out prompts (``raft_stream/side_by_side.py``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console

from raft_stream.config import RaftConfig, load_config
from raft_stream.data.models import resolve_model
from raft_stream.data.prompts import read_prompts_jsonl, write_prompts_jsonl
from raft_stream.data.reviews import demo_prompts
from raft_stream.generation.base import Generator
from raft_stream.offline import OfflineReport, run_offline
from raft_stream.side_by_side import EXAMPLE_PROMPTS, example_responses, show_examples

DEMO_OVERRIDES: dict[str, Any] = {
    "model.name_or_path": "demo",  # brings the demo preset (raft_stream.presets)
    "model.max_model_len": 512,  # a KV cache for a 2-core laptop, not the model's 8192
    "reward.kind": "sentiment",
}
"""The demo's own settings, over the demo model's preset."""


def offline_demo_config(output_dir: Path, iterations: int = 6, prompts: int = 32) -> RaftConfig:
    """Write the demo prompt sets into ``output_dir`` and return the offline demo config."""
    output_dir.mkdir(parents=True, exist_ok=True)
    train, held_out = output_dir / "prompts.jsonl", output_dir / "eval_prompts.jsonl"
    write_prompts_jsonl(demo_prompts("train"), train)
    write_prompts_jsonl(demo_prompts("eval", prompts), held_out)
    return load_config(
        overrides={
            **DEMO_OVERRIDES,
            "offline.prompts": str(train),
            "offline.eval_prompts": str(held_out),
            "offline.iterations": iterations,
            "offline.prompts_per_iteration": prompts,
            "offline.output_dir": str(output_dir),
            "store.root": str(output_dir / "adapters"),
        }
    )


def run_offline_demo(
    cfg: RaftConfig, console: Console | None = None, generator: Generator | None = None
) -> OfflineReport:
    """Offline RAFT as ``cfg`` says (``run_offline``; ``generator`` as there), then the
    base model's and the final adapter's greedy responses to the first held-out prompts
    (``offline.eval_prompts``; none without them), printed and in ``examples.md``."""
    console = console or Console()
    report = run_offline(cfg, console, generator)
    held_out = cfg.offline.eval_prompts
    if held_out is not None:
        prompts = read_prompts_jsonl(held_out, cfg.generation.sampling)[:EXAMPLE_PROMPTS]
        model_path = resolve_model(cfg.model.name_or_path)
        examples = example_responses(model_path, cfg, report.final_adapter, prompts)
        console.print(f"examples: {show_examples(examples, report.output_dir, console)}")
    return report

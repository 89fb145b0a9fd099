"""The embedded demo: a movie-review chatbot (SmolLM2-135M-Instruct) pushed towards
positive reviews by RAFT with the VADER sentiment reward. Sized for a 2-core laptop."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from raft_stream.config import RaftConfig, load_config
from raft_stream.data.prompts import write_prompts_jsonl
from raft_stream.data.reviews import demo_prompts

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

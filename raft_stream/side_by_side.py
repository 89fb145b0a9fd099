"""The base model and the final adapter side by side: their responses to the same
held-out prompts, so the demos show what RAFT did to the text, not only to the reward.

Both answer greedily (temperature 0): the same text every run, and neither is luckier in
its draw, so the two columns compare fairly. The transformers backend samples them in the
demo's own process after the run (the run's engine is gone by then), a few prompts at the
run's ``generation.sampling.max_new_tokens``.

Example (``raft-stream demo --model tiny``, which ended on v5):
    >>> example_responses(model_path, cfg, store.latest(), held_out[:1])  # doctest: +SKIP
    [ExampleResponse(prompt='the dialogue in this movie was', base=' really confusing.',
                     final=' truly beautiful. i enjoyed it a lot.', version=5)]
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from raft_stream.config import RaftConfig
from raft_stream.generation.base import EnginePrompt, SamplingParams
from raft_stream.generation.hf_backend import TransformersGenerator
from raft_stream.prompting import PromptFormatter
from raft_stream.serving import BASE_VERSION
from raft_stream.types import AdapterVersion, PromptRecord

__all__ = [
    "EXAMPLE_PROMPTS",
    "ExampleResponse",
    "example_responses",
    "examples_markdown",
    "examples_table",
    "show_examples",
]

EXAMPLE_PROMPTS = 3
"""Held-out prompts the demos answer with the base model and the final adapter."""


@dataclass(frozen=True)
class ExampleResponse:
    """One held-out prompt and the two greedy responses to it."""

    prompt: str
    base: str
    """The base model's response."""
    final: str
    """The final adapter's response (the base model's where no version was stored)."""
    version: int
    """The adapter version that gave ``final``; 0 is the base model."""


def example_responses(
    model_path: str,
    cfg: RaftConfig,
    adapter: AdapterVersion | None,
    prompts: list[PromptRecord],
) -> list[ExampleResponse]:
    """Greedy responses of the base model at ``model_path`` and of ``adapter`` on it (None:
    the base model answers both) to ``prompts``, formatted as ``cfg.model`` says and at
    most ``generation.sampling.max_new_tokens`` long."""
    generator = TransformersGenerator(model_path, cfg.model, cfg.generation)
    formatter = PromptFormatter(generator.tokenizer, cfg.model)
    inputs = [EnginePrompt(r.text, r.token_ids) for r in map(formatter.format, prompts)]
    params = SamplingParams(
        n=1, max_new_tokens=cfg.generation.sampling.max_new_tokens, temperature=0.0
    )
    base = generator.generate(inputs, params)
    final = generator.generate(inputs, params, adapter) if adapter is not None else base
    generator.close()
    version = adapter.version if adapter is not None else BASE_VERSION
    return [
        ExampleResponse(record.prompt, by_base[0].text, by_final[0].text, version)
        for record, by_base, by_final in zip(prompts, base, final, strict=True)
    ]


def _final_title(version: int) -> str:
    return f"final v{version}" if version != BASE_VERSION else "final: none stored (base model)"


def examples_table(examples: list[ExampleResponse]) -> Table:
    """prompt | base model | final vN, one row per example."""
    version = examples[0].version if examples else BASE_VERSION
    table = Table(title="held-out prompts, greedy responses", show_lines=True)
    table.add_column("prompt", ratio=1)
    table.add_column("base model", ratio=2)
    table.add_column(_final_title(version), ratio=2)
    for example in examples:
        # Text, not markup: a response may hold square brackets.
        texts = (example.prompt, example.base, example.final)
        table.add_row(*(Text(text.strip()) for text in texts))
    return table


def _quoted(text: str) -> str:
    """``text`` as a markdown block quote (a response may start with ``#`` or ``-``)."""
    lines = text.strip().splitlines() or ["*(empty)*"]
    return "\n".join(f"> {line}".rstrip() for line in lines)


def examples_markdown(examples: list[ExampleResponse]) -> str:
    """``examples.md``: each prompt, then the base model's and the final adapter's
    responses."""
    version = examples[0].version if examples else BASE_VERSION
    final = _final_title(version)
    parts = [
        "# The base model and the final adapter on held-out prompts",
        "",
        "Greedy responses (temperature 0) of the base model and of the final adapter "
        f"(v{version}) to prompts the run never trained on."
        if version != BASE_VERSION
        else "No adapter version was stored (or none promoted): both are the base model's "
        "greedy responses (temperature 0) to prompts the run never trained on.",
    ]
    for number, example in enumerate(examples, start=1):
        parts += [
            "",
            f"## Prompt {number}",
            "",
            _quoted(example.prompt),
            "",
            "**base model**",
            "",
            _quoted(example.base),
            "",
            f"**{final}**",
            "",
            _quoted(example.final),
        ]
    return "\n".join(parts) + "\n"


def show_examples(examples: list[ExampleResponse], out: Path, console: Console) -> Path:
    """Print ``examples`` as a table and write them to ``out/examples.md`` (returned)."""
    path = out / "examples.md"
    path.write_text(examples_markdown(examples))
    console.print(examples_table(examples))
    return path

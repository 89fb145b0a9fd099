"""The base model and the final adapter side by side: greedy responses on the real tiny
model (the same every run, changed by an adapter), and how the demos show them (a table,
examples.md)."""

from __future__ import annotations

import io
from pathlib import Path

from rich.console import Console

from raft_stream.config import load_config
from raft_stream.data.tiny_model import tiny_prompts
from raft_stream.side_by_side import (
    ExampleResponse,
    example_responses,
    examples_markdown,
    examples_table,
    show_examples,
)
from raft_stream.types import AdapterVersion

EXAMPLES = [
    ExampleResponse("the plot was", " thin.", " a [bold] delight.", 7),
    ExampleResponse("the score was", " loud\n# and long", "", 7),
]


def test_greedy_responses_repeat_and_the_adapter_changes_them(
    tiny_model_dir: Path, tiny_lora_adapters: list[AdapterVersion]
) -> None:
    cfg = load_config(overrides={"model.name_or_path": "tiny"})
    prompts = tiny_prompts("eval")[:3]
    alone = example_responses(str(tiny_model_dir), cfg, None, prompts)
    assert [(e.prompt, e.version) for e in alone] == [(p.prompt, 0) for p in prompts]
    assert all(e.final == e.base and e.base.strip() for e in alone)

    adapter = tiny_lora_adapters[0]
    paired = example_responses(str(tiny_model_dir), cfg, adapter, prompts)
    assert [e.base for e in paired] == [e.base for e in alone]  # greedy: the same text
    assert {e.version for e in paired} == {adapter.version}
    assert any(e.final != e.base for e in paired)


def test_the_table_shows_prompt_base_and_final_version_as_plain_text() -> None:
    output = io.StringIO()
    Console(file=output, width=100).print(examples_table(EXAMPLES))
    text = output.getvalue()
    assert "base model" in text and "final v7" in text
    assert "a [bold] delight." in text  # a response's brackets are text, not markup
    assert "the plot was" in text and "the score was" in text


def test_examples_md_quotes_each_response_under_its_prompt(tmp_path: Path) -> None:
    path = show_examples(EXAMPLES, tmp_path, Console(file=io.StringIO()))
    assert path == tmp_path / "examples.md"
    assert path.read_text() == examples_markdown(EXAMPLES)
    markdown = path.read_text()
    assert "of the final adapter (v7)" in markdown
    second = markdown.split("## Prompt 2\n")[1]
    # A response's own "#" stays inside its quote; an empty one says so.
    assert second == (
        "\n> the score was\n\n**base model**\n\n> loud\n> # and long\n\n"
        "**final v7**\n\n> *(empty)*\n"
    )


def test_without_a_stored_version_both_columns_are_the_base_models() -> None:
    alone = [ExampleResponse("the plot was", " thin.", " thin.", 0)]
    assert "No adapter version was stored" in examples_markdown(alone)
    output = io.StringIO()
    Console(file=output, width=100).print(examples_table(alone))
    assert "final: none stored (base model)" in output.getvalue()

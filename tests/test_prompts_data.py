"""Prompt JSONL files, the Rotten Tomatoes snippets and the demo prompts built from them."""

from __future__ import annotations

from pathlib import Path

import pytest

from raft_stream.config import SamplingConfig
from raft_stream.data.prompts import read_prompts_jsonl, write_prompts_jsonl
from raft_stream.data.reviews import demo_prompts, load_snippets, split_snippets
from raft_stream.types import PromptRecord


def test_prompt_file_round_trips(tmp_path: Path) -> None:
    records = [
        PromptRecord(id="a", prompt="the movie was"),
        PromptRecord(
            id="b",
            prompt="Critique « Amélie » in one line.",
            metadata={"rating": -1.5, "tags": ["fr"]},
            sampling={"k": 4},
        ),
    ]
    path = tmp_path / "prompts.jsonl"
    write_prompts_jsonl(records, path)
    assert read_prompts_jsonl(path) == records


def test_prompt_file_skips_blank_lines_and_accepts_integer_ids(tmp_path: Path) -> None:
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"id": 7, "prompt": "hi"}\n\n  \n{"id": "x", "prompt": "yo"}\n')
    assert [(r.id, r.prompt) for r in read_prompts_jsonl(path)] == [("7", "hi"), ("x", "yo")]


def test_prompt_file_raises_on_bad_json_with_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"id": "a", "prompt": "ok"}\n{"id": "b", "prompt": \n')
    with pytest.raises(ValueError, match=r"prompts\.jsonl, line 2: "):
        read_prompts_jsonl(path)


def test_prompt_file_raises_on_missing_prompt_with_line(tmp_path: Path) -> None:
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"id": "a", "prompt": "ok"}\n\n{"id": "c", "text": "no prompt"}\n')
    with pytest.raises(ValueError, match=r"line 3: missing_prompt: the prompt field is required"):
        read_prompts_jsonl(path)


@pytest.mark.parametrize("prompt", ["", "  \\t "])
def test_prompt_file_raises_on_empty_prompt(tmp_path: Path, prompt: str) -> None:
    path = tmp_path / "prompts.jsonl"
    path.write_text(f'{{"id": "a", "prompt": "{prompt}"}}\n')
    with pytest.raises(ValueError, match=r"line 1: empty_prompt: the prompt is empty"):
        read_prompts_jsonl(path)


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ('{"id": "a", "prompt": "hi", "sampling": {"k": 256}}', "override_out_of_bounds"),
        ('{"id": "\\ud800", "prompt": "hi"}', "bad_text"),
        ('{"id": "a", "prompt": "hi", "sampling": {"temperature": 1' + "0" * 400 + "}}", ""),
    ],
)
def test_prompt_file_applies_the_prompts_topic_rules(
    tmp_path: Path, line: str, reason: str
) -> None:
    # One decoder for both: a line is valid exactly when the same bytes are a valid message.
    path = tmp_path / "prompts.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(ValueError, match=f"line 1: {reason or 'number_out_of_range'}"):
        read_prompts_jsonl(path)


def test_prompt_file_takes_overrides_within_the_configured_limits(tmp_path: Path) -> None:
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "hi", "sampling": {"k": 16}, "note": "ignored"}\n')
    records = read_prompts_jsonl(path, SamplingConfig(k=8, prompt_max_k=16))
    assert [(r.id, r.sampling) for r in records] == [("prompts.jsonl:1", {"k": 16})]


def test_snippets_load_all_rows_with_ratings_in_range() -> None:
    snippets = load_snippets()
    assert len(snippets) == 10_605
    assert all(-4.0 <= s.rating <= 4.0 for s in snippets)
    assert all(s.text for s in snippets)
    assert len({s.id for s in snippets}) == 10_605


def test_snippets_decode_accented_text() -> None:
    by_id = {s.id: s for s in load_snippets()}
    assert "Jirí Hubac's" in by_id[233].text


def test_snippet_split_holds_out_about_ten_percent() -> None:
    train, heldout = split_snippets()
    assert len(train) + len(heldout) == 10_605
    assert 0.08 < len(heldout) / 10_605 < 0.12
    assert not {s.id for s in train} & {s.id for s in heldout}


def test_demo_prompt_splits_are_disjoint() -> None:
    train = {p.id for p in demo_prompts("train")}
    evaluation = {p.id for p in demo_prompts("eval")}
    assert not train & evaluation
    assert len(train) + len(evaluation) == 10_605


def test_demo_prompts_are_stable() -> None:
    # Pinned: a change here silently changes every experiment's eval set.
    first = demo_prompts("eval", n=1)[0]
    assert first.id == "rt-3467"
    assert first.prompt == (
        "Write a short review of a movie that critics described as: "
        '"The film does a solid job of slowly, steadily building up to the climactic '
        'burst of violence."'
    )
    assert demo_prompts("eval", n=50) == demo_prompts("eval")[:50]


def test_demo_prompts_mix_positive_and_negative_snippets() -> None:
    ratings = [p.metadata["rating"] for p in demo_prompts("train", n=200)]
    assert 60 < sum(r > 0 for r in ratings) < 140

"""Prompt files: JSON Lines, one ``{"id", "prompt", optional "metadata"}`` per line.

``id`` is a string (an integer is accepted and kept as its decimal string); an optional
``sampling`` object carries per-prompt overrides, as on the prompts topic.

Example line::

    {"id": "rt-17", "prompt": "Continue this movie review: 'A gorgeous, witty'", "metadata": {}}
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from raft_stream.types import PromptRecord

__all__ = ["read_prompts_jsonl", "write_prompts_jsonl"]


def _record(data: Any) -> PromptRecord:
    """One parsed line as a record; ValueError says what is wrong with it."""
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    unknown = set(data) - {"id", "prompt", "metadata", "sampling"}
    if unknown:
        raise ValueError(f"unknown keys {sorted(unknown)}; allowed: id, prompt, metadata, sampling")
    ident = data.get("id")
    if isinstance(ident, int) and not isinstance(ident, bool):
        ident = str(ident)
    if not isinstance(ident, str) or not ident:
        raise ValueError(f'"id" must be a non-empty string or an integer, got {ident!r}')
    prompt = data.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise ValueError(f'"prompt" must be a non-empty string, got {prompt!r}')
    for key in ("metadata", "sampling"):
        if not isinstance(data.get(key, {}), dict):
            raise ValueError(f'"{key}" must be an object, got {type(data[key]).__name__}')
    return PromptRecord(
        id=ident,
        prompt=prompt,
        metadata=data.get("metadata", {}),
        sampling=data.get("sampling", {}),
    )


def read_prompts_jsonl(path: str | os.PathLike[str]) -> list[PromptRecord]:
    """Read a prompt file; blank lines are skipped.

    Raises ValueError naming the file and the 1-based line number of the first bad line.
    """
    records = []
    with Path(path).open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                records.append(_record(json.loads(line)))
            except ValueError as exc:  # json.JSONDecodeError is a ValueError
                raise ValueError(f"{path}, line {number}: {exc}") from exc
    return records


def write_prompts_jsonl(records: Iterable[PromptRecord], path: str | os.PathLike[str]) -> None:
    """Write records as a prompt file that ``read_prompts_jsonl`` reads back unchanged."""
    with Path(path).open("w", encoding="utf-8") as out:
        for record in records:
            line: dict[str, Any] = {"id": record.id, "prompt": record.prompt}
            if record.metadata:
                line["metadata"] = record.metadata
            if record.sampling:
                line["sampling"] = record.sampling
            out.write(json.dumps(line, ensure_ascii=False) + "\n")

"""Prompt files: JSON Lines, one prompt message per line, read by the prompts topic's own
decoder (``raft_stream.stream.schema.decode_prompt``), so a line is valid exactly when the
same bytes would be a valid message on the prompts topic.

``id`` is a string (an integer is accepted and kept as its decimal string; a line without
one gets ``<file name>:<line number>``); an optional ``sampling`` object carries
per-prompt overrides within the configured limits, as on the prompts topic.

Example line::

    {"id": "rt-17", "prompt": "Continue this movie review: 'A gorgeous, witty'", "metadata": {}}
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from raft_stream.config import SamplingConfig
from raft_stream.errors import MessageError
from raft_stream.stream.schema import MAX_MESSAGE_BYTES, decode_prompt, dumps, encode_prompt
from raft_stream.types import PromptRecord

__all__ = ["read_prompts_jsonl", "write_prompts_jsonl"]


def read_prompts_jsonl(
    path: str | os.PathLike[str],
    sampling: SamplingConfig | None = None,
    max_line_bytes: int = MAX_MESSAGE_BYTES,
) -> list[PromptRecord]:
    """Read a prompt file; blank lines are skipped. ``sampling`` bounds the overrides
    (the run's ``generation.sampling``; default: its defaults).

    Raises ValueError naming the file, the 1-based line number of the first bad line and
    the prompts topic's reason (e.g. ``empty_prompt``).
    """
    limits = sampling or SamplingConfig()
    name = Path(path).name
    records = []
    with Path(path).open("rb") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                records.append(decode_prompt(line, max_line_bytes, f"{name}:{number}", limits))
            except MessageError as exc:
                raise ValueError(f"{path}, line {number}: {exc}") from exc
    return records


def write_prompts_jsonl(records: Iterable[PromptRecord], path: str | os.PathLike[str]) -> None:
    """Write records as a prompt file that ``read_prompts_jsonl`` reads back unchanged."""
    with Path(path).open("wb") as out:
        for record in records:
            out.write(dumps(encode_prompt(record)) + b"\n")

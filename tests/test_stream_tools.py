"""produce_file and tail against the embedded broker."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from raft_stream.config import KafkaConfig
from raft_stream.stream.tools import produce_file, tail

pytestmark = pytest.mark.kafka


def test_produce_file_then_tail_round_trips_every_line(
    kafka_config: Callable[..., KafkaConfig], tmp_path: Path
) -> None:
    cfg = kafka_config(partitions=1)  # one partition: tail prints in file order
    lines = [
        '{"id": "a", "prompt": "Write a review."}',
        '{"id": "b", "prompt": "¿Qué tal la película?", "sampling": {"k": 2}}',
        "{this line is not json",  # sent anyway: the consumer dead-letters it
        '{"id": "c", "prompt": "Last one."}',
    ]
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(lines[:2]) + "\r\n\n" + "\n".join(lines[2:]) + "\n")

    assert produce_file(cfg, path) == len(lines)  # the blank line is skipped

    out = io.StringIO()
    printed = tail(cfg, cfg.topics.prompts, out=out, idle_timeout_s=1.5)
    shown = [json.loads(line) for line in out.getvalue().splitlines()]
    assert printed == len(shown) == len(lines)
    assert shown[0] == json.loads(lines[0])
    assert shown[1] == json.loads(lines[1])
    assert base64.b64decode(shown[2]["value_b64"]) == lines[2].encode()

    terminal = _Terminal()
    assert tail(cfg, cfg.topics.prompts, max_messages=1, out=terminal) == 1
    assert "Write a review." in terminal.getvalue()
    assert len(terminal.getvalue().splitlines()) > 1  # pretty-printed by rich


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True

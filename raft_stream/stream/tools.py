"""Command-line helpers: load a JSONL file into a topic, and print a topic.

The CLI wires them as ``raft-stream produce FILE`` and ``raft-stream tail TOPIC``.
"""

from __future__ import annotations

import base64
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from rich.console import Console
from tqdm import tqdm

from raft_stream.config import KafkaConfig
from raft_stream.stream.kafka import JsonConsumer, StreamProducer, ensure_topics

__all__ = ["produce_file", "tail"]


def produce_file(
    cfg: KafkaConfig,
    path: str | os.PathLike[str],
    topic: str | None = None,
    timeout_s: float = 60.0,
) -> int:
    """Send each non-blank line of a JSONL file to ``topic`` (default: the prompts topic).

    Lines go as they are, without parsing: a malformed line reaches the broker and is
    dead-lettered by the consumer like any bad message. Shows a progress bar on a TTY.
    Returns the number of records acknowledged; raises DeliveryError if any is not.
    """
    topic = topic or cfg.topics.prompts
    if cfg.create_topics:
        ensure_topics(cfg, [topic])
    path = Path(path)
    with (
        StreamProducer(cfg) as producer,
        path.open("rb") as lines,
        tqdm(total=path.stat().st_size, unit="B", unit_scale=True, desc=topic, disable=None) as bar,
    ):

        def sends() -> Iterator[Any]:
            for line in lines:
                bar.update(len(line))
                value = line.rstrip(b"\r\n")
                if value.strip():
                    yield producer.send_bytes(topic, value)

        return producer.wait_all(sends(), timeout_s)


def _json_or_raw(value: bytes, _where: str) -> Any:
    """The message as JSON; bytes that are not JSON come back as base64 so tail shows all."""
    try:
        return json.loads(value)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return {"value_b64": base64.b64encode(value).decode("ascii")}


def tail(
    cfg: KafkaConfig,
    topic: str,
    from_beginning: bool = True,
    max_messages: int | None = None,
    out: TextIO = sys.stdout,
    idle_timeout_s: float | None = None,
) -> int:
    """Print the messages of ``topic``, one JSON per line (pretty and coloured on a TTY).

    Reads every partition without joining a group, so it never moves anyone's offsets.
    Stops after ``max_messages``, or when no message came for ``idle_timeout_s``
    (None: follow until interrupted). Returns the number printed.
    """
    console = Console(file=out) if out.isatty() else None
    printed = 0
    with JsonConsumer(
        cfg, topic, _json_or_raw, group_id=None, from_beginning=from_beginning
    ) as reader:
        last_message = time.monotonic()
        while max_messages is None or printed < max_messages:
            if idle_timeout_s is not None and time.monotonic() - last_message > idle_timeout_s:
                break
            for record in reader.poll(timeout_s=0.5).records:
                if console is not None:
                    console.print_json(data=record.value)
                else:
                    out.write(json.dumps(record.value, ensure_ascii=False) + "\n")
                printed += 1
                last_message = time.monotonic()
                if printed == max_messages:
                    break
        out.flush()
    return printed

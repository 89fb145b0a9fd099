"""Structured logs for the daemon roles: one JSON object per line.

Every line has ``ts`` (UTC, ISO 8601), ``level``, ``logger``, ``msg`` and ``thread``, plus
the record's extra fields (``log.info("stored", extra={"version": 3})``) and ``exc`` with
the traceback when there is one.

Example:
    >>> configure_json_logging("INFO")
    >>> logging.getLogger("raft_stream.roles").info("stored", extra={"version": 3})
    {"ts": "2026-11-27T16:50:01.123+00:00", "level": "INFO", "logger": "raft_stream.roles", ...}
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
from datetime import UTC, datetime
from typing import Any

__all__ = ["JsonFormatter", "configure_json_logging"]

# Attributes every LogRecord has; anything else on a record came in through ``extra``.
_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
}


class JsonFormatter(logging.Formatter):
    """Formats a record as one line of JSON (values JSON cannot hold become strings)."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            "thread": record.threadName,
        }
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                line[key] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, ensure_ascii=False)


def configure_json_logging(level: str | int = "INFO") -> None:
    """Send every logger's records to stderr as JSON lines (replaces earlier handlers).

    vLLM installs its own text handler unless VLLM_CONFIGURE_LOGGING=0; set here before
    vLLM is imported, so its lines come out as JSON too.
    """
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=level, handlers=[handler], force=True)
    # An exception that ends a thread is a log line too, not a bare traceback on stderr.
    threading.excepthook = _log_thread_exception
    # Per-request chatter of the Kafka client drowns the service's own lines.
    logging.getLogger("kafka").setLevel(max(logging.WARNING, logging.getLogger().level))


def _log_thread_exception(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    thread = args.thread.name if args.thread is not None else "?"
    logging.getLogger("raft_stream").critical(
        "uncaught exception ended a thread",
        exc_info=(args.exc_type, args.exc_value or args.exc_type(), args.exc_traceback),
        extra={"thread_name": thread},
    )

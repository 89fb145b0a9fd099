"""The streaming roles: generator (prompts -> samples), trainer (samples -> adapter
versions), and all-in-one (both in one process), plus the lifecycle they share.

Names are imported on first use: ``raft-stream produce`` or a lifecycle helper must not
pay for torch, transformers and peft, which the roles pull in.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from raft_stream.roles.all_in_one import run_all_in_one
    from raft_stream.roles.daemon import Daemon, run_generator, run_trainer
    from raft_stream.roles.generator import GeneratorRole
    from raft_stream.roles.lifecycle import Shutdown
    from raft_stream.roles.trainer import TrainerRole

__all__ = [
    "Daemon",
    "GeneratorRole",
    "Shutdown",
    "TrainerRole",
    "run_all_in_one",
    "run_generator",
    "run_trainer",
]

_HOMES = {
    "Daemon": "daemon",
    "GeneratorRole": "generator",
    "Shutdown": "lifecycle",
    "TrainerRole": "trainer",
    "run_all_in_one": "all_in_one",
    "run_generator": "daemon",
    "run_trainer": "daemon",
}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)

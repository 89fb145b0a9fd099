"""The streaming roles: generator (prompts -> samples), trainer (samples -> adapter
versions), and all-in-one (both in one process), plus the lifecycle they share."""

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

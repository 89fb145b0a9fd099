"""raft-stream: online RAFT (Reward rAnked FineTuning) over a stream of prompts."""

from raft_stream.config import RaftConfig, load_config
from raft_stream.types import AdapterVersion, Completion, PromptRecord, Sample

__all__ = [
    "AdapterVersion",
    "Completion",
    "PromptRecord",
    "RaftConfig",
    "Sample",
    "load_config",
]

__version__ = "0.1.0"

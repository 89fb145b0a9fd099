"""Where raft-stream caches what it builds (demo model, tiny test model, datasets)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$RAFT_STREAM_CACHE``, else ``~/.cache/raft-stream``; created on first use."""
    root = Path(os.environ.get("RAFT_STREAM_CACHE", Path.home() / ".cache" / "raft-stream"))
    root.mkdir(parents=True, exist_ok=True)
    return root

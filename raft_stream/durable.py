"""Renames that survive a power cut: the rename itself must reach the disk before the
Kafka commit that depends on it.

``os.replace`` is atomic, but the new directory entry is durable only once the directory is
fsynced (POSIX leaves it to the file system; ext4's default data=ordered mode does not
promise it). Every rename that precedes a commit (``buffer.jsonl``, an adapter version and
``latest``) goes through here.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["fsync_dir", "replace_durably"]


def fsync_dir(folder: Path) -> None:
    """Flush ``folder``'s entries (renames, creations, deletions) to the disk."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_durably(src: Path, dst: Path) -> None:
    """``os.replace(src, dst)``, then fsync ``dst``'s folder (and ``src``'s, if another).

    ``src``'s contents must already be fsynced by the caller. Raises OSError.
    """
    os.replace(src, dst)
    fsync_dir(dst.parent)
    if src.parent.resolve() != dst.parent.resolve():
        fsync_dir(src.parent)

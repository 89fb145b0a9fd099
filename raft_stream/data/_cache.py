"""Build-once cache folders: complete or absent, never half-written."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock

from raft_stream.paths import cache_dir

log = logging.getLogger(__name__)


def cached_folder(name: str, build: Callable[[Path], object]) -> Path:
    """Return ``cache_dir()/name``, running ``build(tmp_folder)`` first if it is missing.

    ``build`` fills an empty temporary folder that is then renamed into place, so a crash
    mid-build leaves no folder under ``name``. A file lock makes concurrent processes wait
    for the first builder instead of building the same thing twice.
    """
    root = cache_dir()
    target = root / name
    if target.is_dir():
        return target
    with FileLock(str(root / f".{name}.lock")):
        if target.is_dir():  # another process built it while we waited
            return target
        prefix = f".{name}.tmp-"
        # Holding the lock, any folder with this prefix is left over from a crashed build.
        for stale in root.glob(f"{prefix}*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=root))
        try:
            log.info("building %s (first use; cached afterwards)", target)
            build(tmp)
            # mkdtemp (and safetensors) create owner-only modes; other users, e.g. a vLLM
            # container with another uid on a shared volume, must be able to read the cache.
            for path in (tmp, *tmp.rglob("*")):
                path.chmod(0o755 if path.is_dir() else 0o644)
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target

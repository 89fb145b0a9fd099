"""Locate promtool; tests that need it fail (never skip) when it is missing."""

from __future__ import annotations

import shutil
import subprocess

import pytest

INSTALL_HINT = "apt-get update && apt-get install -y prometheus"


def promtool(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    """Run promtool with ``args``; fails the test with the install line when it is absent."""
    exe = shutil.which("promtool")
    if exe is None:
        pytest.fail(f"promtool is not installed; CI installs it with `{INSTALL_HINT}`")
    return subprocess.run(
        [exe, *args],
        input=stdin.decode() if stdin is not None else None,
        capture_output=True,
        text=True,
        timeout=60,
    )

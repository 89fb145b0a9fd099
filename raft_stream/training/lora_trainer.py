"""LoRA supervised fine-tuning on kept samples (RAFT's step 5).

The loss is plain next-token cross-entropy on the response tokens only: prompt tokens are
masked out (LMFlow's RAFT trains on the prompt too). One adapter is trained on across every
streaming batch, and the AdamW state is saved next to it so a restart continues, not restarts.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from raft_stream.config import TrainingConfig
from raft_stream.errors import ConfigError, NonFiniteLossError, TrainingError
from raft_stream.training.store import TRAINER_STATE
from raft_stream.types import AdapterVersion, Sample

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


@dataclass(frozen=True)
class TrainResult:
    """What one training round did."""

    loss: float
    optimizer_steps: int
    tokens: int
    duration_s: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.duration_s if self.duration_s > 0 else 0.0


def resolve_device_and_dtype(cfg: TrainingConfig) -> tuple[torch.device, torch.dtype]:
    """auto: CUDA with bfloat16 when a GPU is there, else the CPU with float32."""
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise TrainingError("training.device is 'cuda' but no CUDA GPU is visible; set 'auto'")
    device = torch.device("cuda" if use_cuda else "cpu")
    if cfg.dtype == "auto":
        dtype = torch.bfloat16 if use_cuda else torch.float32
    else:
        dtype = getattr(torch, cfg.dtype)
    return device, dtype


def encode_sample(
    tokenizer: PreTrainedTokenizerBase, sample: Sample, max_length: int
) -> tuple[list[int], list[int]]:
    """Token ids and labels for one sample; labels mask the prompt with IGNORE_INDEX.

    The prompt is tokenized as the generator tokenized it (special tokens included); the
    response gets EOS only when the model ended it itself. Over-long samples lose prompt
    tokens from the left, so the response is always learned whole where it fits.
    """
    prompt_ids = tokenizer(sample.prompt_text).input_ids
    response_ids = tokenizer(sample.response, add_special_tokens=False).input_ids
    if sample.finish_reason == "stop" and tokenizer.eos_token_id is not None:
        response_ids = [*response_ids, tokenizer.eos_token_id]
    response_ids = response_ids[:max_length]
    prompt_ids = prompt_ids[max(0, len(prompt_ids) + len(response_ids) - max_length) :]
    input_ids = prompt_ids + response_ids
    labels = [IGNORE_INDEX] * len(prompt_ids) + response_ids
    return input_ids, labels


def check_adapter_shape(adapter: AdapterVersion, cfg: TrainingConfig) -> None:
    """Raise ConfigError when the stored ``adapter`` the trainer would resume from has
    another LoRA shape (rank, alpha, target modules) than ``cfg``: resuming loads the stored
    shape, so a changed ``training.lora_r`` would be ignored without a word (and a stored rank
    above ``generation.max_lora_rank`` refused by every generator). An unreadable
    adapter_config.json is left to the store's verification."""
    try:
        stored = LoraConfig.from_pretrained(str(adapter.path))
    except (OSError, ValueError, TypeError):
        return
    changed = [
        f"{field}: stored {was!r}, configured {now!r}"
        for field, was, now in (
            ("training.lora_r", stored.r, cfg.lora_r),
            ("training.lora_alpha", stored.lora_alpha, cfg.lora_alpha),
            (
                "training.target_modules",
                sorted(stored.target_modules or ()),
                sorted(cfg.target_modules),
            ),
        )
        if was != now
    ]
    if changed:
        raise ConfigError(
            f"the adapter store holds version {adapter.version} ({adapter.path}) of another "
            f"LoRA shape: {'; '.join(changed)}. The trainer resumes from it, so the new "
            "settings would not apply: start a new store (a new daemon.state_dir, or "
            "store.root), or set them back to the stored values"
        )


class LoRATrainer:
    """Trains one LoRA adapter on a base model, batch after batch."""

    def __init__(
        self,
        model_path: str,
        cfg: TrainingConfig,
        resume_from: AdapterVersion | None = None,
        trust_remote_code: bool = False,
    ) -> None:
        self.cfg = cfg
        self.device, self.dtype = resolve_device_and_dtype(cfg)
        torch.manual_seed(cfg.seed)
        self.tokenizer = AutoTokenizer.from_pretrained(
            model_path, trust_remote_code=trust_remote_code
        )
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        base = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=self.dtype, trust_remote_code=trust_remote_code
        )
        if resume_from is not None:
            self.model: Any = PeftModel.from_pretrained(
                base, str(resume_from.path), is_trainable=True
            )
        else:
            lora = LoraConfig(
                r=cfg.lora_r,
                lora_alpha=cfg.lora_alpha,
                lora_dropout=cfg.lora_dropout,
                target_modules=list(cfg.target_modules),
                bias="none",
                task_type="CAUSAL_LM",
            )
            self.model = get_peft_model(base, lora)
        self.model.to(self.device)
        self.optimizer = torch.optim.AdamW(
            [p for p in self.model.parameters() if p.requires_grad],
            lr=cfg.learning_rate,
            weight_decay=cfg.weight_decay,
        )
        self.rounds = 0
        self.optimizer_steps = 0
        if resume_from is not None:
            self._load_state(resume_from.path / TRAINER_STATE)

    def _collate(self, encoded: Sequence[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(ids) for ids, _ in encoded)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(encoded), width), pad, dtype=torch.long)
        labels = torch.full((len(encoded), width), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, (ids, lab) in enumerate(encoded):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            labels[row, : len(lab)] = torch.tensor(lab)
            attention[row, : len(ids)] = 1
        return {
            "input_ids": input_ids.to(self.device),
            "labels": labels.to(self.device),
            "attention_mask": attention.to(self.device),
        }

    def train(self, samples: Sequence[Sample]) -> TrainResult:
        """Run ``cfg.epochs`` passes over the samples; returns the mean response-token loss."""
        if not samples:
            raise TrainingError("cannot train on an empty batch")
        cfg = self.cfg
        encoded = [encode_sample(self.tokenizer, s, cfg.max_length) for s in samples]
        encoded = [e for e in encoded if any(label != IGNORE_INDEX for label in e[1])]
        if not encoded:
            raise TrainingError("every sample in the batch has an empty response")
        order_rng = random.Random(cfg.seed * 1_000_003 + self.rounds)
        self.model.train()
        started = time.perf_counter()
        loss_sum, loss_tokens, tokens, steps = 0.0, 0, 0, 0
        micro_in_step = 0
        self.optimizer.zero_grad(set_to_none=True)
        for _ in range(cfg.epochs):
            order = list(range(len(encoded)))
            order_rng.shuffle(order)
            for start in range(0, len(order), cfg.batch_size):
                batch = self._collate([encoded[i] for i in order[start : start + cfg.batch_size]])
                n_targets = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
                output = self.model(**batch)
                loss = output.loss
                if not torch.isfinite(loss):
                    raise NonFiniteLossError(
                        f"loss became {loss.item()}; lower training.learning_rate"
                    )
                (loss / cfg.grad_accumulation).backward()
                loss_sum += loss.item() * n_targets
                loss_tokens += n_targets
                tokens += int(batch["attention_mask"].sum())
                micro_in_step += 1
                if micro_in_step == cfg.grad_accumulation:
                    self._step()
                    steps += 1
                    micro_in_step = 0
        if micro_in_step:
            self._step()
            steps += 1
        self.rounds += 1
        self.optimizer_steps += steps
        duration = time.perf_counter() - started
        mean_loss = loss_sum / max(loss_tokens, 1)
        logger.info(
            "training round %d: loss %.4f, %d steps, %.0f tokens/s",
            self.rounds,
            mean_loss,
            steps,
            tokens / max(duration, 1e-9),
        )
        return TrainResult(
            loss=mean_loss if math.isfinite(mean_loss) else float("nan"),
            optimizer_steps=steps,
            tokens=tokens,
            duration_s=duration,
        )

    def _step(self) -> None:
        torch.nn.utils.clip_grad_norm_(
            [p for p in self.model.parameters() if p.requires_grad], self.cfg.max_grad_norm
        )
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def save(self, folder: Path) -> None:
        """Write the adapter (peft format, loadable by vLLM) and the trainer state."""
        self.model.save_pretrained(str(folder))
        state_dir = folder / TRAINER_STATE
        state_dir.mkdir(exist_ok=True)
        torch.save(self.optimizer.state_dict(), state_dir / "optimizer.pt")
        (state_dir / "state.json").write_text(
            json.dumps({"rounds": self.rounds, "optimizer_steps": self.optimizer_steps})
        )

    def _load_state(self, state_dir: Path) -> None:
        optimizer_path = state_dir / "optimizer.pt"
        if not optimizer_path.exists():
            logger.warning("no optimizer state in %s: AdamW starts fresh", state_dir)
            return
        self.optimizer.load_state_dict(torch.load(optimizer_path, map_location=self.device))
        state = json.loads((state_dir / "state.json").read_text())
        self.rounds = int(state["rounds"])
        self.optimizer_steps = int(state["optimizer_steps"])

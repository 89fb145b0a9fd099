"""LoRA supervised fine-tuning on kept samples (RAFT's step 5).

Token-faithful: a sample that carries the engine's token ids (``Sample.token_faithful``)
is trained on exactly those ids: the prompt as the engine saw it and the response as it
was sampled, stop token included. Only a sample from a black-box generator is tokenized
again from its text (``TrainResult.retokenized`` counts them). A sample longer than
``training.max_length`` is dropped whole with a reason, never cut.

The loss (``training.loss_type``) is on the response tokens only: prompt tokens are masked
out (LMFlow's RAFT trains on the prompt too).

- ``sft``: next-token cross-entropy, RAFT's plain supervised step.
- ``clipped_is``: RAFT++ (Xiong et al. 2025, "A Minimalist Approach to LLM Reasoning: from
  Rejection Sampling to Reinforce", arXiv:2504.11343): each response token's loss is
  weighted by the importance ratio r = pi_theta(y_t) / pi_sample(y_t) of the current policy
  over the one that sampled it, clipped as in PPO with advantage 1:
  ``-min(r, clip(r, 1 - eps, 1 + eps))`` per token, averaged over response tokens. Tokens
  without a sampling log-prob (a black-box generator) get r = 1, i.e. plain SFT.

One adapter is trained on across every streaming batch, and the AdamW state is saved next
to it so a restart continues, not restarts.
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
from raft_stream.prompting import prompt_token_ids
from raft_stream.reasons import TOO_LONG_TO_TRAIN, UNTRAINABLE
from raft_stream.training.store import TRAINER_STATE
from raft_stream.types import AdapterVersion, Sample

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


@dataclass(frozen=True)
class TrainResult:
    """What one training round did."""

    loss: float
    """Mean negative log-likelihood of the response tokens trained on (nats per token),
    whatever ``training.loss_type`` optimised; NaN when nothing was trained."""
    optimizer_steps: int
    tokens: int
    duration_s: float
    samples: int = 0
    """Samples trained on."""
    retokenized: int = 0
    """Of those, samples without the engine's token ids, tokenized again from text."""
    dropped: tuple[tuple[Sample, str, str], ...] = ()
    """(sample, reason, detail) of each sample not trained on; reason is
    ``too_long_to_train`` or ``untrainable`` (raft_stream.reasons)."""
    clip_fraction: float = 0.0
    """``clipped_is``: share of response tokens whose importance ratio was clipped."""

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


class UntrainableSampleError(TrainingError):
    """A sample the trainer cannot learn from as it is; ``reason`` is a dead-letter code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass(frozen=True)
class TrainingExample:
    """One sample as the model is trained on it (all lists of one length).

    ``labels`` hold the response ids and IGNORE_INDEX on the prompt; ``old_logprobs`` the
    sampling log-prob of each response token (0.0 elsewhere) when ``has_old`` is set.
    """

    input_ids: list[int]
    labels: list[int]
    old_logprobs: list[float]
    has_old: bool
    retokenized: bool


def training_example(
    tokenizer: PreTrainedTokenizerBase, sample: Sample, max_length: int, vocab_size: int
) -> TrainingExample:
    """The ids, labels and sampling log-probs to train on for one sample.

    A ``token_faithful`` sample gives its own ids, untouched. Otherwise the prompt text is
    tokenized as the generator would (``prompt_token_ids``: exactly one BOS) and the
    response text after it, with EOS only when the model ended the response itself.
    Raises UntrainableSampleError: ``too_long_to_train`` when prompt and response exceed
    ``max_length`` tokens (nothing is cut), ``untrainable`` when there is no response
    token or an id is outside ``0..vocab_size - 1``.
    """
    if sample.token_faithful:
        prompt_ids = list(sample.prompt_token_ids)
        response_ids = list(sample.response_token_ids)
        logprobs = sample.response_logprobs
    else:
        prompt_ids = list(prompt_token_ids(tokenizer, sample.prompt_text))
        response_ids = tokenizer(sample.response, add_special_tokens=False).input_ids
        if sample.finish_reason == "stop" and tokenizer.eos_token_id is not None:
            response_ids = [*response_ids, tokenizer.eos_token_id]
        logprobs = None
    if not response_ids:
        raise UntrainableSampleError(UNTRAINABLE, "the sample has no response tokens")
    length = len(prompt_ids) + len(response_ids)
    if length > max_length:
        raise UntrainableSampleError(
            TOO_LONG_TO_TRAIN,
            f"{len(prompt_ids)} prompt + {len(response_ids)} response tokens > "
            f"training.max_length ({max_length}); raise it (unset, it follows the model's "
            "context) or lower generation.sampling.max_new_tokens",
        )
    outside = next((t for t in (*prompt_ids, *response_ids) if not 0 <= t < vocab_size), None)
    if outside is not None:
        raise UntrainableSampleError(
            UNTRAINABLE, f"token id {outside} is outside the model's vocabulary ({vocab_size})"
        )
    return TrainingExample(
        input_ids=prompt_ids + response_ids,
        labels=[IGNORE_INDEX] * len(prompt_ids) + response_ids,
        old_logprobs=[0.0] * len(prompt_ids) + list(logprobs or [0.0] * len(response_ids)),
        has_old=logprobs is not None,
        retokenized=not sample.token_faithful,
    )


def model_context(config: Any, tokenizer: PreTrainedTokenizerBase) -> int:
    """The model's context length in tokens: its config's ``max_position_embeddings`` (as
    vLLM reads it), else the tokenizer's ``model_max_length``."""
    return int(getattr(config, "max_position_embeddings", None) or tokenizer.model_max_length)


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
        context = model_context(base.config, self.tokenizer)
        self.max_length = cfg.max_length or context
        """Longest sample trained on, in tokens: ``training.max_length``, or the context."""
        if self.max_length < context:
            logger.warning(
                "training.max_length (%d) is below the model's context (%d): longer samples "
                "are dropped (too_long_to_train), never cut",
                self.max_length,
                context,
            )
        embeddings: Any = base.get_input_embeddings()
        self.vocab_size = int(embeddings.num_embeddings)
        self.optimizer = torch.optim.AdamW(
            [p for p in self.model.parameters() if p.requires_grad],
            lr=cfg.learning_rate,
            weight_decay=cfg.weight_decay,
        )
        self.rounds = 0
        self.optimizer_steps = 0
        if resume_from is not None:
            self._load_state(resume_from.path / TRAINER_STATE)

    def _collate(self, examples: Sequence[TrainingExample]) -> dict[str, torch.Tensor]:
        width = max(len(e.input_ids) for e in examples)
        shape = (len(examples), width)
        input_ids = torch.full(shape, self.tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros(shape, dtype=torch.long)
        old_logprobs = torch.zeros(shape, dtype=torch.float32)
        has_old = torch.zeros(shape, dtype=torch.bool)
        for row, example in enumerate(examples):
            n = len(example.input_ids)
            input_ids[row, :n] = torch.tensor(example.input_ids)
            labels[row, :n] = torch.tensor(example.labels)
            attention[row, :n] = 1
            old_logprobs[row, :n] = torch.tensor(example.old_logprobs)
            has_old[row, :n] = example.has_old
        return {
            "input_ids": input_ids.to(self.device),
            "labels": labels.to(self.device),
            "attention_mask": attention.to(self.device),
            "old_logprobs": old_logprobs.to(self.device),
            "has_old": has_old.to(self.device),
        }

    def _target_logprobs(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """log pi_theta(y_t) of each next token of a collated batch (0 where masked) and
        the mask of the response tokens, both (batch, length - 1)."""
        logits = self.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits[:, :-1]
        targets = batch["labels"][:, 1:]
        logprobs = -torch.nn.functional.cross_entropy(
            logits.float().transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none"
        )
        return logprobs, targets != IGNORE_INDEX

    def _losses(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(loss to optimise, mean NLL of the response tokens, tokens clipped) of a batch."""
        logprobs, mask = self._target_logprobs(batch)
        n_targets = mask.sum().clamp(min=1)
        nll = -logprobs.sum() / n_targets
        if self.cfg.loss_type == "sft":
            return nll, nll.detach(), 0
        eps = self.cfg.clip_epsilon
        has_old = batch["has_old"][:, 1:] & mask
        old = torch.where(has_old, batch["old_logprobs"][:, 1:], logprobs.detach())
        # With advantage +1, PPO's min(r, clip(r, 1 - eps, 1 + eps)) is min(r, 1 + eps):
        # computed in log space, so a forged sampling log-prob of -1e308 cannot overflow
        # exp() into an infinite ratio (and a NaN gradient); no gradient past 1 + eps.
        log_ratio = logprobs - old
        objective = torch.exp(torch.clamp(log_ratio, max=math.log1p(eps)))
        clipped = int((log_ratio > math.log1p(eps))[has_old].sum())
        return -(objective * mask).sum() / n_targets, nll.detach(), clipped

    def train(self, samples: Sequence[Sample]) -> TrainResult:
        """Run ``cfg.epochs`` passes over the samples it can learn from; the others are
        returned in ``TrainResult.dropped`` with their reason. Nothing to learn from gives
        a result with no optimizer step (and NaN loss): there is no new adapter to store."""
        if not samples:
            raise TrainingError("cannot train on an empty batch")
        cfg = self.cfg
        examples: list[TrainingExample] = []
        dropped: list[tuple[Sample, str, str]] = []
        for sample in samples:
            try:
                examples.append(
                    training_example(self.tokenizer, sample, self.max_length, self.vocab_size)
                )
            except UntrainableSampleError as err:
                dropped.append((sample, err.reason, str(err)))
        if dropped:
            logger.warning(
                "%d of %d samples not trained on: %s", len(dropped), len(samples), dropped[0][2]
            )
        if not examples:
            return TrainResult(float("nan"), 0, 0, 0.0, dropped=tuple(dropped))
        order_rng = random.Random(cfg.seed * 1_000_003 + self.rounds)
        self.model.train()
        started = time.perf_counter()
        loss_sum, loss_tokens, tokens, steps, clipped = 0.0, 0, 0, 0, 0
        micro_in_step = 0
        self.optimizer.zero_grad(set_to_none=True)
        for _ in range(cfg.epochs):
            order = list(range(len(examples)))
            order_rng.shuffle(order)
            for start in range(0, len(order), cfg.batch_size):
                batch = self._collate([examples[i] for i in order[start : start + cfg.batch_size]])
                n_targets = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
                loss, nll, clipped_now = self._losses(batch)
                if not torch.isfinite(loss):
                    raise NonFiniteLossError(
                        f"loss became {loss.item()}; lower training.learning_rate"
                    )
                (loss / cfg.grad_accumulation).backward()
                loss_sum += nll.item() * n_targets
                loss_tokens += n_targets
                clipped += clipped_now
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
            samples=len(examples),
            retokenized=sum(e.retokenized for e in examples),
            dropped=tuple(dropped),
            clip_fraction=clipped / max(loss_tokens, 1),
        )

    @torch.no_grad()
    def logprobs(self, samples: Sequence[Sample]) -> list[list[float]]:
        """Log-probability of each response token under the current policy (adapter
        included; natural log, raw distribution), one list per sample: what the engine
        reports as the sampling log-probs when it serves this very adapter."""
        self.model.eval()
        # Any length the model reads: these are scored, not trained on.
        examples = [
            training_example(self.tokenizer, sample, 2**31, self.vocab_size) for sample in samples
        ]
        out = []
        for start in range(0, len(examples), self.cfg.batch_size):
            logprobs, masks = self._target_logprobs(
                self._collate(examples[start : start + self.cfg.batch_size])
            )
            out += [row[mask].tolist() for row, mask in zip(logprobs, masks, strict=True)]
        return out

    def _step(self) -> None:
        norm = torch.nn.utils.clip_grad_norm_(
            [p for p in self.model.parameters() if p.requires_grad], self.cfg.max_grad_norm
        )
        if not torch.isfinite(norm):  # a finite loss can still have a NaN gradient
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(
                f"the gradient norm became {norm.item()}; lower training.learning_rate"
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

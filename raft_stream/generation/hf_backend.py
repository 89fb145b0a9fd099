"""The fallback backend: ``transformers`` ``generate()`` with peft LoRA adapters.

Slower than vLLM but needs nothing beyond transformers and peft. Prompts are left-padded
and sampled ``gen_cfg.batch_size`` at a time; adapters are loaded into one ``PeftModel``
once per version and switched with ``set_adapter``.

Example (the tiny model):
    >>> gen = TransformersGenerator(str(ensure_tiny_model()), ModelConfig(), GenerationConfig())
    >>> first = gen.generate(["the movie was"], SamplingParams(n=2, seed=0))[0][0]
    >>> first.text, first.num_tokens, first.finish_reason
    (' truly ugly and the lead actor was impressive.', 10, 'stop')
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from peft import PeftModel
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from raft_stream.config import GenerationConfig, ModelConfig
from raft_stream.errors import AdapterError
from raft_stream.generation.base import MAX_LORAS, EnginePrompt, GenerationStats, SamplingParams
from raft_stream.types import AdapterVersion, Completion

__all__ = ["TransformersGenerator"]


class TransformersGenerator:
    """Samples with ``model.generate``; keeps the ``MAX_LORAS`` most recently used adapters."""

    def __init__(
        self,
        model_path: str,
        model_cfg: ModelConfig,
        gen_cfg: GenerationConfig,
        device: str | None = None,
    ) -> None:
        device_ = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        tokenizer = AutoTokenizer.from_pretrained(
            model_path, trust_remote_code=model_cfg.trust_remote_code
        )
        dtype = torch.bfloat16 if device_.type == "cuda" else torch.float32
        model = AutoModelForCausalLM.from_pretrained(
            model_path,
            dtype=dtype,
            device_map=device_,
            trust_remote_code=model_cfg.trust_remote_code,
        )
        self._adopt(model, tokenizer, gen_cfg.batch_size)

    @classmethod
    def wrapping(
        cls,
        model: Any,
        tokenizer: PreTrainedTokenizerBase,
        batch_size: int = 8,
        with_logprobs: bool = True,
    ) -> TransformersGenerator:
        """A generator over a model already in memory (e.g. the trainer's peft model,
        sampling through its active adapter); ``adapter`` must then be None.
        ``with_logprobs`` False skips the sampling log-probs (and the per-step logits that
        computing them keeps in memory)."""
        generator = cls.__new__(cls)
        generator._adopt(model, copy.deepcopy(tokenizer), batch_size)
        generator.with_logprobs = with_logprobs
        return generator

    def _adopt(self, model: Any, tokenizer: PreTrainedTokenizerBase, batch_size: int) -> None:
        self.device = next(model.parameters()).device
        self.batch_size = batch_size
        self.with_logprobs = True
        self.tokenizer = tokenizer
        # Left padding keeps every prompt's last token at the end, where generation starts.
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model: PreTrainedModel = model.eval()
        # Wraps ``model`` once an adapter is loaded. peft injects the LoRA layers into
        # ``model`` in place, so generation always calls ``model`` and this only manages them.
        self.peft_model: PeftModel | None = None
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        self.eos_ids: frozenset[int] = frozenset(eos if isinstance(eos, list) else [eos])
        self.last_stats: GenerationStats | None = None
        self._load_ids = itertools.count()  # peft names must be unique while loaded
        # (version, folder, sha256) -> peft adapter name, least recently used first. A version
        # number seen again with another folder or checksum (a new store) is another adapter.
        self._adapters: OrderedDict[tuple[int, str, str], str] = OrderedDict()

    def generate(
        self,
        prompts: Sequence[str | EnginePrompt],
        params: SamplingParams,
        adapter: AdapterVersion | None = None,
    ) -> list[list[Completion]]:
        """``params.n`` completions per prompt: from its token ids when given (an
        EnginePrompt), else from its text (template already applied). Each completion
        carries the prompt ids, the sampled ids (eos included, no padding) and their
        log-probs under the model's raw distribution."""
        started = time.perf_counter()
        load_s = self._activate(adapter)
        inputs = [EnginePrompt.of(prompt) for prompt in prompts]
        results = self._sample(inputs, params, adapter)
        self.last_stats = GenerationStats.of(results, time.perf_counter() - started, load_s)
        return results

    def close(self) -> None:
        """Nothing to stop: the model is freed with this object."""

    def _completion(
        self,
        prompt_ids: tuple[int, ...],
        ids: list[int],
        logprobs: list[float] | None,
        generated_at: float,
    ) -> Completion:
        stopped = bool(ids) and ids[-1] in self.eos_ids
        text = str(self.tokenizer.decode(ids, skip_special_tokens=True))
        finite = logprobs is not None and all(math.isfinite(lp) for lp in logprobs)
        return Completion(
            text,
            len(ids),
            "stop" if stopped else "length",
            token_ids=tuple(ids),
            prompt_token_ids=prompt_ids,
            logprobs=tuple(logprobs) if finite and logprobs is not None else None,
            generated_at=generated_at,
        )

    @staticmethod
    def _sampled_logprobs(
        logits: tuple[torch.Tensor, ...] | None, new_tokens: torch.Tensor
    ) -> torch.Tensor | None:
        """Log-prob of each sampled token under the raw logits of its step (before
        temperature and top-p, as vLLM reports them), one step at a time; None without
        logits."""
        if not logits:
            return None
        steps = [
            step.float().log_softmax(-1).gather(-1, new_tokens[:, i : i + 1]).squeeze(-1)
            for i, step in enumerate(logits)
        ]
        return torch.stack(steps, dim=1)

    def _prompt_ids(self, prompt: EnginePrompt) -> tuple[int, ...]:
        return prompt.token_ids or tuple(self.tokenizer(prompt.text).input_ids)

    def _sample(
        self, prompts: list[EnginePrompt], params: SamplingParams, adapter: AdapterVersion | None
    ) -> list[list[Completion]]:
        sampling = params.temperature > 0
        # Greedy decoding gives n identical answers: compute one and repeat it.
        per_prompt = params.n if sampling else 1
        options: dict[str, object] = {
            "do_sample": sampling,
            "max_new_tokens": params.max_new_tokens,
        }
        if sampling:
            # top_k=0: no top-k cut, as in vLLM (transformers defaults to 50).
            options |= {"temperature": params.temperature, "top_p": params.top_p, "top_k": 0}
        out: list[list[Completion]] = []
        with _seeded(params.seed), self._adapter_scope(adapter), torch.inference_mode():
            for start in range(0, len(prompts), self.batch_size):
                prompt_ids = [self._prompt_ids(p) for p in prompts[start : start + self.batch_size]]
                batch = self.tokenizer.pad(
                    {"input_ids": [list(ids) for ids in prompt_ids]}, return_tensors="pt"
                ).to(self.device)
                # generate() comes from GenerationMixin, which the causal-LM classes add to
                # PreTrainedModel; mypy only sees the base class.
                generated = self.model.generate(  # type: ignore[operator]
                    **batch,
                    num_return_sequences=per_prompt,
                    pad_token_id=self.tokenizer.pad_token_id,
                    eos_token_id=sorted(self.eos_ids),
                    return_dict_in_generate=True,
                    output_logits=self.with_logprobs,
                    **options,
                )
                generated_at = time.time()  # the whole sub-batch finishes together
                new_tokens = generated.sequences[:, batch["input_ids"].shape[1] :]
                logprobs = self._sampled_logprobs(generated.logits, new_tokens)
                for row in range(new_tokens.shape[0]):
                    ids = self._until_eos(new_tokens[row].tolist())
                    completion = self._completion(
                        prompt_ids[row // per_prompt],
                        ids,
                        None if logprobs is None else logprobs[row, : len(ids)].tolist(),
                        generated_at,
                    )
                    if row % per_prompt == 0:
                        out.append([])
                    out[-1].extend([completion] * (1 if sampling else params.n))
        return out

    def _until_eos(self, row: list[int]) -> list[int]:
        """Cut a generated row after its first eos; what follows is padding."""
        for i, token in enumerate(row):
            if token in self.eos_ids:
                return row[: i + 1]
        return row

    def _activate(self, adapter: AdapterVersion | None) -> float:
        """Load ``adapter`` on first sight and evict the least recently used beyond
        ``MAX_LORAS``. Returns the seconds spent loading."""
        if adapter is None:
            return 0.0
        key = _identity(adapter)
        if key in self._adapters:
            self._adapters.move_to_end(key)
            return 0.0
        started = time.perf_counter()
        name = f"{adapter.name}-{next(self._load_ids)}"
        try:
            if self.peft_model is None:
                self.peft_model = PeftModel.from_pretrained(
                    self.model, str(adapter.path), adapter_name=name
                ).eval()
            else:
                self.peft_model.load_adapter(str(adapter.path), adapter_name=name)
        except (OSError, ValueError) as exc:
            raise AdapterError(
                f"peft could not load adapter {adapter.name} from {adapter.path}: {exc}"
            ) from exc
        self._adapters[key] = name
        while len(self._adapters) > MAX_LORAS:
            _, oldest = self._adapters.popitem(last=False)
            self.peft_model.delete_adapter(oldest)
        return time.perf_counter() - started

    @contextlib.contextmanager
    def _adapter_scope(self, adapter: AdapterVersion | None) -> Iterator[None]:
        """Route generation through ``adapter``, or through the bare base model for None."""
        if self.peft_model is None:
            yield
        elif adapter is None:
            with self.peft_model.disable_adapter():
                yield
        else:
            self.peft_model.set_adapter(self._adapters[_identity(adapter)])
            yield


def _identity(adapter: AdapterVersion) -> tuple[int, str, str]:
    return (adapter.version, str(adapter.path), adapter.sha256)


@contextlib.contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    """Seed torch for one call without touching the process's RNG (a trainer may share it)."""
    if seed is None:
        yield
        return
    devices = list(range(torch.cuda.device_count()))
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield

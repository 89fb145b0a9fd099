"""Turns a user's prompt into the exact text and token ids the model sees.

Generation and training must agree on them (training masks exactly these tokens), so both
go through one formatter. The engine is given the token ids, never the text, so the ids
the trainer receives are the ids the model was conditioned on.

Exactly one BOS: a tokenizer that adds BOS (Llama's) and a chat template that writes it
too (Llama 3's ``<|begin_of_text|>``) would give two; ``prompt_token_ids`` keeps one.
"""

from __future__ import annotations

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from raft_stream.config import ModelConfig
from raft_stream.types import PromptRecord

__all__ = ["PromptFormatter", "prompt_token_ids"]


def prompt_token_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> tuple[int, ...]:
    """``text`` tokenized as a prompt: the tokenizer's special tokens added, and a BOS
    that the text already carried (a chat template's) not doubled.

    Example (a tokenizer that adds BOS id 0):
        >>> prompt_token_ids(tokenizer, "<|bos|>the movie")  # doctest: +SKIP
        (0, 309, 317)
    """
    ids = tuple(tokenizer(text).input_ids)
    bos = tokenizer.bos_token_id
    if bos is not None and len(ids) >= 2 and ids[0] == ids[1] == bos:
        return ids[1:]
    return ids


class PromptFormatter:
    """Applies the tokenizer's chat template when the model has one and the config asks."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, cfg: ModelConfig) -> None:
        self.tokenizer = tokenizer
        self.use_chat = cfg.use_chat_template and bool(getattr(tokenizer, "chat_template", None))
        self.system_prompt = cfg.system_prompt

    @classmethod
    def from_model(cls, model_path: str, cfg: ModelConfig) -> PromptFormatter:
        tokenizer = AutoTokenizer.from_pretrained(
            model_path, trust_remote_code=cfg.trust_remote_code
        )
        return cls(tokenizer, cfg)

    def text(self, prompt: str) -> str:
        if not self.use_chat:
            return prompt
        messages = [{"role": "user", "content": prompt}]
        if self.system_prompt is not None:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        rendered = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        return str(rendered)

    def format(self, record: PromptRecord) -> PromptRecord:
        """``record`` with ``text`` (templated) and ``token_ids`` (what the engine gets)."""
        text = self.text(record.prompt)
        return PromptRecord(
            id=record.id,
            prompt=record.prompt,
            text=text,
            metadata=record.metadata,
            sampling=record.sampling,
            token_ids=prompt_token_ids(self.tokenizer, text),
        )

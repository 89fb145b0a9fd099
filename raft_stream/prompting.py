"""Turns a user's prompt into the exact text the model sees.

Generation and training must agree on it (training masks exactly these tokens), so both go
through one formatter.
"""

from __future__ import annotations

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from raft_stream.config import ModelConfig
from raft_stream.types import PromptRecord


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
        return PromptRecord(
            id=record.id,
            prompt=record.prompt,
            text=self.text(record.prompt),
            metadata=record.metadata,
            sampling=record.sampling,
        )

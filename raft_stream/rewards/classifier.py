"""The classifier kind: a Hugging Face sequence classifier; the reward is P(label | text).

A model with one output (a reward model trained on preferences) has no probabilities: its
raw score is the reward and ``label`` is ignored.

Example (any local folder or cached hub name)::

    reward = ClassifierReward("distilbert-base-uncased-finetuned-sst-2-english", label="POSITIVE")
    reward([""], ["a gem of a film"])  # [0.9998...]
"""

from __future__ import annotations

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PretrainedConfig

from raft_stream.errors import ConfigError
from raft_stream.rewards.base import TextReward


class ClassifierReward(TextReward):
    """Probability of ``label`` (a name from the model's id2label/label2id, or an index).

    Texts are scored ``batch_size`` at a time, truncated to what the model accepts.
    ``device`` None picks CUDA when available.
    """

    def __init__(
        self,
        model: str,
        *,
        label: str | int = 1,
        score_prompt: bool = False,
        batch_size: int = 32,
        device: str | None = None,
    ) -> None:
        super().__init__(score_prompt=score_prompt)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model)
            self.model = AutoModelForSequenceClassification.from_pretrained(model)
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"reward.model {model!r} could not be loaded as a sequence classifier: {exc}"
            ) from exc
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model.to(self.device).eval()
        self.batch_size = batch_size
        self._set_padding(model)
        config = self.model.config
        self.label_index = None if config.num_labels == 1 else resolve_label(config, label, model)
        # model_max_length is a huge sentinel when the tokenizer does not know its model.
        self.max_length = min(
            self.tokenizer.model_max_length,
            getattr(config, "max_position_embeddings", None) or self.tokenizer.model_max_length,
        )

    def _set_padding(self, model: str) -> None:
        # Decoder-only classifiers (Llama, GPT-2) often ship without a pad token; batching
        # needs one, and the model needs its id to find each text's last real token.
        if self.tokenizer.pad_token is None:
            if self.tokenizer.eos_token is None:
                raise ConfigError(
                    f"reward.model {model!r}: its tokenizer has neither a pad nor an eos "
                    "token; add a pad token to the tokenizer"
                )
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id

    @torch.inference_mode()
    def score_texts(self, texts: list[str]) -> list[float]:
        rewards: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(
                texts[start : start + self.batch_size],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)
            logits = self.model(**batch).logits.float()
            if self.label_index is None:
                rewards.extend(logits[:, 0].tolist())
            else:
                rewards.extend(logits.softmax(dim=-1)[:, self.label_index].tolist())
        return rewards


def resolve_label(config: PretrainedConfig, label: str | int, model: str = "the model") -> int:
    """The output index of ``label``: an index, a label name (any case) or a digit string."""
    num_labels = int(config.num_labels or 0)
    names = {int(index): str(name) for index, name in (config.id2label or {}).items()}
    names_shown = ", ".join(f"{index}: {name}" for index, name in sorted(names.items()))
    if isinstance(label, str):
        by_name = {name.casefold(): index for index, name in names.items()}
        by_name.update({str(n).casefold(): int(i) for n, i in (config.label2id or {}).items()})
        if label.casefold() in by_name:
            return by_name[label.casefold()]
        if not label.isdigit():
            raise ConfigError(
                f"reward.label {label!r} is not a label of {model}; "
                f"its labels are {{{names_shown}}}: use one of those names or indexes"
            )
        label = int(label)
    if not 0 <= label < num_labels:
        raise ConfigError(
            f"reward.label {label} is out of range for {model}, which has {num_labels} labels "
            f"{{{names_shown}}}; use 0..{num_labels - 1}"
        )
    return label

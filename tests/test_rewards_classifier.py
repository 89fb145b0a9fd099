"""The classifier kind on tiny classifiers built offline in a temporary folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from raft_stream.config import RewardConfig
from raft_stream.errors import ConfigError
from raft_stream.rewards import build_reward
from raft_stream.rewards.classifier import ClassifierReward

WORDS = ["the", "a", "film", "movie", "was", "is", "great", "awful", "boring", "fun"]
WORDS += ["long", "short", "plot", "acting", "i", "it"]
LABELS = {0: "negative", 1: "neutral", 2: "positive"}
MAX_POSITIONS = 16
TEXTS = ["the film was great", "awful", "i it boring plot acting was long", "fun fun", "zzz"]


def word_level_tokenizer(specials: list[str]) -> Tokenizer:
    vocab = {token: i for i, token in enumerate([*specials, *WORDS])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return tokenizer


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised 3-label BERT classifier with a word-level tokenizer."""
    folder = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = word_level_tokenizer(["[PAD]", "[UNK]", "[CLS]", "[SEP]"])
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
    ).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=MAX_POSITIONS,
        id2label=LABELS,
        label2id={name: i for i, name in LABELS.items()},
        initializer_range=0.5,  # large weights: probabilities far apart, so mistakes show
    )
    BertForSequenceClassification(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A decoder-only 2-label classifier whose tokenizer has no pad token (eos only)."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = word_level_tokenizer(["[UNK]", "</s>"])
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="[UNK]", eos_token="</s>"
    ).save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=MAX_POSITIONS,
        initializer_range=0.5,
    )
    config.num_labels = 2
    LlamaForSequenceClassification(config).save_pretrained(folder)
    return folder


@torch.inference_mode()
def probabilities_one_by_one(
    folder: Path, texts: list[str], model_cls: type[PreTrainedModel]
) -> torch.Tensor:
    """Each text alone (no padding), tokenized by the raw tokenizer file, truncated by hand."""
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    model = model_cls.from_pretrained(folder).eval()
    rows = []
    for text in texts:
        ids = tokenizer.encode(text).ids
        if len(ids) > MAX_POSITIONS:  # keep the first tokens and the closing [SEP]
            ids = [*ids[: MAX_POSITIONS - 1], ids[-1]]
        logits = model(input_ids=torch.tensor([ids])).logits
        rows.append(logits.float().softmax(-1)[0])
    return torch.stack(rows)


def test_classifier_reward_is_the_softmax_probability_of_the_label(bert_dir: Path) -> None:
    expected = probabilities_one_by_one(bert_dir, TEXTS, BertForSequenceClassification)
    rewards = ClassifierReward(str(bert_dir), label=2, batch_size=2)(["p"] * len(TEXTS), TEXTS)
    assert rewards == pytest.approx(expected[:, 2].tolist(), abs=1e-5)
    assert max(rewards) - min(rewards) > 0.05  # the check above is not trivially uniform


def test_classifier_resolves_a_label_name_in_any_case(bert_dir: Path) -> None:
    expected = probabilities_one_by_one(bert_dir, TEXTS, BertForSequenceClassification)
    for name in ("negative", "NEGATIVE"):
        reward = ClassifierReward(str(bert_dir), label=name)
        assert reward.label_index == 0
        assert reward(["p"] * len(TEXTS), TEXTS) == pytest.approx(expected[:, 0].tolist(), abs=1e-5)


def test_classifier_accepts_a_digit_string_label(bert_dir: Path) -> None:
    assert ClassifierReward(str(bert_dir), label="1").label_index == 1


def test_classifier_truncates_texts_longer_than_the_model_accepts(bert_dir: Path) -> None:
    long_text = " ".join(WORDS * 5)  # 80 words; the model has 16 positions
    expected = probabilities_one_by_one(bert_dir, [long_text], BertForSequenceClassification)
    reward = ClassifierReward(str(bert_dir), label=2)([""], [long_text])
    assert reward == pytest.approx([expected[0, 2].item()], abs=1e-5)


def test_classifier_pads_batches_for_a_tokenizer_without_pad_token(llama_dir: Path) -> None:
    texts = ["the film was great fun", "awful", "long boring plot"]
    expected = probabilities_one_by_one(llama_dir, texts, LlamaForSequenceClassification)
    rewards = ClassifierReward(str(llama_dir), label=1)(["p"] * 3, texts)
    assert rewards == pytest.approx(expected[:, 1].tolist(), abs=1e-5)


def test_raises_config_error_when_label_name_unknown(bert_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"'happy' is not a label .*0: negative, 1: neutral"):
        ClassifierReward(str(bert_dir), label="happy")


def test_raises_config_error_when_label_index_out_of_range(bert_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"reward.label 3 is out of range .* use 0\.\.2"):
        ClassifierReward(str(bert_dir), label=3)


def test_raises_config_error_when_model_missing(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"reward.model '.*no-model' could not be loaded"):
        ClassifierReward(str(tmp_path / "no-model"))


def test_build_reward_builds_the_configured_classifier(bert_dir: Path) -> None:
    reward = build_reward(RewardConfig(kind="classifier", model=str(bert_dir), label="positive"))
    assert isinstance(reward, ClassifierReward)
    assert reward.label_index == 2

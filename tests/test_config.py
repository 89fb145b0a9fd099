"""Typed configuration: YAML, environment and overrides, with errors naming field and fix."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from raft_stream.cli import field_docs
from raft_stream.config import KafkaConfig, RaftConfig, load_config
from raft_stream.errors import ConfigError
from raft_stream.presets import MODEL_PRESETS
from raft_stream.stream.kafka import kafka_client_kwargs

HUB_MODEL = {"model.name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct"}
"""A model named by the hub: no preset, so the fields' own defaults."""


def test_defaults_validate() -> None:
    config = load_config(overrides=HUB_MODEL)
    assert config.generation.sampling.k == 8
    assert config.ranking.mode == "local"


def _setting(config: RaftConfig, dotted: str) -> object:
    value: object = config
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


@pytest.mark.parametrize("name", sorted(MODEL_PRESETS))
def test_a_built_in_model_brings_every_setting_of_its_preset(name: str) -> None:
    config = load_config(overrides={"model.name_or_path": name})
    for dotted, value in MODEL_PRESETS[name].settings.items():
        assert _setting(config, dotted) == value, dotted


def test_the_tiny_model_brings_its_learning_rate_and_leaves_the_context_to_the_model() -> None:
    config = load_config(overrides={"model.name_or_path": "tiny"})
    assert config.training.learning_rate == 3e-3
    assert config.model.max_model_len is None  # the model's own context, not a preset's


def test_the_default_model_is_the_demo_and_brings_its_preset() -> None:
    assert (
        load_config().training.learning_rate
        == MODEL_PRESETS["demo"].settings["training.learning_rate"]
    )


def test_a_yaml_file_the_environment_and_overrides_all_beat_the_preset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  name_or_path: tiny\ntraining:\n  epochs: 3\n")
    monkeypatch.setenv("RAFT_STREAM_TRAINING__LEARNING_RATE", "0.01")
    config = load_config(path, {"training.batch_size": 4})
    assert config.training.epochs == 3  # the file
    assert config.training.learning_rate == 0.01  # the environment
    assert config.training.batch_size == 4  # an override
    assert config.training.lora_r == 8  # the preset, where nothing else sets it


def test_a_setting_that_fits_only_with_the_preset_loads() -> None:
    # generation.max_lora_rank 8 holds the tiny preset's LoRA rank 8, not the default 16.
    config = load_config(overrides={"model.name_or_path": "tiny", "generation.max_lora_rank": 8})
    assert config.training.lora_r == 8


def test_the_model_named_by_the_environment_brings_its_preset(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RAFT_STREAM_MODEL__NAME_OR_PATH", "tiny")
    assert load_config().training.learning_rate == 3e-3


@pytest.mark.parametrize("name_or_path", ["/models/tiny", "HuggingFaceTB/SmolLM2-135M-Instruct"])
def test_a_path_or_hub_name_gets_no_preset(name_or_path: str) -> None:
    config = load_config(overrides={"model.name_or_path": name_or_path})
    assert config.training.learning_rate == 2e-4
    assert config.generation.sampling.k == 8


def test_a_built_in_model_in_a_folder_gets_its_preset_when_named() -> None:
    config = load_config(overrides={"model.name_or_path": "/cache/tiny-model-v1"}, preset="tiny")
    assert config.model.name_or_path == "/cache/tiny-model-v1"
    assert config.training.learning_rate == 3e-3


def test_raises_error_for_a_preset_that_is_not_a_built_in_model() -> None:
    with pytest.raises(ConfigError, match=r"preset 'huge' is not a built-in model; use one of"):
        load_config(preset="huge")


def test_an_error_a_preset_setting_takes_part_in_names_the_preset() -> None:
    with pytest.raises(
        ConfigError,
        match=r"over the tiny model preset\):\n.*training\.lora_r \(16\) must be <= generation",
    ):
        load_config(overrides={"model.name_or_path": "tiny", "training.lora_r": 16})


def test_loading_a_preset_imports_no_model_code() -> None:
    # config imports presets at start-up: the builders must import torch only when called.
    code = (
        "import sys; from raft_stream.config import load_config; "
        "load_config(overrides={'model.name_or_path': 'tiny'}); "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_yaml_file_sets_nested_fields(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("generation:\n  sampling:\n    k: 4\nreward:\n  kind: sentiment\n")
    assert load_config(path).generation.sampling.k == 4


def test_environment_beats_the_file_and_overrides_beat_both(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("generation:\n  sampling:\n    k: 4\n    max_new_tokens: 10\n")
    monkeypatch.setenv("RAFT_STREAM_GENERATION__SAMPLING__K", "6")
    config = load_config(path)
    assert config.generation.sampling.k == 6
    assert config.generation.sampling.max_new_tokens == 10
    assert load_config(path, {"generation.sampling.k": 2}).generation.sampling.k == 2


def test_round_trips_through_dump_and_pickle() -> None:
    config = load_config(overrides={"ranking.mode": "global", "store.keep_last": 3})
    assert RaftConfig.model_validate(config.model_dump()) == config
    assert pickle.loads(pickle.dumps(config)) == config


def test_raises_error_naming_an_out_of_range_field() -> None:
    with pytest.raises(ConfigError, match=r"generation\.sampling\.k: Input should be greater"):
        load_config(overrides={"generation.sampling.k": 0})


def test_raises_error_naming_an_unknown_field() -> None:
    with pytest.raises(ConfigError, match=r"ranking\.mood: unknown field"):
        load_config(overrides={"ranking.mood": "local"})


def test_no_field_promises_what_nothing_implements() -> None:
    # daemon.max_pending_batches documented a backpressure no role had (issue 8): a
    # generator waits for each batch's acks before it polls again, so none are pending.
    with pytest.raises(ConfigError, match=r"daemon\.max_pending_batches: unknown field"):
        load_config(overrides={"daemon.max_pending_batches": 2})


def test_raises_error_with_the_fix_when_python_reward_has_no_function() -> None:
    with pytest.raises(ConfigError, match=r"reward\.function is required .* set it to"):
        load_config(overrides={"reward.kind": "python"})


def test_raises_error_when_lora_rank_exceeds_what_vllm_accepts() -> None:
    with pytest.raises(ConfigError, match=r"training\.lora_r \(32\) must be <= generation"):
        load_config(overrides={"training.lora_r": 32, "generation.max_lora_rank": 16})


def test_raises_error_with_the_next_accepted_rank_for_a_max_lora_rank_vllm_refuses() -> None:
    # Issue 9: 12 passed validation and the engine failed at every start.
    with pytest.raises(ConfigError, match=r"generation\.max_lora_rank.*not 12; set it to 16"):
        load_config(overrides={"training.lora_r": 12, "generation.max_lora_rank": 12})
    cfg = load_config(overrides={"training.lora_r": 12, "generation.max_lora_rank": 16})
    assert cfg.training.lora_r == 12  # any adapter rank up to max_lora_rank is served


def test_raises_error_for_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_raises_error_for_yaml_that_is_not_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(path)


def test_every_field_is_documented() -> None:
    undocumented = [name for name, _, doc in field_docs(RaftConfig) if not doc]
    assert undocumented == []


def test_the_liveness_window_is_derived_from_the_configured_work() -> None:
    # 16 prompts x K=8 x 48 tokens at 10 tokens/s is 614.4 s a poll; twice that.
    assert load_config(overrides=HUB_MODEL).liveness_window_s == pytest.approx(1228.8)
    small = load_config(overrides={"generation.sampling.k": 1, "kafka.poll_max_records": 1})
    # The scoring is longest then: three reward calls of 30 s, 1 s and 2 s of backoff.
    assert small.liveness_window_s == 186.0
    tiny = small.model_copy(update={"reward": small.reward.model_copy(update={"max_attempts": 1})})
    assert tiny.liveness_window_s == 60.0  # the floor
    slow_reward = load_config(overrides={"generation.sampling.k": 1, "reward.timeout_s": 300})
    # Three calls of 300 s, 1 s and 2 s of backoff between them; twice that.
    assert slow_reward.liveness_window_s == 1806.0
    fixed = load_config(overrides={"daemon.liveness_timeout_s": 90})
    assert fixed.liveness_window_s == 90.0


def test_raises_error_when_reward_min_is_above_reward_max() -> None:
    with pytest.raises(ConfigError, match=r"buffer\.reward_min \(1\.0\) must be <= buffer\.rew"):
        load_config(overrides={"buffer.reward_min": 1.0, "buffer.reward_max": -1.0})


def test_raises_error_when_a_reward_bound_is_not_finite() -> None:
    with pytest.raises(ConfigError, match=r"buffer\.reward_max: Input should be a finite number"):
        load_config(overrides={"buffer.reward_max": "inf"})


def test_buffer_max_staleness_defaults_to_4_versions_and_null_turns_it_off() -> None:
    assert load_config().buffer.max_staleness == 4
    assert load_config(overrides={"buffer.max_staleness": 0}).buffer.max_staleness == 0
    assert load_config(overrides={"buffer.max_staleness": None}).buffer.max_staleness is None


def test_raises_error_naming_a_negative_max_staleness() -> None:
    with pytest.raises(ConfigError, match=r"buffer\.max_staleness: Input should be greater"):
        load_config(overrides={"buffer.max_staleness": -1})


def test_the_sasl_password_comes_from_a_file_or_the_environment_never_both(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = tmp_path / "password"
    secret.write_text("from-the-secret\n")  # a Secret mount's trailing newline is dropped
    sasl = {"bootstrap_servers": "kafka:9093", "security_protocol": "SASL_SSL"}
    monkeypatch.delenv("RAFT_STREAM_SASL_PASSWORD", raising=False)
    from_file = KafkaConfig(**sasl, sasl_password_file=secret)
    assert kafka_client_kwargs(from_file)["sasl_plain_password"] == "from-the-secret"
    with pytest.raises(
        ConfigError,
        match=r"RAFT_STREAM_SASL_PASSWORD .* is not set; set it, or set kafka.sasl_password_file",
    ):
        kafka_client_kwargs(KafkaConfig(**sasl))
    monkeypatch.setenv("RAFT_STREAM_SASL_PASSWORD", "from-the-env")
    assert kafka_client_kwargs(KafkaConfig(**sasl))["sasl_plain_password"] == "from-the-env"
    with pytest.raises(
        ConfigError,
        match=r"kafka.sasl_password_file \(.*\) and the environment variable .* both set; set only",
    ):
        kafka_client_kwargs(from_file)
    monkeypatch.delenv("RAFT_STREAM_SASL_PASSWORD")
    with pytest.raises(
        ConfigError, match=r"kafka.sasl_password_file .* cannot be read: No such file"
    ):
        kafka_client_kwargs(KafkaConfig(**sasl, sasl_password_file=tmp_path / "missing"))

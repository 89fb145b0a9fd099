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
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from raft_stream.errors import AdapterError
from raft_stream.generation.base import serving_mode

__all__ = ["BaseWeights", "MergedWeightsWorker", "merge_base", "merged_weights", "write_weights"]

_MERGEABLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
log = logging.getLogger(__name__)

_FIX = "use generation.adapter_serving: lora"
_BASE_FILES = ["*.json", "*.safetensors"]

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_PEFT_PREFIX = "base_model.model."


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
        self._files = sorted(Path(model_dir).glob("*.safetensors"))
        if not self._files:
            raise AdapterError(
                f"no safetensors weights in {model_dir}: merged adapter serving reads the "
                f"base weights from there ({_FIX})"
            )
        config = Path(model_dir) / "config.json"
        if config.is_file() and "quantization_config" in json.loads(config.read_text()):
            raise AdapterError(
                f"the model in {model_dir} is quantized: merging an adapter into its weights "
                f"would ignore their scales ({_FIX})"
            )
        self._where: dict[str, Path] = {}
        for file in self._files:
            with safe_open(str(file), framework="pt") as handle:
                self._where.update((name, file) for name in handle.keys())  # noqa: SIM118
        self._cache: dict[str, torch.Tensor] = {}

    def get(self, name: str) -> torch.Tensor:
        if name not in self._cache:
            file = self._where.get(name)
            if file is None:
                raise AdapterError(f"the base model has no weight {name!r} for the adapter")
            with safe_open(str(file), framework="pt") as handle:
                weight = handle.get_tensor(name)
            if weight.dtype not in _MERGEABLE_DTYPES:
                raise AdapterError(
                    f"the base weight {name!r} is {weight.dtype}: not merged into ({_FIX})"
                )
            self._cache[name] = weight
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


def _scale(config: dict[str, object]) -> float:
    unsupported = [
        key
        for key, plain in (
            ("use_dora", False),
            ("rank_pattern", {}),
            ("alpha_pattern", {}),
            ("bias", "none"),
            ("lora_bias", False),
            ("modules_to_save", []),
            ("fan_in_fan_out", False),
        )
        if config.get(key, plain) not in (plain, None)
    ]
    if unsupported:
        raise AdapterError(
            f"merged serving does not support an adapter with {', '.join(unsupported)}; "
            "use generation.adapter_serving: lora"
        )
    rank = int(config["r"])  # type: ignore[call-overload]
    alpha = float(config.get("lora_alpha", rank))  # type: ignore[arg-type]
    return alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)


def merged_weights(base: BaseWeights, adapter_dir: Path) -> dict[str, torch.Tensor]:
    """Checkpoint name -> W + s * B A for every weight the adapter in ``adapter_dir``
    targets, in the base weight's dtype. Raises AdapterError for an adapter it cannot
    merge faithfully."""
    try:
        config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
        lora = load_file(str(adapter_dir / ADAPTER_WEIGHTS))
    except (OSError, ValueError) as err:
        raise AdapterError(f"cannot read the adapter in {adapter_dir}: {err}") from None
    scale = _scale(config)
    merged: dict[str, torch.Tensor] = {}
    others = sorted(k for k in lora if ".lora_A." not in k and ".lora_B." not in k)
    if others:
        raise AdapterError(
            f"{adapter_dir}: merged serving merges LoRA's A and B only, not {others[:3]} ({_FIX})"
        )
    for key, a in lora.items():
        if ".lora_A." not in key:
            continue
        b = lora.get(key.replace(".lora_A.", ".lora_B."))
        if b is None:
            raise AdapterError(f"{adapter_dir}: {key} has no lora_B")
        name = key.removeprefix(_PEFT_PREFIX).replace(".lora_A.weight", ".weight")
        weight = base.get(name)
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

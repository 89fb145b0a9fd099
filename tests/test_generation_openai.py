"""OpenAIGenerator against a real local HTTP server that samples the real tiny model.

``CompletionsServer`` below is a small OpenAI-compatible server (stdlib ThreadingHTTPServer
on 127.0.0.1) over a TransformersGenerator, with vLLM's runtime LoRA endpoint; the client
code under test is the same that talks to ``vllm serve``.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from raft_stream.config import GenerationConfig, ModelConfig
from raft_stream.errors import AdapterError
from raft_stream.generation.base import (
    GenerationError,
    GenerationUnavailableError,
    SamplingParams,
    build_generator,
    prompt_seed,
)
from raft_stream.generation.hf_backend import TransformersGenerator
from raft_stream.generation.openai_backend import OpenAIGenerator
from raft_stream.types import AdapterVersion, Completion

PROMPTS = ["the movie was", "honestly, the soundtrack was", "i thought the plot was"]
MODEL = "tiny"


class CompletionsServer(ThreadingHTTPServer):
    """POST /v1/completions and /v1/load_lora_adapter, served by a TransformersGenerator.

    ``logprobs`` carries each choice's sampled tokens (what the client counts); their
    log-probabilities are left null. Knobs that mimic real server trouble: ``fail_next``
    answers that many requests with 503, ``reverse_choices`` sends choices in reverse
    order, ``omit_logprobs`` drops logprobs. ``requests`` records (path, body) of each call.
    """

    def __init__(self, generator: TransformersGenerator) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.generator = generator
        self.adapters: dict[str, AdapterVersion] = {}
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.fail_next = 0
        self.reverse_choices = False
        self.omit_logprobs = False
        self._lock = threading.Lock()  # one generate() at a time

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def handle(self, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any] | str]:
        self.requests.append((path, body))
        if self.fail_next > 0:
            self.fail_next -= 1
            return 503, _error("overloaded", 503)
        if path == "/v1/load_lora_adapter":
            return self._load_adapter(body["lora_name"], Path(body["lora_path"]))
        if path == "/v1/completions":
            return self._complete(body)
        if path == "/v1/models":  # vLLM's cards: a LoRA's root is the path it was loaded from
            cards = [{"id": MODEL, "root": MODEL}] + [
                {"id": name, "root": str(a.path), "parent": MODEL}
                for name, a in self.adapters.items()
            ]
            return 200, {"object": "list", "data": cards}
        return 404, _error(f"no route {path}", 404)

    def _load_adapter(self, name: str, path: Path) -> tuple[int, dict[str, Any] | str]:
        if name in self.adapters:  # vLLM's answer, word for word
            message = (
                f"The lora adapter '{name}' has already been loaded. If you want to load the "
                "adapter in place, set 'load_inplace' to True."
            )
            return 400, _error(message, 400)
        if not (path / "adapter_config.json").is_file():
            return 404, _error(f"Loading lora {name} failed: No adapter found for {path}", 404)
        self.adapters[name] = AdapterVersion(len(self.adapters) + 1, path, "", MODEL, 0.0)
        return 200, f"Success: LoRA adapter '{name}' added successfully."

    def _complete(self, body: dict[str, Any]) -> tuple[int, dict[str, Any] | str]:
        model = body["model"]
        if model != MODEL and model not in self.adapters:
            return 404, _error(f"The model `{model}` does not exist.", 404)
        params = SamplingParams(
            n=body.get("n", 1),
            max_new_tokens=body.get("max_tokens", 16),
            temperature=body.get("temperature", 1.0),
            top_p=body.get("top_p", 1.0),
            seed=body.get("seed"),
        )
        with self._lock:
            outputs = [
                [list(c.token_ids) for c in per_prompt]
                for per_prompt in self.generator.generate(
                    body["prompt"], params, self.adapters.get(model)
                )
            ]
        tokenizer = self.generator.tokenizer
        choices = []
        for i, per_prompt in enumerate(outputs):
            for j, ids in enumerate(per_prompt):
                choice: dict[str, Any] = {
                    "index": i * params.n + j,
                    "text": tokenizer.decode(ids, skip_special_tokens=True),
                    "finish_reason": "stop" if ids[-1] in self.generator.eos_ids else "length",
                }
                if not self.omit_logprobs:
                    tokens = tokenizer.convert_ids_to_tokens(ids)
                    choice["logprobs"] = {"tokens": tokens, "token_logprobs": [None] * len(ids)}
                choices.append(choice)
        if self.reverse_choices:
            choices.reverse()
        completion_tokens = sum(len(ids) for per_prompt in outputs for ids in per_prompt)
        return 200, {
            "id": f"cmpl-{len(self.requests)}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": model,
            "choices": choices,
            "usage": {"completion_tokens": completion_tokens},
        }


class _Handler(BaseHTTPRequestHandler):
    server: CompletionsServer

    def do_GET(self) -> None:
        self._answer(*self.server.handle(self.path, {}))

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self._answer(*self.server.handle(self.path, body))

    def _answer(self, status: int, answer: dict[str, Any] | str) -> None:
        payload = (answer if isinstance(answer, str) else json.dumps(answer)).encode()
        self.send_response(status)
        content_type = "text/plain" if isinstance(answer, str) else "application/json"
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        """Keep test output quiet."""


def _error(message: str, code: int) -> dict[str, Any]:
    return {"error": {"message": message, "type": "Error", "code": code}}


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path) -> Iterator[CompletionsServer]:
    generator = TransformersGenerator(str(tiny_model_dir), ModelConfig(), GenerationConfig())
    httpd = CompletionsServer(generator)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def fresh_server(server: CompletionsServer) -> CompletionsServer:
    """The shared server with its knobs reset, its log cleared and no adapters loaded."""
    server.adapters.clear()
    server.requests.clear()
    server.fail_next = 0
    server.reverse_choices = server.omit_logprobs = False
    return server


def _sampled_alone(
    server: CompletionsServer, prompts: list[str], params: SamplingParams
) -> list[list[Completion]]:
    """What the server samples for each prompt sent alone with its prompt seed (what the
    client does with seeded params), as the API answers it: text only, no token ids."""
    return [
        [
            Completion(c.text, c.num_tokens, c.finish_reason)
            for c in server.generator.generate(
                [p], replace(params, seed=prompt_seed(params.seed, p))
            )[0]
        ]
        for p in prompts
    ]


def _client(base_url: str, **kwargs: Any) -> OpenAIGenerator:
    cfg = GenerationConfig(backend="openai", openai_base_url=base_url, openai_model=MODEL)
    return OpenAIGenerator("/unused/model/path", ModelConfig(), cfg, backoff_s=0.01, **kwargs)


def test_returns_n_completions_per_prompt_as_the_server_sampled_them(
    fresh_server: CompletionsServer,
) -> None:
    params = SamplingParams(n=3, max_new_tokens=8, seed=2)

    started = time.time()
    results = _client(fresh_server.base_url).generate(PROMPTS, params)

    assert [len(per_prompt) for per_prompt in results] == [3, 3, 3]
    assert all(1 <= c.num_tokens <= 8 for per_prompt in results for c in per_prompt)
    # Generated by the time the server answered the request that carried it (one request
    # per prompt: each has its own seed).
    for per_prompt in results:
        [answered] = {c.generated_at for c in per_prompt}
        assert answered is not None and started < answered <= time.time()
    assert results == _sampled_alone(fresh_server, PROMPTS, params)


def test_maps_choices_to_prompts_by_index(fresh_server: CompletionsServer) -> None:
    params = SamplingParams(n=2, max_new_tokens=8, seed=4)
    fresh_server.reverse_choices = True

    results = _client(fresh_server.base_url).generate(PROMPTS, params)

    assert results == _sampled_alone(fresh_server, PROMPTS, params)


def test_sends_sampling_parameters_and_requests_logprobs(fresh_server: CompletionsServer) -> None:
    client = _client(fresh_server.base_url)

    client.generate(
        PROMPTS[:1], SamplingParams(n=2, max_new_tokens=5, temperature=0.7, top_p=0.9, seed=1)
    )

    path, body = fresh_server.requests[-1]
    assert path == "/v1/completions"
    assert body == {
        "model": MODEL,
        "prompt": PROMPTS[:1],
        "n": 2,
        "max_tokens": 5,
        "temperature": 0.7,
        "top_p": 0.9,
        "seed": prompt_seed(1, PROMPTS[0]),
        "logprobs": 0,
    }


def test_each_prompt_samples_with_its_own_seed_whatever_its_batch(
    fresh_server: CompletionsServer,
) -> None:
    # Issue 9: one seed for every prompt of a request gives them all the same random stream.
    params = SamplingParams(n=2, max_new_tokens=6, seed=5)
    client = _client(fresh_server.base_url)

    batched = client.generate(PROMPTS, params)
    alone = client.generate(PROMPTS[2:], params)

    seeds = sorted(body["seed"] for path, body in fresh_server.requests[:3])
    assert seeds == sorted(prompt_seed(5, p) for p in PROMPTS) and len(set(seeds)) == 3
    assert alone == batched[2:]


def test_loads_adapter_once_and_samples_from_it(
    fresh_server: CompletionsServer, tiny_lora_adapters: list[AdapterVersion]
) -> None:
    v1 = tiny_lora_adapters[0]
    client = _client(fresh_server.base_url)
    params = SamplingParams(n=2, max_new_tokens=8, seed=6)

    first = client.generate(PROMPTS, params, v1)
    assert client.last_stats is not None and client.last_stats.adapter_load_s > 0
    again = client.generate(PROMPTS, params, v1)

    paths = [path for path, _ in fresh_server.requests]
    assert paths.count("/v1/load_lora_adapter") == 1
    assert fresh_server.requests[0][1] == {"lora_name": "v1", "lora_path": str(v1.path)}
    completions = [body for path, body in fresh_server.requests if path == "/v1/completions"]
    assert [body["model"] for body in completions] == ["v1"] * 2 * len(PROMPTS)
    assert first == again
    assert first != client.generate(PROMPTS, params)


def test_a_second_replica_serves_an_adapter_the_first_one_loaded(
    fresh_server: CompletionsServer, tiny_lora_adapters: list[AdapterVersion]
) -> None:
    # Issue 9: with two generator replicas on one server (the chart's default), the
    # second one's load got HTTP 400 "already loaded" and it refused the version.
    v1 = tiny_lora_adapters[0]
    params = SamplingParams(n=1, max_new_tokens=4, seed=3)
    first = _client(fresh_server.base_url).generate(PROMPTS, params, v1)

    second = _client(fresh_server.base_url).generate(PROMPTS, params, v1)

    assert second == first
    assert [path for path, _ in fresh_server.requests].count("/v1/load_lora_adapter") == 2


def test_refuses_an_adapter_whose_name_the_server_serves_from_another_path(
    fresh_server: CompletionsServer, tiny_lora_adapters: list[AdapterVersion]
) -> None:
    v1, v2, _ = tiny_lora_adapters
    _client(fresh_server.base_url).generate(PROMPTS, SamplingParams(n=1, max_new_tokens=2), v1)
    other_store_v1 = AdapterVersion(1, v2.path, "", MODEL, 0.0)  # same name, other files

    with pytest.raises(AdapterError, match=r"already serves an adapter named v1 from \["):
        _client(fresh_server.base_url).generate(PROMPTS, SamplingParams(n=1), other_store_v1)


def test_reloads_adapter_when_server_forgot_it(
    fresh_server: CompletionsServer, tiny_lora_adapters: list[AdapterVersion]
) -> None:
    v2 = tiny_lora_adapters[1]
    client = _client(fresh_server.base_url)
    params = SamplingParams(n=1, max_new_tokens=4, seed=0)
    client.generate(PROMPTS, params, v2)

    fresh_server.adapters.clear()  # as after a server restart
    results = client.generate(PROMPTS, params, v2)

    assert len(results) == len(PROMPTS)
    assert [path for path, _ in fresh_server.requests].count("/v1/load_lora_adapter") == 2


def test_retries_server_errors_then_succeeds(fresh_server: CompletionsServer) -> None:
    fresh_server.fail_next = 2

    results = _client(fresh_server.base_url, max_attempts=3).generate(
        PROMPTS[:1], SamplingParams(n=1, max_new_tokens=4)
    )

    assert len(results) == 1
    assert len(fresh_server.requests) == 3


def test_raises_unavailable_after_bounded_retries_on_server_errors(
    fresh_server: CompletionsServer,
) -> None:
    fresh_server.fail_next = 10

    with pytest.raises(GenerationUnavailableError, match="failed 3 times; last: HTTP 503"):
        _client(fresh_server.base_url, max_attempts=3).generate(PROMPTS, SamplingParams())
    assert len(fresh_server.requests) == 3


def test_raises_unavailable_when_nothing_listens() -> None:
    with socket.socket() as sock:  # a port that was free a moment ago
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]

    with pytest.raises(
        GenerationUnavailableError, match="failed 2 times; last: ConnectionError"
    ) as info:
        _client(f"http://127.0.0.1:{port}/v1", max_attempts=2).generate(PROMPTS, SamplingParams())
    assert info.value.retriable


def test_raises_generation_error_without_retry_on_client_errors(
    fresh_server: CompletionsServer,
) -> None:
    cfg = GenerationConfig(backend="openai", openai_base_url=fresh_server.base_url)
    client = OpenAIGenerator("no-such-model", ModelConfig(), cfg, backoff_s=0.01)

    with pytest.raises(GenerationError, match=r"HTTP 404.*no-such-model` does not exist") as info:
        client.generate(PROMPTS, SamplingParams(n=1, max_new_tokens=2))
    assert not info.value.retriable
    assert len(fresh_server.requests) == 1


def test_raises_adapter_error_when_server_cannot_load_it(
    fresh_server: CompletionsServer, tmp_path: Path
) -> None:
    missing = AdapterVersion(9, tmp_path / "nowhere", "", MODEL, 0.0)

    with pytest.raises(AdapterError, match=r"could not load adapter v9 .*No adapter found"):
        _client(fresh_server.base_url).generate(PROMPTS, SamplingParams(n=1), missing)


def test_refuses_to_guess_token_counts_without_logprobs(fresh_server: CompletionsServer) -> None:
    fresh_server.omit_logprobs = True

    with pytest.raises(GenerationError, match=r"no logprobs.tokens.*honour logprobs=0"):
        _client(fresh_server.base_url).generate(PROMPTS, SamplingParams(n=1, max_new_tokens=2))


def test_build_generator_selects_the_openai_backend(fresh_server: CompletionsServer) -> None:
    cfg = GenerationConfig(backend="openai", openai_base_url=fresh_server.base_url)

    generator = build_generator(MODEL, ModelConfig(), cfg)

    assert isinstance(generator, OpenAIGenerator)
    assert len(generator.generate(PROMPTS[:1], SamplingParams(n=2, max_new_tokens=2))[0]) == 2

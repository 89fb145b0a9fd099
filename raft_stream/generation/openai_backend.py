"""The black-box backend: any OpenAI-compatible ``/completions`` endpoint over HTTP.

RAFT needs only samples, so the policy can live behind an API. Adapters use vLLM's
runtime LoRA API: the first time a version is used it is registered with
``POST {base_url}/load_lora_adapter`` and then requested as ``model=v<version>``. The
server must run with ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`` and see the adapter folder
at the same path (a shared volume).

Token counts: each request asks for ``logprobs: 0``, so every choice carries the tokens it
sampled (``logprobs.tokens``, eos included); ``num_tokens`` is their number, exact per
choice. ``usage.completion_tokens`` only gives the total of all choices, and counting with
a local tokenizer would be an estimate, so a server that returns no logprobs is refused
with a GenerationError rather than given made-up counts.

Seeds: the API takes one seed a request, so seeded sampling sends each prompt in its own
request with ``prompt_seed(seed, prompt)``, as the in-process backends seed each prompt.
Replicas sharing a server: a version another replica registered already ("has already
been loaded") is served when the server's card for that name points at the same folder.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import requests
import requests.adapters

from raft_stream.config import GenerationConfig, ModelConfig
from raft_stream.errors import AdapterError, ConfigError
from raft_stream.generation.base import (
    EnginePrompt,
    GenerationError,
    GenerationStats,
    GenerationUnavailableError,
    SamplingParams,
    prompt_seed,
)
from raft_stream.types import AdapterVersion, Completion

__all__ = ["OpenAIGenerator"]

# Worth retrying: the server is overloaded, restarting or briefly failing.
_RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
# vLLM's answer (HTTP 400) to a load_lora_adapter of a name it serves already
# (vllm/entrypoints/openai/models/serving.py, vLLM 0.32).
_ALREADY_LOADED = "has already been loaded"
# Seeded requests in flight at once (one a prompt); also the HTTP connection pool's size.
_MAX_CONCURRENT_REQUESTS = 16


class OpenAIGenerator:
    """Samples from an OpenAI-compatible completions server, retrying transient failures."""

    def __init__(
        self,
        model_path: str,
        model_cfg: ModelConfig,
        gen_cfg: GenerationConfig,
        *,
        max_attempts: int = 4,
        backoff_s: float = 0.5,
    ) -> None:
        """``max_attempts`` tries per request, waiting ``backoff_s`` * 2**attempt between."""
        if not gen_cfg.openai_base_url:
            raise ConfigError(
                "generation.openai_base_url is required for the openai backend; "
                "set it to the server's /v1 URL, e.g. http://127.0.0.1:8000/v1"
            )
        self.base_url = gen_cfg.openai_base_url.rstrip("/")
        self.model = gen_cfg.openai_model or model_path
        self.timeout_s = gen_cfg.request_timeout_s
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self.session = requests.Session()
        pooled = requests.adapters.HTTPAdapter(pool_maxsize=_MAX_CONCURRENT_REQUESTS)
        self.session.mount("http://", pooled)
        self.session.mount("https://", pooled)
        api_key = os.environ.get(gen_cfg.openai_api_key_env)
        if api_key:
            self.session.headers["Authorization"] = f"Bearer {api_key}"
        self.last_stats: GenerationStats | None = None
        self._loaded: set[int] = set()  # adapter versions registered with the server
        self._registrations = 0  # loads so far: a request sent before the last one may retry
        self._load_lock = threading.Lock()

    def generate(
        self,
        prompts: Sequence[str | EnginePrompt],
        params: SamplingParams,
        adapter: AdapterVersion | None = None,
    ) -> list[list[Completion]]:
        """``params.n`` completions per prompt text (passed as-is, template already applied).

        A black box: the server is sent text and answers text, so completions carry no
        token ids and the trainer tokenizes the text again (the sample says so: it is not
        ``token_faithful``).

        Unseeded, one request carries every prompt. Seeded, each prompt goes in a request of
        its own with ``prompt_seed(seed, prompt)`` (the API takes one seed a request, which
        would give every prompt of a batch the same random stream), sent concurrently so the
        server still batches them.
        """
        if not prompts:
            return []  # the API refuses an empty prompt list
        texts = [EnginePrompt.of(prompt).text for prompt in prompts]
        started = time.perf_counter()
        load_s = self._load(adapter)
        if params.seed is None:
            results, reload_s = self._complete(texts, params, adapter, None)
            load_s += reload_s
        else:
            seeds = [prompt_seed(params.seed, text) for text in texts]
            workers = min(len(texts), _MAX_CONCURRENT_REQUESTS)
            with ThreadPoolExecutor(workers, thread_name_prefix="raft-stream-openai") as pool:
                answers = list(
                    pool.map(
                        lambda prompt, seed: self._complete([prompt], params, adapter, seed),
                        texts,
                        seeds,
                    )
                )
            results = [completions for answer, _ in answers for completions in answer]
            load_s += sum(reload_s for _, reload_s in answers)
        self.last_stats = GenerationStats.of(results, time.perf_counter() - started, load_s)
        return results

    def _complete(
        self,
        prompts: list[str],
        params: SamplingParams,
        adapter: AdapterVersion | None,
        seed: int | None,
    ) -> tuple[list[list[Completion]], float]:
        """One completions request: (completions per prompt, seconds spent reloading)."""
        body: dict[str, Any] = {
            "model": adapter.name if adapter is not None else self.model,
            "prompt": prompts,
            "n": params.n,
            "max_tokens": params.max_new_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "logprobs": 0,  # per-choice sampled tokens: the exact token counts
        }
        if seed is not None:
            body["seed"] = seed
        load_s = 0.0
        registered = self._registrations
        response = self._request("POST", "completions", body)
        if response.status_code == 404 and adapter is not None:
            # A restarted server forgets runtime-loaded adapters: register it again, once
            # for all the requests in flight that found it gone.
            with self._load_lock:
                if self._registrations == registered:
                    self._loaded.discard(adapter.version)
                    load_s = self._load(adapter)
            response = self._request("POST", "completions", body)
        answered = time.time()
        return _parse_choices(_ok(response).json(), len(prompts), params.n, answered), load_s

    def close(self) -> None:
        """Close the HTTP connection pool."""
        self.session.close()

    def _load(self, adapter: AdapterVersion | None) -> float:
        """Register a version with the server on first use; returns the seconds it took."""
        if adapter is None or adapter.version in self._loaded:
            return 0.0
        started = time.perf_counter()
        body = {"lora_name": adapter.name, "lora_path": str(adapter.path)}
        response = self._request("POST", "load_lora_adapter", body)
        if response.status_code == 400 and _ALREADY_LOADED in response.text:
            # Another generator replica on this server registered it first.
            self._check_registered(adapter)
        elif not response.ok:
            raise AdapterError(
                f"the server could not load adapter {adapter.name} from {adapter.path} "
                f"(HTTP {response.status_code}: {response.text[:500]}); it needs "
                "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True and the folder at that path"
            )
        self._loaded.add(adapter.version)
        self._registrations += 1
        return time.perf_counter() - started

    def _check_registered(self, adapter: AdapterVersion) -> None:
        """The server says ``adapter.name`` is loaded: fine when from ``adapter.path`` (its
        ``/models`` card's ``root``), else AdapterError (another store's version)."""
        cards = _ok(self._request("GET", "models")).json().get("data") or []
        roots = [card.get("root") for card in cards if card.get("id") == adapter.name]
        if roots != [str(adapter.path)]:
            raise AdapterError(
                f"the server already serves an adapter named {adapter.name} from {roots}, not "
                f"from {adapter.path}: another trainer's store shares this server; give each "
                "store its own server"
            )

    def _request(
        self, method: str, endpoint: str, body: dict[str, Any] | None = None
    ) -> requests.Response:
        """``method`` with bounded exponential backoff on connection errors, timeouts, 429
        and 5xx. Other answers, errors included, are returned for the caller to judge."""
        url = f"{self.base_url}/{endpoint}"
        last = ""
        for attempt in range(self.max_attempts):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                response = self.session.request(method, url, json=body, timeout=self.timeout_s)
            except (requests.ConnectionError, requests.Timeout) as exc:
                last = f"{type(exc).__name__}: {exc}"
                continue
            if response.status_code not in _RETRY_STATUS:
                return response
            last = f"HTTP {response.status_code}: {response.text[:300]}"
        raise GenerationUnavailableError(
            f"{method} {url} failed {self.max_attempts} times; last: {last}. "
            "Check that the server is up at generation.openai_base_url"
        )


def _ok(response: requests.Response) -> requests.Response:
    if not response.ok:
        raise GenerationError(
            f"POST {response.url} answered HTTP {response.status_code}: {response.text[:500]}"
        )
    return response


def _parse_choices(
    data: dict[str, Any], num_prompts: int, n: int, answered_at: float
) -> list[list[Completion]]:
    """Regroup choices by prompt: choice ``index`` i belongs to prompt i // n, as sample
    i % n; each generated by ``answered_at`` (the server answers a request at once)."""
    choices = data.get("choices") or []
    results: list[list[Completion | None]] = [[None] * n for _ in range(num_prompts)]
    for choice in choices:
        index = choice.get("index")
        if not isinstance(index, int) or not 0 <= index < num_prompts * n:
            raise GenerationError(
                f"choice index {index!r} is outside 0..{num_prompts * n - 1} "
                f"({num_prompts} prompts x n={n})"
            )
        tokens = (choice.get("logprobs") or {}).get("tokens")
        if tokens is None:
            raise GenerationError(
                f"choice {index} carries no logprobs.tokens, so its token count is unknown; "
                "the server must honour logprobs=0 (vLLM does)"
            )
        results[index // n][index % n] = Completion(
            choice.get("text", ""),
            len(tokens),
            choice.get("finish_reason"),
            generated_at=answered_at,
        )
    missing = [i * n + j for i, row in enumerate(results) for j, c in enumerate(row) if c is None]
    if missing:
        raise GenerationError(
            f"the server returned {len(choices)} choices for {num_prompts} prompts x n={n}; "
            f"missing indexes {missing[:10]}"
        )
    return [[c for c in row if c is not None] for row in results]

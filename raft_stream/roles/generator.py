"""The generator role: prompts in, K scored and ranked samples per prompt out.

Batches flow through a pipeline (``roles.batches.BatchPipeline``): each goes into the
engine as soon as it is polled, and vLLM samples it together with the batches before it
(continuous batching, ``generation.engine_loop``) while finished ones are scored and
delivered, with at most ``generation.max_prompts_in_flight`` prompts polled and not yet
delivered, and the consumer kept in its group however long a batch takes:

1. poll a batch (at most ``kafka.poll_max_records`` prompts, and what fits in flight; bad
   messages come back as dead letters);
2. engine stage: format it and put it into the engine with the adapter being served;
3. deliver stage: once sampled, score and rank it; encode each prompt's samples (a
   prompt whose sample would exceed ``kafka.max_message_bytes`` is dead-lettered,
   ``output_too_large``); send its samples (and dead letters) and block until the broker
   acknowledged them all, retrying with backoff through an outage without generating
   again;
4. only then, and once every batch polled before it is delivered too, commit its offsets
   (dead-lettered ones included).

A step that fails for one prompt (formatting, encoding: a bug that prompt triggers)
dead-letters that prompt (``internal_error``) and the batch goes on; a failure of the
engine itself ends the role (EngineFailure), for its supervisor to restart.

The adapters topic is pushed (``roles.adapters.AdapterFeed``: a thread long-polls it), and
before each batch, or between two when messages came, the engine stage follows it
(``raft_stream.serving.ServingLedger``: the trainer's announcements with
their gate verdicts, operators' promote, rollback, pin and unpin): the version the ledger
targets that passes the trust checks (``roles.adapters``: signature, base model, lineage,
place in the store, manifest, bounded checksum) and loads into the engine serves the
batches sampled after it (the ones sampled before are delivered as they were). A version
that fails any of that is refused with a log line and a counted reason, the next candidate
is tried, and the old one keeps serving.

Live rollback: with ``gate.rollback_samples`` set, the role compares the live reward of
the version it serves with the one served before (``serving.LiveRewardWatch``); when it
regressed, the role sends a rollback on the adapters topic, and every replica, this one
included, follows it from there.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import socket
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass

from raft_stream.config import RaftConfig
from raft_stream.errors import AdapterError, RaftStreamError
from raft_stream.futures import done, then
from raft_stream.generation.base import (
    EngineDeadError,
    Generator,
    SamplingParams,
    build_generator,
)
from raft_stream.metrics import RaftMetrics
from raft_stream.prompting import PromptFormatter
from raft_stream.raft import RaftSampler, ScoredBatch
from raft_stream.reasons import REWARD_ERROR, REWARD_FAILED, REWARD_TIMEOUT
from raft_stream.rewards.registry import build_safe_reward
from raft_stream.rewards.safe import SafeReward
from raft_stream.roles.adapters import (
    ENGINE_ERROR,
    FETCH_FAILED,
    GATE_REJECTED,
    AdapterFeed,
    AdapterFetchError,
    AdapterTrust,
    AdapterWatcher,
    adapter_store_root,
    fetch_adapter,
    fold_checked,
    send_action,
    stored_announcement,
)
from raft_stream.roles.batches import BatchPipeline
from raft_stream.roles.delivery import (
    StreamClients,
    commit_quietly,
    crash_journal,
    each_record,
    join_group,
    open_clients,
    until_delivered,
)
from raft_stream.roles.lifecycle import Shutdown, noop
from raft_stream.serving import BASE_VERSION, LiveRewardWatch, ServingLedger
from raft_stream.stream.kafka import DeliveryError, PollBatch, PromptConsumer, Received
from raft_stream.stream.schema import (
    GENERATION_FAILED,
    AdapterAction,
    AdapterAnnouncement,
    DeadLetter,
    check_output_size,
    dumps,
    encode_sample,
)
from raft_stream.types import AdapterVersion, PromptRecord, Sample

__all__ = ["EngineFailure", "GeneratorRole"]

log = logging.getLogger(__name__)

POLL_TIMEOUT_S = 0.5
"""Longest wait for prompts; bounds how late a heartbeat or an adapter check can be."""
REFUSAL_RETRY_S = 30.0
"""A version refused for a reason that may pass (its folder not readable yet, an engine
error) is tried again after this long."""
BUSY_POLL_S = 0.02
"""The wait for prompts while batches are in flight: how late a finished one is seen."""

# One token from a short prompt: loads an adapter into the engine (or proves the engine
# answers) for a fraction of a batch's cost.
PROBE = SamplingParams(n=1, max_new_tokens=1, temperature=0.0, seed=0)
PROBE_PROMPT = "hello"


class EngineFailure(RaftStreamError):
    """The engine failed every prompt of a batch and a probe too: restart the process."""


class GeneratorRole:
    """Consumes prompts and produces scored samples until ``shutdown`` is requested.

    The engine (``generator``) belongs to the caller, who closes it; the role opens and
    closes its own Kafka clients in ``run``.
    """

    def __init__(
        self,
        cfg: RaftConfig,
        generator: Generator,
        formatter: PromptFormatter,
        reward: SafeReward,
        metrics: RaftMetrics,
        shutdown: Shutdown,
        beat: Callable[[], None] = noop,
    ) -> None:
        self.cfg = cfg
        self.generator = generator
        self.formatter = formatter
        self.metrics = metrics
        self.shutdown = shutdown
        self.beat = beat
        self.sampler = RaftSampler(
            generator, reward, cfg.ranking, SamplingParams.from_config(cfg.generation.sampling)
        )
        self.adapter: AdapterVersion | None = None
        """The version new batches use; None is the base model (version 0)."""
        self.trust = AdapterTrust.from_config(cfg)
        self.ready = False
        self.batches = 0
        self._previous: AdapterVersion | None = None
        self._next_adapter_check = 0.0
        self._adapter_check: Future[None] | None = None
        self._target_moved_at: float | None = None
        """When the broker got the message that moved the ledger's target (Unix s)."""
        self._death_counted = False
        self._loaded_at: tuple[int, float] | None = None
        """(version, Unix time) of the last load, until a batch is sampled on it."""
        self.ledger = ServingLedger()
        """The adapters topic folded: which version every replica serves."""
        self._refused: dict[tuple[object, ...], float] = {}
        """(announcement identity, rejected) -> monotonic time before which it is not
        tried again (inf: refused for a reason that cannot pass)."""
        self._serving_key: tuple[object, ...] | None = None
        gate = cfg.gate
        self.live = (
            None
            if gate.rollback_samples is None
            else LiveRewardWatch(gate.rollback_samples, gate.rollback_margin)
        )
        self._live_lock = threading.Lock()
        self._ledger_lock = threading.Lock()
        """The engine stage folds the adapters topic into ``ledger``; the loop reads it."""
        self._rolled_back: int | None = None
        """The version this replica last sent a rollback for (sent once)."""
        self._feed: AdapterFeed | None = None
        """The adapters topic pushed (``run`` starts it once caught up)."""

    @classmethod
    def from_config(
        cls,
        cfg: RaftConfig,
        model_path: str,
        metrics: RaftMetrics,
        shutdown: Shutdown,
        beat: Callable[[], None] = noop,
    ) -> GeneratorRole:
        """Build the configured engine, prompt formatter and reward (the engine start is
        the slow part: 20-90 s for vLLM on a CPU); close ``role.generator`` when done."""
        formatter = PromptFormatter.from_model(model_path, cfg.model)
        reward = build_safe_reward(cfg.reward)
        generator = build_generator(model_path, cfg.model, cfg.generation)
        return cls(cfg, generator, formatter, reward, metrics, shutdown, beat)

    @property
    def served_version(self) -> int:
        return self.adapter.version if self.adapter is not None else 0

    # -- the loop --------------------------------------------------------------------------

    def run(self) -> None:
        """Serve until shutdown; the batches in flight are finished (acked and committed)."""
        topics = self.cfg.kafka.topics
        clients = open_clients(
            self.cfg.kafka,
            [topics.prompts, topics.samples, topics.adapters, topics.dead_letter],
            lambda kafka: PromptConsumer(
                kafka,
                self.cfg.generation.sampling,
                crash_journal(self.cfg, kafka.generator_group, topics.prompts),
            ),
            self.metrics.count_dead_letter,
            self.shutdown,
            self.beat,
        )
        if clients is None:
            return
        consumer = clients.consumer
        watcher: AdapterWatcher | None = None
        pipeline: BatchPipeline[PromptRecord, ScoredBatch] | None = None
        feed: AdapterFeed | None = None
        try:
            watcher = AdapterWatcher(
                self.cfg.kafka,
                self.metrics.count_adapter_load_failure,
                poll_timeout_s=POLL_TIMEOUT_S,
            )
            self.metrics.set_served_version(self.served_version)
            pinned = self.cfg.store.pinned_version
            if pinned is not None:
                self.serve_pinned(pinned)
            self._receive(watcher.catch_up(timeout_s=2.0))
            if pinned is None:
                self._follow()
            # From here on the feed's thread polls the watcher, and the engine is used on
            # the engine stage only.
            feed = self._feed = AdapterFeed(watcher)
            pipeline = BatchPipeline(
                consumer,
                lambda offsets: commit_quietly(consumer, offsets, "prompts", self.metrics),
                max_prompts=self.cfg.generation.max_prompts_in_flight,
                revoke_wait_s=self.cfg.kafka.max_poll_interval_ms / 1000,
            )
            if not join_group(consumer, self.shutdown, self.beat):
                return
            self.ready = True
            log.info("generator serving", extra={"adapter_version": self.served_version})
            while not self.shutdown.requested:
                self.beat()
                arrival = feed.arrival  # before the look: what comes after it wakes us
                self._schedule_adapter_check(pipeline, feed)
                # Full: block until the oldest batch is done, or adapters messages came
                # (or a look on the engine stage ended), so a new version loads at once.
                # Room with batches in flight: a short wait for prompts, so a done batch
                # is committed soon.
                busy = len(pipeline) and pipeline.room
                wake = [arrival, *([self._adapter_check] if self._adapter_check else [])]
                batch = pipeline.poll(BUSY_POLL_S if busy else POLL_TIMEOUT_S, wake)
                if batch is not None:
                    self.metrics.prompts_consumed_total.inc(len(batch))
                    pipeline.submit(
                        batch,
                        functools.partial(self._sample_batch, batch),
                        functools.partial(self._deliver, batch, clients),
                    )
                for scored in pipeline.finished():
                    self._finished(scored, clients)
                self.metrics.consumer_lag_messages.labels(topic=topics.prompts).set(
                    clients.consumer.lag()
                )
            for scored in pipeline.drain():
                self._finished(scored, clients)
        except BaseException:
            # The stages must not retry deliveries through an outage while the role fails:
            # closing the pipeline waits for them.
            self.shutdown.request("the generator failed")
            raise
        finally:
            self.ready = False
            if pipeline is not None:
                pipeline.close()
            if feed is not None:
                feed.close()  # and the watcher
            elif watcher is not None:
                watcher.close()
            self._feed = None
            clients.close()
            log.info("generator stopped", extra={"batches": self.batches})

    def _finished(self, scored: ScoredBatch, clients: StreamClients[PromptRecord]) -> None:
        self.batches += 1
        self._observe(scored)
        self._watch_live_reward(clients)

    def _sample_batch(self, batch: PollBatch[PromptRecord]) -> _Sampled:
        """The engine stage: format the batch's prompts and sample them with the version
        served now, after following what the adapters topic brought meanwhile (dead
        letters for the prompts that cannot be formatted or sampled)."""
        if self._feed is not None and self._feed.pending.is_set():
            self._check_adapters(self._feed)
        formatted, unformatted = each_record(
            batch.records, lambda r: self.formatter.format(r.value), "formatting the prompt"
        )
        letters = [*batch.dead, *unformatted]
        started = time.perf_counter()
        prompts = [prompt for _, prompt in formatted]
        pending, failed = self._sample(prompts)
        loaded = None
        if formatted:  # the version's first batch is one with prompts
            loaded, self._loaded_at = self._loaded_at, None

        def sampled(result: tuple[list[Sample], int]) -> _Samples:
            samples, tokens = result
            if loaded is not None and samples and samples[0].adapter_version == loaded[0]:
                first = _first_generated(samples)
                self.metrics.observe_swap_phase("first_sample", first - loaded[1])
            return _Samples(samples, tokens, time.perf_counter() - started)

        for index, error in failed:
            letters.append(formatted[index][0].dead_letter(GENERATION_FAILED, error))
        records = [record for record, _ in formatted]
        return _Sampled(records, letters, then(pending, sampled), failed, prompts, self.adapter)

    def _deliver(
        self,
        batch: PollBatch[PromptRecord],
        clients: StreamClients[PromptRecord],
        sampled: _Sampled,
    ) -> ScoredBatch | None:
        """The deliver stage: score and rank the batch's samples, send them (and its dead
        letters) and wait for the acks; the pipeline then commits it. None: shutdown came
        during an outage, nothing delivered for sure, so nothing is committed (whoever
        consumes the batch next redoes it)."""
        result, failed, letters = self._sampled_or_alone(sampled)
        scored = self.sampler.rank(result.samples, result.tokens, result.generation_s, failed)
        letters = [*sampled.letters, *letters]
        unscored = self._unscored(scored.samples)
        letters += [
            record.dead_letter(REWARD_FAILED, unscored[record.value.id])
            for record in sampled.records
            if record.value.id in unscored
        ]
        samples = scored.selection.kept
        if self.cfg.kafka.publish_rejected:
            samples = samples + scored.selection.rejected
        samples = [sample for sample in samples if sample.prompt_id not in unscored]
        messages, unsendable = self._encode(samples, sampled.records)
        letters += unsendable
        letters_sent = False
        producer, topic = clients.producer, self.cfg.kafka.topics.samples

        def send(timeout_s: float) -> None:
            nonlocal letters_sent
            if not letters_sent:  # a retry must not count the dead letters twice
                clients.dead_letters.write(letters, timeout_s)
                letters_sent = True
            producer.wait_all((producer.send_bytes(topic, v, k) for k, v in messages), timeout_s)

        kafka = self.cfg.kafka
        if not until_delivered(
            send, kafka.delivery_timeout_s, self.shutdown, self.beat, "samples", self.metrics
        ):
            return None
        return scored

    def _sampled_or_alone(
        self, sampled: _Sampled
    ) -> tuple[_Samples, list[tuple[int, str]], list[DeadLetter]]:
        """The batch's samples, the prompts the engine refused and their dead letters.
        When a step failed and the engine lives, each prompt is sampled again alone, so
        the one at fault costs only itself (``generation_failed``)."""
        try:
            return sampled.samples.result(), sampled.failed, []
        except EngineDeadError as err:
            self._engine_died(err)
            raise
        except Exception as err:
            log.warning(
                "the engine failed a step of a batch; sampling its prompts one by one",
                extra={"prompts": len(sampled.prompts), "error": repr(err)},
            )
        started = time.perf_counter()
        samples, tokens, failed = self.sampler.each_alone(sampled.prompts, sampled.adapter)
        self._check_engine(failed, len(sampled.prompts))
        letters = [sampled.records[i].dead_letter(GENERATION_FAILED, e) for i, e in failed]
        return _Samples(samples, tokens, time.perf_counter() - started), failed, letters

    def _unscored(self, samples: list[Sample]) -> dict[str, str]:
        """Prompt id -> why, for each prompt none of whose samples got a reward because
        the reward failed (SafeReward already retried the batch ``reward.max_attempts``
        times): it is dead-lettered, not committed as done."""
        reasons: dict[str, set[str | None]] = defaultdict(set)
        for sample in samples:
            reasons[sample.prompt_id].add(sample.reject_reason)
        attempts = self.cfg.reward.max_attempts
        return {
            prompt_id: f"the reward failed for every sample ({', '.join(sorted(map(str, found)))}) "
            f"after {attempts} attempt(s)"
            for prompt_id, found in reasons.items()
            if found <= {REWARD_ERROR, REWARD_TIMEOUT}
        }

    def _encode(
        self, samples: list[Sample], records: Sequence[Received[PromptRecord]]
    ) -> tuple[list[tuple[bytes, bytes]], list[DeadLetter]]:
        """Each prompt's samples as (key, value) records, all or none: a prompt with a
        sample over ``kafka.max_message_bytes`` is dead-lettered (``output_too_large``),
        as is one whose samples cannot be encoded (``internal_error``)."""
        by_prompt: dict[str, list[Sample]] = defaultdict(list)
        for sample in samples:
            by_prompt[sample.prompt_id].append(sample)
        limit = self.cfg.kafka.max_message_bytes

        def encode(record: Received[PromptRecord]) -> list[tuple[bytes, bytes]]:
            pairs = []
            for sample in by_prompt.get(record.value.id, []):
                key, value = sample.prompt_id.encode(), dumps(encode_sample(sample))
                check_output_size(value, key, limit, "sample")
                pairs.append((key, value))
            return pairs

        encoded, letters = each_record(records, encode, "encoding its samples")
        messages: list[tuple[bytes, bytes]] = []
        sent: set[str] = set()
        for record, pairs in encoded:
            if record.value.id not in sent:  # two records of one id share their samples
                sent.add(record.value.id)
                messages += pairs
        return messages, letters

    # -- sampling --------------------------------------------------------------------------

    def _sample(
        self, prompts: list[PromptRecord]
    ) -> tuple[Future[tuple[list[Sample], int]], list[tuple[int, str]]]:
        """Put the batch into the engine; when it refuses, find the prompts it cannot take.

        Returns the future of the usable prompts' (unscored) samples and their tokens,
        and (index, error) of the others. Raises EngineFailure when no prompt works and
        the engine does not answer a probe.
        """
        if not prompts:
            return done(([], 0)), []
        try:
            pending, failed = self.sampler.submit_each(prompts, self.adapter)
        except EngineDeadError as err:
            self._engine_died(err)
            raise
        except AdapterError as err:
            if self.adapter is None:
                raise
            broken = self.adapter
            self._refuse(broken.version, ENGINE_ERROR, err)
            if self._serving_key is not None:  # tried again after REFUSAL_RETRY_S
                self._refused[self._serving_key] = time.monotonic() + REFUSAL_RETRY_S
            if self.cfg.store.pinned_version is None:
                self._follow()  # the ledger's next candidate that loads
            if self.adapter is broken:  # pinned, or nothing else loads: the base model
                self._now_serving(None)
                self._serving_key = None
            return self._sample(prompts)
        self._check_engine(failed, len(prompts))
        return pending, failed

    def _check_engine(self, failed: list[tuple[int, str]], prompts: int) -> None:
        """Raise EngineFailure when every prompt failed and the engine fails a probe."""
        if prompts and len(failed) == prompts and not self._engine_answers():
            raise EngineFailure(f"the engine fails every prompt and a probe: {failed[0][1]}")

    def _engine_died(self, err: EngineDeadError) -> None:
        """Nothing more can be sampled in this process: count it (once: every batch in
        flight fails with it); the role fails and its supervisor restarts the process
        (the batches in flight are redone, uncommitted)."""
        if not self._death_counted:
            self._death_counted = True
            self.metrics.count_engine_death(err.death.signal)

    def _engine_answers(self) -> bool:
        try:
            self.generator.generate([self.formatter.text(PROBE_PROMPT)], PROBE, None)
        except Exception:
            log.exception("the engine does not answer a probe")
            return False
        return True

    def _observe(self, scored: ScoredBatch) -> None:
        m = self.metrics
        m.samples_generated_total.inc(len(scored.samples))
        m.samples_kept_total.inc(len(scored.selection.kept))
        for reason, count in scored.selection.rejected_by_reason.items():
            m.count_rejected(reason, count)
        if not scored.samples:
            return
        m.observe_generation(scored.tokens)
        m.observe_responses([s.response for s in scored.samples])
        # By the version that made each sample: a batch may have fallen back mid-way.
        by_version: dict[int, list[Sample]] = defaultdict(list)
        for sample in scored.samples:
            if sample.reward is not None:
                by_version[sample.adapter_version].append(sample)
        for version, samples in sorted(by_version.items()):
            values = [s.reward for s in samples if s.reward is not None]
            m.observe_rewards(values, version, generated_at=_first_generated(samples))
            if self.live is not None:
                with self._live_lock:
                    self.live.observe(version, values)

    # -- adapters --------------------------------------------------------------------------

    def _schedule_adapter_check(
        self, pipeline: BatchPipeline[PromptRecord, ScoredBatch], feed: AdapterFeed
    ) -> None:
        """When the adapters topic brought something (and every
        ``daemon.adapter_poll_interval_s``, for refused versions to be tried again), queue
        a look on the engine stage: between batches, so a new version serves the batches
        sampled after it is loaded (each batch also looks first). Raises what the last
        look raised."""
        check = self._adapter_check
        if check is not None:
            if not check.done():
                return
            self._adapter_check = None
            check.result()
        now = time.monotonic()
        if now < self._next_adapter_check and not feed.pending.is_set():
            return
        self._next_adapter_check = now + self.cfg.daemon.adapter_poll_interval_s
        self._adapter_check = pipeline.run_on_engine(functools.partial(self._check_adapters, feed))

    def _check_adapters(self, feed: AdapterFeed) -> None:
        """On the engine stage: fold what the adapters topic brought, and follow it."""
        self._receive(feed.take())
        if self.cfg.store.pinned_version is None:  # pinned by config: the topic waits
            self._follow()

    def serve_pinned(self, version: int) -> bool:
        """Serve ``store.pinned_version`` from the store (the topic is not followed); a
        version the gate rejected is refused (``gate_rejected``). False: refused."""
        root = adapter_store_root(self.cfg)
        announcement = stored_announcement(root, version, self.trust.key)
        return self._switch(announcement, rejected=announcement.verdict == "rejected") is None

    def _receive(self, records: list[Received[AdapterAnnouncement | AdapterAction]]) -> None:
        """Fold the adapters topic's new messages into the ledger; a message that fails
        its claims (signature, base model, lineage) is refused, counted and skipped."""

        def refused(message: AdapterAnnouncement | AdapterAction, err: AdapterFetchError) -> None:
            self._refuse(message.version or 0, err.reason, err)

        target = self.ledger.target()
        messages = [record.value for record in records]
        with self._ledger_lock:  # the loop's live-rollback check reads it
            applied = fold_checked(self.ledger, messages, self.trust, refused)
        for action in applied:
            self._record(action)
        if records and self.ledger.target() != target:
            # When the broker got the last of them: the message that moved the target.
            self._target_moved_at = records[-1].timestamp_ms / 1000

    def _record(self, action: AdapterAction) -> None:
        log.info(
            "adapter action",
            extra={
                "action": action.action,
                "adapter_version": action.version,
                "from_version": action.from_version,
                "trigger": action.trigger,
                "by": action.by,
                "at": action.at,
                "reason": action.reason,
            },
        )
        if self.ready:  # not the history replayed at start
            self.metrics.count_adapter_action(action.action, action.trigger)

    def _follow(self) -> None:
        """Serve the ledger's target, or the best candidate after it that loads; stay on
        the served version when it comes first, unless it failed in the engine
        (serving.ServingLedger.candidates)."""
        now = time.monotonic()
        for version in self.ledger.candidates():
            failed = self._refused.get(self._serving_key or (), 0.0) > now
            if (version == self.served_version and not failed) or self._serve(version):
                return

    def _serve(self, version: int) -> bool:
        """Switch to ``version`` (an announcement of it that was not refused, or refused
        for a reason that may pass and long enough ago); False: none could serve."""
        if version == BASE_VERSION:
            self._now_serving(None)
            self._serving_key = None
            log.info("serving the base model", extra={"previous_version": self._previous_version})
            return True
        rejected = self.ledger.rejected(version)
        now = time.monotonic()
        for announcement in reversed(self.ledger.announced.get(version, [])):
            key = (*_identity(announcement), rejected)  # a promotion makes it a new case
            if self._refused.get(key, 0.0) > now:
                continue
            reason = self._switch(announcement, rejected=rejected)
            if reason is None:
                self._serving_key = key
                return True
            retry = REFUSAL_RETRY_S if reason in (FETCH_FAILED, ENGINE_ERROR) else math.inf
            self._refused[key] = now + retry
        return False

    def _switch(self, announcement: AdapterAnnouncement, *, rejected: bool) -> str | None:
        """Fetch, verify and load a version; the next batch uses it. Returns why it was
        refused (one of REFUSAL_REASONS), or None."""
        if rejected:  # a pin too: a rejected version serves only once an operator promotes it
            self._refuse(
                announcement.version,
                GATE_REJECTED,
                AdapterError("the promotion gate rejected this version"),
            )
            return GATE_REJECTED
        started = time.perf_counter()
        phases: dict[str, float] = {}
        if self._target_moved_at is not None:
            phases["detect"] = time.time() - self._target_moved_at
        try:
            adapter = fetch_adapter(announcement, self.trust, phases)
        except AdapterFetchError as err:
            self._refuse(announcement.version, err.reason, err)
            return err.reason
        try:
            # Load it now, not in the next batch: a bad folder fails here, and a batch
            # never pays for the load.
            loading = time.perf_counter()
            self.generator.generate([self.formatter.text(PROBE_PROMPT)], PROBE, adapter)
            phases["load"] = time.perf_counter() - loading
            self._loaded_at = (adapter.version, time.time())
        except Exception as err:  # the engine raises assorted types for a bad adapter
            self._refuse(announcement.version, ENGINE_ERROR, err)
            return ENGINE_ERROR
        for phase, seconds in phases.items():
            self.metrics.observe_swap_phase(phase, seconds)
        self._target_moved_at = None
        # Only a verified version is recorded: a forged one must not move the gauge.
        self.metrics.set_stored_version(adapter.version, adapter.created_at)
        self._now_serving(adapter)
        log.info(
            "serving an adapter version",
            extra={
                "adapter_version": adapter.version,
                "previous_version": self._previous_version,
                "load_s": round(time.perf_counter() - started, 3),
                "since_stored_s": round(time.time() - adapter.created_at, 3),
                "phases_s": {phase: round(seconds, 3) for phase, seconds in phases.items()},
            },
        )
        return None

    def _now_serving(self, adapter: AdapterVersion | None) -> None:
        self._previous, self.adapter = self.adapter, adapter
        self.metrics.set_served_version(self.served_version)
        if self.live is not None:
            with self._live_lock:  # the engine stage switches, the loop observes
                self.live.served(self.served_version)

    @property
    def _previous_version(self) -> int:
        return self._previous.version if self._previous is not None else BASE_VERSION

    def _watch_live_reward(self, clients: StreamClients[PromptRecord]) -> None:
        """Roll back, on every replica, a version whose live reward regressed: send the
        rollback on the adapters topic, and follow it from there like any action."""
        with self._live_lock:
            regression = self.live.regression() if self.live is not None else None
        lineage = self.trust.lineage()
        if regression is None or lineage is None or self._rolled_back == regression.version:
            return
        with self._ledger_lock:  # the engine stage folds into it
            may = self.ledger.may_roll_back(regression.version)
        if not may:
            return  # pinned, already rolled back, or promoted by an operator
        reason = regression.describe(self.cfg.gate.rollback_margin)
        action = AdapterAction(
            action="rollback",
            version=regression.previous,
            from_version=regression.version,
            lineage=lineage,
            by=f"generator@{socket.gethostname()}/{os.getpid()}",
            at=time.time(),
            trigger="automatic",
            reason=reason,
        )
        topic = self.cfg.kafka.topics.adapters
        timeout_s = self.cfg.kafka.delivery_timeout_s
        try:
            send_action(clients.producer, topic, action, timeout_s, self.trust.key)
        except DeliveryError as err:  # tested again after the next window
            log.warning("sending a rollback failed", extra={"error": str(err), "reason": reason})
            return
        self._rolled_back = regression.version
        log.warning(
            "live reward regressed; rolling back on every replica",
            extra={
                "adapter_version": regression.version,
                "to_version": regression.previous,
                "reason": reason,
            },
        )

    def _refuse(self, version: int, reason: str, err: Exception) -> None:
        self.metrics.count_adapter_load_failure(reason)
        log.error(
            "adapter version refused; the old one keeps serving",
            extra={
                "adapter_version": version,
                "reason": reason,
                "error": str(err),
                "serving": self.served_version,
            },
        )


def _first_generated(samples: Sequence[Sample]) -> float:
    """When the engine finished the first of ``samples`` (Unix time; now when the backend
    did not say)."""
    return min((s.generated_at for s in samples if s.generated_at is not None), default=time.time())


def _identity(announcement: AdapterAnnouncement) -> tuple[object, ...]:
    """What tells two announcements of one version apart (a forged one from the real)."""
    a = announcement
    return (a.version, a.sha256, a.uri, a.lineage, a.verdict, a.signature)


@dataclass(frozen=True)
class _Samples:
    """A batch's samples (unscored), their tokens, and the seconds from its submission
    to its last sample."""

    samples: list[Sample]
    tokens: int
    generation_s: float


@dataclass(frozen=True)
class _Sampled:
    """What the engine stage hands the deliver stage: the batch is in the engine."""

    records: list[Received[PromptRecord]]
    """The batch's usable records (formatted), in poll order."""
    letters: list[DeadLetter]
    samples: Future[_Samples]
    failed: list[tuple[int, str]]
    """(index in ``records``, error) of the prompts the engine refused."""
    prompts: list[PromptRecord]
    """The formatted prompts of ``records``, as submitted."""
    adapter: AdapterVersion | None
    """The version they were submitted with."""

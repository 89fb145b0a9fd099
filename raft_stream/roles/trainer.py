"""The trainer role: samples in, a new adapter version out every time a batch fills.

The consumer loop never blocks on training: kept samples go into the top-k reward buffer
(persisted under ``daemon.state_dir``), and when a streaming batch is ready a background
thread trains the LoRA adapter on it and stores the new version. When that thread is done,
the loop (the only user of the Kafka consumer):

1. drops the trained samples from the buffer and saves the buffer;
2. commits the offsets of everything consumed so far (what is not trained yet is in the
   saved buffer, so a crash loses nothing);
3. announces the version on the adapters topic, stamped with the store's lineage and
   signed with ``adapters.signing_key_file`` when set (a crash before this is healed at the
   next start, which announces the latest version again), unless the round's thread
   already did, in one try as soon as it stored the version.

The trainer holds the adapter store's writer lock from construction until ``run`` returns:
a second trainer on the same store refuses to start (StoreLockedError names the holder),
so it can neither write versions nor take this one's sample partitions.

The trainer does not trust the ``reward`` a sample carries: a kept sample whose reward is
missing, non-finite or outside ``buffer.reward_min..reward_max`` is dead-lettered
(``reward_out_of_bounds``) and never trained on; one whose handling fails otherwise is
dead-lettered as ``internal_error``, and the loop goes on. With ``buffer.rescore`` it
scores each kept sample with its own reward first and checks that score instead.

A failed round (exception, non-finite loss, full disk) is counted and logged; its samples
stay in the buffer, the next try waits with backoff, and the model is reloaded from the
last good version, so generators keep serving that one. Memory is bounded by the buffer's
capacity (the lowest reward is evicted), and age by ``buffer.max_staleness``: a sample
generated more adapter versions ago is refused on arrival and evicted when a new version is
stored (counted, not dead-lettered).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from raft_stream.buffer import RewardBuffer, mean_reward
from raft_stream.config import RaftConfig
from raft_stream.errors import AdapterError, ConfigError, NonFiniteLossError, TrainingError
from raft_stream.gate import (
    CanaryCollector,
    CanaryFigures,
    CanaryJudge,
    Verdict,
    build_judge,
    is_canary,
    judge_on,
)
from raft_stream.learning_health import LearningHealth
from raft_stream.metrics import RaftMetrics
from raft_stream.reasons import TRAINING_FAILED
from raft_stream.rewards.registry import build_safe_reward
from raft_stream.rewards.safe import SafeReward
from raft_stream.roles.adapters import adapter_store_root, announce, signing_key
from raft_stream.roles.cpu_split import pin_this_thread
from raft_stream.roles.delivery import (
    StreamClients,
    commit_quietly,
    crash_journal,
    each_record,
    error_summary,
    join_group,
    open_clients,
    until_delivered,
)
from raft_stream.roles.lifecycle import Backoff, Shutdown, noop
from raft_stream.stream.kafka import PollBatch, Received, TopicPartition, sample_consumer
from raft_stream.stream.schema import DeadLetter, dumps, encode_sample
from raft_stream.training.lora_trainer import LoRATrainer, TrainResult, check_adapter_shape
from raft_stream.training.store import AdapterStore
from raft_stream.types import AdapterVersion, Sample

__all__ = ["AdapterStoreFailure", "TrainerRole"]

log = logging.getLogger(__name__)

POLL_TIMEOUT_S = 0.5
"""Longest wait for samples; bounds how late a finished round is noticed."""

BUFFER_FILE = "buffer.jsonl"
CANARY_FILE = "canary_prompts.jsonl"
"""Under ``daemon.state_dir``: the canary set taken from the stream (``gate.canary_share``)."""

STORE_LOCK_WAIT_S = 10.0
"""How long a starting trainer waits for the store's previous writer to let go (a killed
process's engine children can outlive it by a moment); then StoreLockedError."""


class AdapterStoreFailure(TrainingError):
    """Training worked but the version could not be stored (e.g. the disk is full)."""


def failure_reason(err: BaseException) -> str:
    """The training_failures_total reason of a failed round, from the error's class."""
    if isinstance(err, AdapterStoreFailure):
        return "store_failed"
    if isinstance(err, NonFiniteLossError):
        return "nonfinite_loss"
    if isinstance(err, MemoryError | torch.OutOfMemoryError):
        return "out_of_memory"
    return "other"


RoundWork = Callable[[list[Sample]], tuple[AdapterVersion | None, TrainResult]]
"""Trains on a streaming batch and stores the version; None when no sample could be
trained on (each is in ``TrainResult.dropped`` with its reason)."""


class _Round:
    """One training round on a daemon thread (a round abandoned at shutdown must not keep
    the process alive)."""

    def __init__(self, samples: list[Sample], work: RoundWork) -> None:
        self.samples = samples
        self.outcome: tuple[AdapterVersion | None, TrainResult] | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, args=(work,), name="raft-stream-training", daemon=True
        )
        self._thread.start()

    def _run(self, work: RoundWork) -> None:
        try:
            self.outcome = work(self.samples)
        except BaseException as err:  # reported to the loop, which decides
            self.error = err

    def done(self) -> bool:
        return not self._thread.is_alive()

    def join(self, timeout_s: float) -> bool:
        self._thread.join(max(0.0, timeout_s))
        return self.done()


class TrainerRole:
    """Consumes samples, trains in the background, stores and announces adapter versions."""

    def __init__(
        self,
        cfg: RaftConfig,
        model_path: str,
        metrics: RaftMetrics,
        shutdown: Shutdown,
        beat: Callable[[], None] = noop,
    ) -> None:
        self.cfg = cfg
        self.model_path = model_path
        self.metrics = metrics
        self.shutdown = shutdown
        self.beat = beat
        state_dir = Path(cfg.daemon.state_dir)
        self.signing_key = signing_key(cfg)
        # First: the lock fences off a second trainer before it touches any state. The
        # base model is stamped as configured, the name generators compare with theirs.
        self.store = AdapterStore(
            adapter_store_root(cfg),
            base_model=cfg.model.name_or_path,
            keep_last=cfg.store.keep_last,
            lock_wait_s=STORE_LOCK_WAIT_S,
            pinned_version=cfg.store.pinned_version,
        )
        stored = self.store.latest()
        try:
            if stored is not None:
                check_adapter_shape(stored, cfg.training)
        except ConfigError:
            self.store.close()
            raise
        # A kill during a save leaves the temporary file; this process is the only writer.
        for stale in state_dir.glob(f".{BUFFER_FILE}.*.tmp"):
            stale.unlink(missing_ok=True)
        self.buffer = RewardBuffer(
            cfg.buffer.capacity,
            cfg.buffer.batch_size,
            state_dir / BUFFER_FILE,
            reward_min=cfg.buffer.reward_min,
            reward_max=cfg.buffer.reward_max,
            max_staleness=cfg.buffer.max_staleness,
            version=stored.version if stored is not None else 0,
            on_evict=metrics.count_buffer_eviction,
            max_record_bytes=cfg.kafka.max_message_bytes,
        )
        self.reward: SafeReward | None = (
            build_safe_reward(cfg.reward) if cfg.buffer.rescore else None
        )
        """The trainer's own reward (``buffer.rescore``); None trusts the samples' field."""
        # The promotion gate (``gate.canary_prompts``, or the canary share of the stream once
        # its set is complete); None stores every version unjudged.
        self.judge: CanaryJudge | None = None
        self.canaries: CanaryCollector | None = None
        self._canary_wait_logged = -math.inf
        self._gate_reward: SafeReward | None = None
        try:
            if cfg.gate.canary_prompts is not None or cfg.gate.canary_share > 0:
                self._gate_reward = self.reward or build_safe_reward(cfg.reward)
            if cfg.gate.canary_prompts is not None:
                assert self._gate_reward is not None
                self.judge = build_judge(cfg, model_path, self._gate_reward)
            elif cfg.gate.canary_share > 0:
                self.canaries = CanaryCollector(
                    state_dir / CANARY_FILE,
                    cfg.gate.canary_stream_prompts,
                    cfg.generation.sampling,
                )
                if self.canaries.complete:
                    self._judge_the_canaries()
        except ConfigError:
            self.store.close()
            for reward in {id(r): r for r in (self.reward, self._gate_reward) if r}.values():
                reward.close()
            raise
        self.health = LearningHealth(cfg.training.stall_rounds)
        """Loss and mean reward of the rounds: warns when learning stalls."""
        self.ready = False
        self.rounds = 0
        self.failures = 0
        self.last_announced: AdapterVersion | None = None
        self._announced_early: int | None = None
        """The version the round thread announced itself (read once the round ended)."""
        self._trainer: LoRATrainer | None = None
        self._round: _Round | None = None
        self._consumed: dict[TopicPartition, int] = {}
        self._served_seen: dict[int, float] = {}
        """Adapter version -> when a consumed sample last showed it served (monotonic s)."""
        self._may_commit = True
        self._retry_at = 0.0
        self._backoff = Backoff(initial_s=2.0, max_s=60.0)
        self._failed_batch: tuple[frozenset[int], int] = (frozenset(), 0)
        """(ids of a streaming batch's samples, rounds in a row that failed on it)."""
        self.training_cores: tuple[int, ...] | None = None
        """Cores the training rounds run on (all-in-one on the CPU); None: any."""

    # -- the loop --------------------------------------------------------------------------

    def run(self) -> None:
        """Serve until shutdown, then drain: wait for a running round within the grace
        period, save the buffer and commit what it holds; then release the store."""
        try:
            self._serve()
        finally:
            self.store.close()
            if self.reward is not None:
                self.reward.close()
            if self._gate_reward is not None and self._gate_reward is not self.reward:
                self._gate_reward.close()

    def _serve(self) -> None:
        self._trainer = self._load_trainer()
        topics = self.cfg.kafka.topics
        clients = open_clients(
            self.cfg.kafka,
            [topics.samples, topics.adapters, topics.dead_letter],
            lambda kafka: sample_consumer(
                kafka, crash_journal(self.cfg, kafka.trainer_group, topics.samples)
            ),
            self.metrics.count_dead_letter,
            self.shutdown,
            self.beat,
        )
        if clients is None:
            return
        try:
            latest = self._last_good_version()
            # The version training resumes from: the saved samples' staleness counts from it.
            self.buffer.set_version(latest.version if latest is not None else 0)
            if latest is not None:  # generators that missed it catch up
                self.metrics.set_stored_version(latest.version, latest.created_at)
                self._announce(clients, latest)
            if not join_group(clients.consumer, self.shutdown, self.beat):
                return
            self.ready = True
            self._observe_buffer()
            log.info(
                "trainer serving",
                extra={
                    "adapter_version": latest.version if latest else 0,
                    "buffer": len(self.buffer),
                },
            )
            while not self.shutdown.requested:
                self.beat()
                if self._round is not None and self._round.done():
                    self._finish_round(clients)
                batch = clients.consumer.poll(POLL_TIMEOUT_S)
                if len(batch):
                    self._take(batch, clients)
                self._maybe_start_round(clients)
                self.metrics.consumer_lag_messages.labels(topic=topics.samples).set(
                    clients.consumer.lag()
                )
            self._drain(clients)
        finally:
            self.ready = False
            clients.close()
            log.info("trainer stopped", extra={"rounds": self.rounds, "failures": self.failures})

    def _canary_set_ready(self) -> bool:
        """True unless rounds wait for the canary set (``gate.canary_share``); says so in
        the log once a minute while a batch waits."""
        if self.canaries is None or self.canaries.complete:
            return True
        now = time.monotonic()
        if now >= self._canary_wait_logged + 60:
            self._canary_wait_logged = now
            log.warning(
                "a training batch waits for the canary set: the stream has brought too few "
                "canary prompts yet (about canary_stream_prompts / canary_share distinct "
                "prompts are needed)",
                extra={
                    "canary_prompts": len(self.canaries.prompts),
                    "needed": self.canaries.size,
                    "canary_share": self.cfg.gate.canary_share,
                },
            )
        return False

    def _judge_the_canaries(self) -> None:
        assert self.canaries is not None and self._gate_reward is not None
        records = list(self.canaries.prompts.values())
        self.judge = judge_on(self.cfg, self.model_path, self._gate_reward, records)
        log.info(
            "the canary set is complete: the promotion gate judges every version from now on",
            extra={"canary_prompts": len(records), "file": str(self.canaries.path)},
        )

    def _set_canaries_aside(self, records: list[Received[Sample]]) -> list[Received[Sample]]:
        """The records to train on: those of canary prompts (``gate.canary_share``) are
        never trained on; their prompts fill the canary set until it is complete."""
        share = self.cfg.gate.canary_share
        if self.canaries is None:
            return records
        canary = [r for r in records if is_canary(r.value.prompt_id, share)]
        if canary and self.canaries.offer(r.value for r in canary):
            self._judge_the_canaries()
        return [r for r in records if not is_canary(r.value.prompt_id, share)]

    def _take(self, batch: PollBatch[Sample], clients: StreamClients[Sample]) -> None:
        """Buffer the kept samples of a poll (rejected ones are only for observers; those
        of canary prompts are set aside); a kept sample the buffer refuses, or whose
        handling fails, is dead-lettered."""
        records = self._set_canaries_aside(batch.records)
        kept_records = [r for r in records if r.value.reject_reason is None]
        if self.reward is not None:
            kept_records = self._rescore(kept_records)
        admitted, refused = each_record(
            kept_records, lambda r: self.buffer.check(r.value), "admitting the sample"
        )
        letters = [*batch.dead, *refused]
        if letters and not until_delivered(
            lambda timeout_s: clients.dead_letters.write(letters, timeout_s),
            self.cfg.kafka.delivery_timeout_s,
            self.shutdown,
            self.beat,
            "dead_letters",
            self.metrics,
        ):
            self._may_commit = False  # their offsets must not be committed
            return
        seen_at = time.monotonic()
        self._served_seen.update((r.value.adapter_version, seen_at) for r in batch.records)
        dropped = self.buffer.add(sample for _, sample in admitted)
        if dropped:
            log.debug("buffer full: lowest rewards evicted", extra={"evicted": len(dropped)})
        for tp, offset in batch.last_offsets().items():
            self._consumed[tp] = max(offset, self._consumed.get(tp, -1))
        self._observe_buffer()

    def _rescore(self, records: list[Received[Sample]]) -> list[Received[Sample]]:
        """Replace each sample's reward by the trainer's own; the records it scored (one
        it could not score is rejected with SafeReward's reason and counted)."""
        assert self.reward is not None
        samples = [r.value for r in records]
        outcomes = self.reward.score([s.prompt for s in samples], [s.response for s in samples])
        scored = []
        for record, outcome in zip(records, outcomes, strict=True):
            if outcome.reason is not None:
                self.metrics.count_rejected(outcome.reason)
                continue
            record.value.reward = outcome.reward
            scored.append(record)
        return scored

    def _maybe_start_round(self, clients: StreamClients[Sample]) -> None:
        if (
            self._round is None
            and not self.shutdown.requested
            and time.monotonic() >= self._retry_at
            and self.buffer.batch_ready()
            and self._canary_set_ready()
        ):
            served = self._versions_served()
            batch = self.buffer.peek_batch()
            self.metrics.observe_staleness(self.buffer.staleness(s) for s in batch)
            self._round = _Round(
                batch, lambda samples: self._train_and_store(samples, served, clients)
            )

    def _versions_served(self) -> frozenset[int]:
        """Versions of the samples consumed within ``store.served_window_s``: generators
        serve them, so retention keeps them."""
        horizon = time.monotonic() - self.cfg.store.served_window_s
        self._served_seen = {v: t for v, t in self._served_seen.items() if t >= horizon}
        return frozenset(self._served_seen)

    def _finish_round(self, clients: StreamClients[Sample]) -> None:
        done, self._round = self._round, None
        assert done is not None
        if done.outcome is None:
            err = done.error or TrainingError("the training thread ended without a result")
            self._fail(err)
            if self._count_failed_round(done.samples, err) >= self.cfg.training.max_failed_rounds:
                self._dead_letter_batch(clients, done.samples, err)
            # The buffer still holds every consumed sample: save it and commit.
            self._persist_and_commit(clients)
            return
        adapter, result = done.outcome
        self._failed_batch = (frozenset(), 0)
        self._backoff.reset()
        # Samples it could not train on go to the dead-letter topic; should shutdown come
        # first, they stay buffered (and are dropped again next time).
        undelivered = (
            {id(sample) for sample, _, _ in result.dropped}
            if result.dropped and not self._dead_letter_samples(clients, list(result.dropped))
            else set()
        )
        self.buffer.remove(s for s in done.samples if id(s) not in undelivered)
        if adapter is None:  # nothing in the batch could be trained on: no new version
            self._observe_buffer()
            self._persist_and_commit(clients)
            return
        self.rounds += 1
        self.metrics.count_training_samples(
            sampled=result.samples - result.retokenized, retokenized=result.retokenized
        )
        self.metrics.observe_training_round(
            steps=result.optimizer_steps,
            tokens=result.tokens,
            seconds=result.duration_s,
            loss=result.loss,
        )
        trend = self.health.observe(result.loss, mean_reward(done.samples))
        if trend is not None:
            self.metrics.learning_stalled.set(float(trend.stalled))
        self.metrics.set_stored_version(adapter.version, adapter.created_at)
        # Staleness counts from what may be served: a rejected version never is, and the
        # next round resumes from the promoted one (``latest``).
        promoted = adapter if adapter.verdict != "rejected" else self.store.latest()
        stale = self.buffer.set_version(promoted.version if promoted else 0)
        log.info(
            "stored a new adapter version",
            extra={
                "adapter_version": adapter.version,
                "loss": result.loss,
                "samples": len(done.samples),
                "stale_evicted": len(stale),
                "train_s": round(result.duration_s, 3),
            },
        )
        self._observe_buffer()
        self._persist_and_commit(clients)
        if self._announced_early == adapter.version:
            self._announced(adapter)
        else:
            self._announce(clients, adapter)

    def _drain(self, clients: StreamClients[Sample]) -> None:
        if self._round is not None:
            # Leave a little of the grace period for saving, committing and closing.
            if self._round.join(self.shutdown.remaining_s() - 2.0):
                self._finish_round(clients)
            else:
                log.warning("abandoning a training round still running at the grace deadline")
                self._round = None  # its samples are still in the buffer
        self._persist_and_commit(clients)

    # -- state -----------------------------------------------------------------------------

    def _persist_and_commit(self, clients: StreamClients[Sample]) -> None:
        """Save the buffer, then commit everything consumed: every consumed sample is now
        trained into a stored version, waiting in the saved buffer, or deliberately gone
        (rejected, or evicted for a lower reward or for staleness)."""
        try:
            self.buffer.save()
        except OSError as err:
            log.error("saving the buffer failed; not committing", extra={"error": str(err)})
            return
        committable = self._consumed and self._may_commit
        if committable and commit_quietly(
            clients.consumer, self._consumed, "samples", self.metrics
        ):
            self._consumed = {}

    def _send_announcement(
        self, clients: StreamClients[Sample], adapter: AdapterVersion, timeout_s: float
    ) -> None:
        """One try at announcing ``adapter``; raises what ``announce`` raises."""
        announce(
            clients.producer, self.cfg.kafka.topics.adapters, adapter, timeout_s, self.signing_key
        )

    def _announce(self, clients: StreamClients[Sample], adapter: AdapterVersion) -> None:
        if until_delivered(
            lambda timeout_s: self._send_announcement(clients, adapter, timeout_s),
            self.cfg.kafka.delivery_timeout_s,
            self.shutdown,
            self.beat,
            "adapter_announcement",
            self.metrics,
        ):
            self._announced(adapter)

    def _announced(self, adapter: AdapterVersion) -> None:
        self.last_announced = adapter
        log.info("announced adapter version", extra={"adapter_version": adapter.version})

    def _observe_buffer(self) -> None:
        held = self.buffer.snapshot()
        self.metrics.buffer_samples.set(len(held))
        self.metrics.buffer_capacity.set(self.buffer.capacity)
        if held:
            self.metrics.kept_reward_mean.set(mean_reward(held))

    # -- training (background thread) -----------------------------------------------------

    def _train_and_store(
        self, samples: list[Sample], served: frozenset[int], clients: StreamClients[Sample]
    ) -> tuple[AdapterVersion | None, TrainResult]:
        """Train, judge and store a version, and try once to announce it right away: the
        loop notices a finished round only at its next turn (up to POLL_TIMEOUT_S later),
        and generators would wait for it. A failed try is left to the loop, which
        announces what was not (``_finish_round``), with its retries and errors."""
        if self.training_cores is not None:
            pin_this_thread(self.training_cores)
        trainer = self._trainer or self._load_trainer()
        self._trainer = trainer
        result = trainer.train(samples)
        if result.optimizer_steps == 0:
            return None, result
        verdict = None
        if self.judge is not None:
            promoted = self.store.latest()
            verdict = self.judge.judge(
                trainer, CanaryFigures.from_metrics(promoted.metrics) if promoted else None
            )
        try:
            adapter = self.store.write(
                trainer.save,
                metrics={
                    "loss": result.loss,
                    "samples": float(result.samples),
                    "reward_mean": mean_reward(samples),
                    "train_tokens_per_s": result.tokens_per_s,
                    **(verdict.candidate.as_metrics() if verdict else {}),
                },
                served=served,
                verdict=verdict.name if verdict else None,
            )
        except Exception as err:  # OSError, or torch/safetensors wrapping one
            raise AdapterStoreFailure(f"storing the adapter failed: {err}") from err
        if verdict is not None:
            self._observe_verdict(adapter, verdict)
        if not self.shutdown.requested:  # the drain must not wait on the broker for it
            try:
                self._send_announcement(clients, adapter, self.cfg.kafka.delivery_timeout_s)
                self._announced_early = adapter.version
            except Exception as err:  # the loop announces it, with its retries and errors
                log.info("announcing from the round failed", extra={"error": repr(err)})
        return adapter, result

    def _observe_verdict(self, adapter: AdapterVersion, verdict: Verdict) -> None:
        """Count and log a verdict; a rejected round is discarded: the next one resumes
        from the newest promoted version (``latest``), adapter and optimizer state."""
        self.metrics.observe_verdict(verdict)
        log.log(
            logging.INFO if verdict.promoted else logging.WARNING,
            "promotion gate: %s v%d",
            verdict.name,
            adapter.version,
            extra={
                "adapter_version": adapter.version,
                "verdict": verdict.name,
                "criterion": verdict.criterion,
                "detail": verdict.detail,
            },
        )
        if not verdict.promoted:
            self._trainer = None

    def _fail(self, err: BaseException) -> None:
        reason = failure_reason(err)
        self.failures += 1
        self.metrics.count_training_failure(reason)
        # The model may hold part of the failed round's update: reload the last good one.
        self._trainer = None
        wait_s = self._backoff.next_s()
        self._retry_at = time.monotonic() + wait_s
        log.error(
            "training round failed; samples kept, the last good adapter keeps serving",
            extra={"reason": reason, "error": repr(err), "retry_in_s": round(wait_s, 2)},
            exc_info=err,
        )

    def _count_failed_round(self, samples: list[Sample], err: BaseException) -> int:
        """Rounds in a row that failed on this same batch (a store failure counts none)."""
        if isinstance(err, AdapterStoreFailure):
            return 0
        key = frozenset(id(s) for s in samples)
        failed_key, count = self._failed_batch
        count = count + 1 if key == failed_key else 1
        self._failed_batch = (key, count)
        return count

    def _dead_letter_batch(
        self, clients: StreamClients[Sample], samples: list[Sample], err: BaseException
    ) -> None:
        """Dead-letter a batch that fails every round, drop it from the buffer, go on."""
        rounds = self.cfg.training.max_failed_rounds
        detail = f"{rounds} training rounds failed on its batch: {error_summary(err)}"
        if not self._dead_letter_samples(
            clients, [(sample, TRAINING_FAILED, detail) for sample in samples]
        ):
            return  # shutdown first: the batch stays buffered
        self.buffer.remove(samples)
        self._failed_batch = (frozenset(), 0)
        self._backoff.reset()
        self._retry_at = 0.0
        self._observe_buffer()

    def _dead_letter_samples(
        self, clients: StreamClients[Sample], dead: list[tuple[Sample, str, str]]
    ) -> bool:
        """Send (sample, reason, detail) from the buffer to the dead-letter topic (partition
        and offset -1: their records are committed already); False when shutdown came first."""
        letters = [
            DeadLetter(
                reason=reason,
                detail=detail,
                topic=self.cfg.kafka.topics.samples,
                partition=-1,
                offset=-1,
                timestamp_ms=-1,
                value=dumps(encode_sample(sample)),
                key=sample.prompt_id.encode(),
            )
            for sample, reason, detail in dead
        ]
        return until_delivered(
            lambda timeout_s: clients.dead_letters.write(letters, timeout_s),
            self.cfg.kafka.delivery_timeout_s,
            self.shutdown,
            self.beat,
            "dead_letters",
            self.metrics,
        )

    def _load_trainer(self) -> LoRATrainer:
        """The model with the last good version's adapter and optimizer state (or fresh)."""
        good = self._last_good_version()
        log.info("loading the trainer", extra={"resume_from": good.version if good else 0})
        return LoRATrainer(
            self.model_path,
            self.cfg.training,
            resume_from=good,
            trust_remote_code=self.cfg.model.trust_remote_code,
        )

    def _last_good_version(self) -> AdapterVersion | None:
        """The ``latest`` version if it verifies, else the newest older one that does."""
        latest = self.store.latest()
        if latest is None:
            return None
        for version in sorted(
            (v for v in self.store.versions() if v <= latest.version), reverse=True
        ):
            try:
                stored = self.store.get(version, verify=True)
            except (AdapterError, OSError) as err:
                log.error("stored adapter version fails verification", extra={"error": str(err)})
                continue
            if stored.verdict != "rejected":  # the promotion gate's rejects are never resumed
                return stored
        return None

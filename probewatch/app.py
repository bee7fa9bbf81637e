"""The application: wires source → decoder → detectors → storage → alerting, one micro-batch at a time.

Checkpoint order per batch (the Quix Streams / Kafka Streams order): dead letters flushed →
scores, alerts and stats written to ClickHouse → session state checkpointed with the batch's source
positions → offsets committed → alerts handed to the receivers. A crash anywhere replays the batch;
replayed writes collapse in ClickHouse (deterministic keys) and records already folded into a
checkpoint are skipped, so nothing is lost and nothing is counted twice.

With ``kafka.processing_guarantee = "exactly_once"`` (Kafka Streams' exactly_once_v2) the order is:
scores, alerts and stats written to ClickHouse (idempotent, as above) → one Kafka transaction with
the dead letters, the checkpoint and the source offsets → alerts handed to the receivers. A batch
whose transaction aborts leaves nothing visible to read_committed readers and is processed again from
the committed offsets and state, so its dead letters are produced once too.

Either way, a batch commits only if the worker is still the group member it was when the batch was
polled. If the group rebalanced meanwhile (the worker thrown out, say), the batch's partitions may
have gone to a worker that restored their state from the checkpoints committed so far: the batch
commits nothing and the worker rewinds to the committed offsets and state. Under exactly-once the
broker checks it too (the offsets go with the membership the batch was polled under).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import signal
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from itertools import pairwise
from types import FrameType
from typing import Any

import msgspec
from kafka.errors import KafkaError

from alerting.alert import ROLLUP_KIND, Alert
from alerting.dispatch import DeliverySettings, Dispatcher
from alerting.outbox import StoreOutbox
from alerting.policy import AlertPolicy, PolicySettings, rollup_slot
from alerting.sinks import AlertSink
from detectors.engine import SessionDetector
from detectors.scores import SessionScore
from ingest.deadletter import DeadLetterSink
from ingest.records import RecordDecoder, SourcePosition
from ingest.sources import AssignmentLost, RawMessage, Source
from ingest.transactions import KafkaTransactions, ProducerFenced, TransactionAborted
from probewatch.changelog import StateBackend
from probewatch.config import Config
from probewatch.metrics import PipelineMetrics
from probewatch.population_log import KafkaPopulationLog
from storage import BatchStats, StorageError, Store, StoredBatch

log = logging.getLogger("probewatch")

# Checkpoint entries under this partition are model-wide (population baselines), not per client.
POPULATION_PARTITION = -1


# The stages of a batch, timed (RunSummary.stage_seconds, the probewatch_stage_seconds metric):
# decoding and validating; the detectors, baselines and alert policy; dead letters and results to
# storage; checkpoint and offsets (with exactly-once, the dead letters too: they are in the transaction).
PIPELINE_STAGES = ("decode", "detect", "store", "commit")


class RunSummary(msgspec.Struct):
    records_read: int = 0
    dead_lettered: int = 0
    skipped_replayed: int = 0
    sessions_scored: int = 0
    alerts: int = 0
    batches: int = 0
    late_records: int = 0
    elapsed_s: float = 0.0
    open_sessions: int = 0
    state_bytes: int = 0
    dlq_reasons: dict[str, int] = msgspec.field(default_factory=dict)
    top_sessions: list[SessionScore] = msgspec.field(default_factory=list)
    # Seconds spent per stage of the batches (PIPELINE_STAGES); the rest of elapsed_s is reading the source.
    stage_seconds: dict[str, float] = msgspec.field(default_factory=lambda: dict.fromkeys(PIPELINE_STAGES, 0.0))

    @property
    def events_per_s(self) -> float:
        return self.records_read / self.elapsed_s if self.elapsed_s > 0 else 0.0


ProgressCallback = Callable[["RunSummary", Source], None]


def reason_class(reason: str) -> str:
    """A short, low-cardinality label for a dead-letter reason (for counts and dashboards)."""
    head = reason.split(":", 1)[0] if reason.startswith(("not valid JSON", "contract violation")) else reason
    return head.split(" - at ", 1)[0][:80]


class Pipeline:
    """Runs micro-batches until the source ends or a stop is requested (SIGINT / SIGTERM)."""

    def __init__(
        self,
        config: Config,
        store: Store,
        dead_letters: DeadLetterSink,
        sinks: list[AlertSink],
        *,
        state: StateBackend | None,
        detector: SessionDetector | None = None,
        progress: ProgressCallback | None = None,
        worker_id: str | None = None,
        transactions: KafkaTransactions | None = None,
        population_log: KafkaPopulationLog | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.dead_letters = dead_letters
        self.sinks = sinks
        # Where session state is checkpointed (None: not at all, e.g. a file run, which is a replay).
        self.state = state
        self.progress = progress
        self.worker_id = worker_id or new_worker_id(config)
        # Exactly-once: the producer of `dead_letters` and `state`, whose output and the source's
        # offsets are committed together per batch (None: at least once).
        self.transactions = transactions
        # Where the workers of the group share their population baselines (None: each its own).
        self.population_log = population_log
        # Read the population log from the restored baselines' offset, to its end, before the next batch.
        self._population_resync = True
        self.decoder = RecordDecoder(
            max_record_bytes=config.limits.max_record_bytes,
            max_vector_len=config.limits.max_vector_len,
            max_classes=config.limits.max_classes,
            max_string_len=config.limits.max_string_len,
            input_dims=config.detection.input_dims,
        )
        self.detector = detector or SessionDetector(
            alert_threshold=config.detection.alert_threshold,
            min_queries=config.detection.min_queries,
            group_v4_prefix=config.detection.group_v4_prefix,
            group_v6_prefix=config.detection.group_v6_prefix,
            # Group ids name a network: where source IPs are stored hashed, so are they.
            network_label=store.stored_ip if config.storage.hash_source_ips else None,
            inactivity_gap_s=config.sessions.inactivity_gap_s,
            client_ttl_s=config.sessions.client_ttl_s,
            allowed_lateness_s=config.sessions.allowed_lateness_s,
            max_open_sessions=config.sessions.max_open_sessions,
            checkpointing=state is not None,
            shared_population=population_log is not None,
            worker_id=self.worker_id,
        )
        self.policy = AlertPolicy(policy_settings(config))
        # Alerts are in the outbox (written by write_batch) before they are handed to the dispatcher,
        # which delivers them in the background; what it could not deliver it finds there again.
        self.outbox = StoreOutbox(store, redeliver_max_age_s=config.alerting.redeliver_max_age_s)
        self.dispatcher = Dispatcher(sinks, self.outbox, delivery_settings(config))
        self.summary = RunSummary()
        # Next source offset not yet folded into the checkpointed state, per partition.
        self.applied_positions: dict[int, int] = {}
        self._version = time.time_ns()
        self._source: Source | None = None
        self._dlq_reasons: Counter[str] = Counter()
        self._population_restored = False
        self._owned_partitions: set[int] = set()  # whose state this worker holds (Kafka)
        self._shared_for: frozenset[int] = frozenset()  # the partitions of the last _follow_stream_share
        self.metrics = PipelineMetrics()
        self.metrics.watch_alert_delivery(self.dispatcher.stats)
        self._last_gauges = 0.0

    # ------------------------------------------------------------------ partition ownership (Kafka)
    def on_partitions_assigned(self, partitions: list[int]) -> None:
        if self.state is None:
            return
        # Partition -1 holds model-wide state (population baselines); it is restored once, on the
        # first assignment, and never dropped, since every partition's sessions are scored against it.
        wanted = list(partitions) if self._population_restored else [*partitions, POPULATION_PARTITION]
        self._population_resync = self._population_resync or not self._population_restored
        self._population_restored = True
        states, positions = self.state.load_state(wanted, progress=self.metrics.progressed)
        for partition in wanted:
            self.detector.restore(partition, states.get(partition, {}))
            if partition in positions:
                self.applied_positions[partition] = positions[partition]
        restored = sum(len(v) for v in states.values())
        log.info("restored %d state entries for partitions %s (positions %s)", restored, partitions, positions)
        self._restore_incidents(partitions)
        self._owned_partitions.update(partitions)

    def _restore_incidents(self, partitions: list[int]) -> None:
        """Rebuild the open incidents of the clients whose state this worker now owns from the outbox
        (a shared source group's go with its home partition, a storm roll-up with the partition it
        names), and have receivers that re-send active alerts adopt them."""
        settings = self.policy.settings
        horizon = 2 * max(settings.cooldown_s, settings.renotify_s, settings.resolve_after_s) + 3600.0
        try:
            stored = self.outbox.latest_alerts(horizon)
        except Exception as exc:  # alerting must not stop the pipeline from starting
            log.error("cannot read open incidents from the outbox: %s", exc)
            return
        owned = set(partitions)

        def keep(alert: Alert) -> bool:
            return self._incident_partition(alert.model_id, alert.client_id, alert.kind) in owned

        count = self.policy.restore(stored, keep)
        self.dispatcher.seed(self.policy.open_alerts())
        log.info("restored %d open incidents for partitions %s from the outbox", count, partitions)

    def on_partitions_revoked(self, partitions: list[int]) -> None:
        # Every batch was checkpointed before the poll that revokes, so the state can simply go.
        gone = set(partitions)
        handed_over = self.policy.forget(lambda *incident: self._incident_partition(*incident) in gone)
        self.dispatcher.forget(handed_over)  # the new owner restores and refreshes these incidents
        self.detector.drop_partitions(partitions)
        for partition in partitions:
            self.applied_positions.pop(partition, None)
        self._owned_partitions.difference_update(partitions)

    def _incident_partition(self, model_id: str, client_id: str, kind: str) -> int | None:
        """The partition an incident goes with: a storm roll-up's own, or its client's (a source
        group's home partition); None if no partition holds it here."""
        if kind == ROLLUP_KIND:
            return rollup_slot(client_id)
        return self.detector.partition_of(model_id, client_id)

    def _follow_stream_share(self, source: Source) -> None:
        """Tell the detector and the alert policy which share of the stream this worker reads (its
        partitions of the topic's): it places the epochs of shared baselines, and this worker's part
        of the page budget. Kept while it owns none: the share it had is the best guess for its next
        assignment."""
        if not self._owned_partitions or self._owned_partitions == self._shared_for:
            return
        self._shared_for = frozenset(self._owned_partitions)
        owned, total = len(self._shared_for), source.partition_count()
        share = min(1.0, owned / total)
        log.info("this worker reads %d of the topic's %d partitions", owned, total)
        self.detector.set_stream_share(share)
        self.policy.share_pages(share, min(self._shared_for))

    # ----------------------------------------------------------------------------------------- run
    def run(self, source: Source) -> RunSummary:
        self._source = source
        self.metrics.ready = True
        self.dispatcher.start()  # at once: it delivers what the outbox holds undelivered
        started = time.monotonic()
        last_progress = 0.0
        with _stop_on_signals(source), streaming_gc():
            for batch in source.batches():
                self.process_batch(batch, source)
                now = time.monotonic()
                self.summary.elapsed_s = now - started
                if self.progress and now - last_progress >= 0.5:
                    last_progress = now
                    self.progress(self.summary, source)
        self.summary.elapsed_s = time.monotonic() - started
        self.summary.late_records = self.detector.late_records
        self.summary.open_sessions = len(self.detector.sessions)
        self.summary.state_bytes = self.detector.state_bytes()
        self.summary.dlq_reasons = dict(self._dlq_reasons.most_common())
        self.summary.top_sessions = self.detector.top_sessions(10)
        if self.progress:
            self.progress(self.summary, source)
        return self.summary

    def process_batch(self, batch: list[RawMessage], source: Source) -> list[Alert]:
        started = time.perf_counter()
        max_offsets: dict[int, int] = {}
        fresh: list[tuple[bytes, SourcePosition, bytes | None]] = []
        applied_positions = self.applied_positions
        for message in batch:
            position = message.position
            partition, offset = position.partition, position.offset
            if offset > max_offsets.get(partition, -1):
                max_offsets[partition] = offset
            if offset < applied_positions.get(partition, -1):
                self.summary.skipped_replayed += 1  # already in the restored state and in storage
                continue
            fresh.append((message.value, position, message.key))
        records, letters = self.decoder.decode_batch(fresh)
        decoded = time.perf_counter()
        self._follow_stream_share(source)  # the poll that brought this batch may have moved partitions
        scores = self._fold_population()
        scores += self.detector.process(records)
        alerts = self.policy.evaluate(scores)
        store_started = time.perf_counter()
        if self.transactions is None:
            self._dead_letter(letters)
        batch_id = _batch_id(batch)
        if batch or scores:
            self._write(
                StoredBatch(
                    batch_id=batch_id,
                    scores=scores,
                    alerts=alerts,
                    events=records,
                    stats=BatchStats(
                        batch_id=batch_id,
                        worker=self.worker_id,
                        finished_at=time.time(),
                        records=len(batch),
                        dead_lettered=len(letters),
                        scored_sessions=len(scores),
                        alerts=len(alerts),
                        batch_latency_ms=(time.perf_counter() - started) * 1000.0,
                        store_latency_ms=0.0,
                        lag=-1,
                        dlq_reasons=dict(Counter(reason_class(x.reason) for x in letters)),
                    ),
                )
            )
        stored = time.perf_counter()
        try:
            source.confirm_assignment()
        except AssignmentLost as exc:
            if batch:
                # Its records went into state that may be another worker's by now.
                log.warning("%s: not committing the batch; rewinding to the committed state and offsets", exc)
                self.metrics.assignment_lost.inc()
                self._rewind(source)
                return []  # what is still ours is processed again from the committed offsets
            # Nothing read (as at every poll while the worker joins): nothing to replay. What changed
            # stays in the state to be checkpointed next, or goes with the partitions a rejoin takes.
            log.debug("%s: checkpoint deferred", exc)
        else:
            if self.transactions is None:
                self._commit(batch, max_offsets, source)
            elif not self._commit_transaction(self.transactions, batch, letters, max_offsets, source):
                return []  # replayed from the committed offsets: counted and delivered then
        committed = time.perf_counter()
        self._time_stages(started, decoded, store_started, stored, committed)
        self._dlq_reasons.update(reason_class(x.reason) for x in letters)
        self._deliver(alerts)
        self._observe(batch, letters, scores, alerts, started)
        self.summary.batches += 1
        self.summary.records_read += len(batch)
        self.summary.dead_lettered += len(letters)
        self.summary.sessions_scored += len(scores)
        self.summary.alerts += len(alerts)
        log.debug(
            "batch %s: %d records, %d dead letters, %d scores, %d alerts; decode %.1f ms, detect %.1f ms, "
            "store %.1f ms, commit %.1f ms",
            batch_id,
            len(batch),
            len(letters),
            len(scores),
            len(alerts),
            (decoded - started) * 1000.0,
            (store_started - decoded) * 1000.0,
            (stored - store_started) * 1000.0,
            (committed - stored) * 1000.0,
        )
        return alerts

    def _fold_population(self) -> list[SessionScore]:
        """Fold what the group has added to the population log since the last batch (after a restore,
        all of it from the restored baselines on). Kafka unreachable: the baselines wait, the batch
        does not (the log is read again at the next batch)."""
        population_log = self.population_log
        if population_log is None:
            return []
        try:
            if self._population_resync:
                population_log.seek(self.detector.population_log_start())
                entries = population_log.read(to_end=True)
                log.info("folded %d population contributions from %s", len(entries), population_log.topic)
                self._population_resync = False
            else:
                entries = population_log.read()
        except KafkaError as exc:
            log.warning("cannot read population log %s (%s); baselines wait", population_log.topic, exc)
            return []
        self.metrics.population_contributions.labels("folded").inc(len(entries))
        return self.detector.fold_population(entries)

    def _write(self, batch: StoredBatch) -> None:
        """Write a batch, retrying while storage is down: the loop does not poll meanwhile, so the
        source applies backpressure (Kafka keeps the records; memory stays at one batch). A stop
        request ends the wait without committing, so the batch is replayed on the next start."""
        delay = 0.5
        while True:
            try:
                self.store.write_batch(batch)
            except StorageError as exc:
                self.metrics.storage_result(False)
                if self._source is not None and self._source.stopped:
                    raise
                log.warning("storage write failed (%s); retrying in %.1f s, not consuming meanwhile", exc, delay)
                time.sleep(delay)
                delay = min(delay * 2, 30.0)
            else:
                if not self.metrics.storage_ok:
                    log.info("storage is back; resuming")
                self.metrics.storage_result(True)
                return

    def _time_stages(self, *marks: float) -> None:
        """Add the time between consecutive ``marks`` (one more than there are stages) to its stage."""
        totals = self.summary.stage_seconds
        for stage, (begin, end) in zip(PIPELINE_STAGES, pairwise(marks), strict=True):
            totals[stage] += end - begin
            self.metrics.stage_seconds.labels(stage).inc(end - begin)

    def _observe(
        self,
        batch: list[RawMessage],
        letters: list[Any],
        scores: list[SessionScore],
        alerts: list[Alert],
        started: float,
    ) -> None:
        m = self.metrics
        m.progressed()
        if not batch:
            return
        m.batches.inc()
        m.consumed.inc(len(batch))
        for letter in letters:
            m.dead_lettered.labels(reason_class(letter.reason)).inc()
        m.scores.inc(len(scores))
        for alert in alerts:
            m.alerts.labels(alert.kind, alert.status).inc()
        m.batch_latency.observe(time.perf_counter() - started)
        now = time.monotonic()
        if now - self._last_gauges >= 10.0:  # O(sessions) and a broker round trip: not every batch
            self._last_gauges = now
            m.open_sessions.set(len(self.detector.sessions))
            m.state_bytes.set(self.detector.state_bytes())
            lag = getattr(self._source, "lag", None)
            if callable(lag):
                try:
                    for partition, behind in lag().items():
                        m.lag.labels(str(partition)).set(behind)
                except Exception as exc:  # metrics must never stop the pipeline
                    log.debug("cannot read consumer lag: %s", exc)

    def _dead_letter(self, letters: list[Any]) -> None:
        if letters:
            self.dead_letters.write(letters)
        self.dead_letters.flush()

    def _commit(self, batch: list[RawMessage], max_offsets: dict[int, int], source: Source) -> None:
        """Checkpoint the state with the batch's positions, then commit the batch's offsets. The
        population contributions of the batch go first, so a checkpoint never holds baselines whose
        evidence the group has not been sent."""
        contributions = self.detector.take_population_contributions()
        if self.population_log is not None and contributions:  # most batches complete no epoch
            self.population_log.send(contributions)
            self.population_log.flush()
            self.metrics.population_contributions.labels("sent").inc(len(contributions))
        if self.state is not None:
            self._checkpoint(self.state, max_offsets)
        source.commit(batch)

    def _commit_transaction(
        self,
        transactions: KafkaTransactions,
        batch: list[RawMessage],
        letters: list[Any],
        max_offsets: dict[int, int],
        source: Source,
    ) -> bool:
        """Dead letters, checkpoint and offsets in one transaction; False when it was aborted and the
        batch is to be processed again. Nothing here polls, so no rebalance runs inside the transaction."""
        try:
            with transactions.transaction():
                self._dead_letter(letters)
                self._commit(batch, max_offsets, source)
        except ProducerFenced as exc:
            log.critical("stopping: this worker is a zombie, its transactional producer was fenced (%s)", exc)
            raise
        except TransactionAborted as exc:
            log.warning("transaction aborted (%s); processing the batch again from the committed offsets", exc)
            self.metrics.transactions_aborted.inc()
            self._rewind(source)
            return False
        return True

    def _rewind(self, source: Source) -> None:
        """Back to the committed offsets and state: the in-memory state (population baselines included)
        went ahead with a batch that was not committed, so every owned partition is restored from the
        changelog, where that batch's checkpoint is not."""
        self._population_restored = False
        source.rewind()

    def _checkpoint(self, state: StateBackend, max_offsets: dict[int, int]) -> None:
        dirty = self.detector.take_checkpoint()
        self._version += 1
        for partition in set(dirty) | set(max_offsets):
            position = max(self.applied_positions.get(partition, 0), max_offsets.get(partition, -1) + 1)
            state.save_state(partition, dirty.get(partition, {}), position, self._version)
            self.applied_positions[partition] = position
        state.flush()

    def _deliver(self, alerts: list[Alert]) -> None:
        # Never blocks and never raises: one background lane per receiver (alerting/dispatch.py).
        self.dispatcher.submit(alerts)

    def close(self) -> None:
        # Flush alerts for a bounded time; what is left stays in the outbox for the next start.
        self.dispatcher.close(self.config.alerting.shutdown_timeout_s)
        if self.state is not None:
            self.state.close()
        if self.population_log is not None:
            self.population_log.close()
        self.dead_letters.close()
        self.store.close()


def new_worker_id(config: Config) -> str:
    """Unique per process: it names this worker's batches and, under exactly-once, its transactional id."""
    return f"{config.kafka.client_id}-{uuid.uuid4().hex[:8]}"


def policy_settings(config: Config) -> PolicySettings:
    a = config.alerting
    return PolicySettings(
        threshold=a.threshold or config.detection.alert_threshold,
        cooldown_s=a.cooldown_s,
        renotify_s=a.renotify_s,
        resolve_after_s=a.resolve_after_s,
        max_per_minute=a.max_per_minute,
        suppress_clients=list(a.suppress_clients),
        suppress_models=list(a.suppress_models),
    )


def delivery_settings(config: Config) -> DeliverySettings:
    a = config.alerting
    return DeliverySettings(
        queue_max=a.queue_max,
        backoff_initial_s=a.retry_initial_s,
        backoff_max_s=a.retry_max_s,
        sweep_s=a.sweep_s,
        shutdown_timeout_s=a.shutdown_timeout_s,
    )


def _batch_id(batch: list[RawMessage]) -> str:
    """Deterministic: the same messages replayed give the same id."""
    if not batch:
        return "empty"
    first, last = batch[0].position, batch[-1].position
    return f"{first.topic}:{first.partition}:{first.offset}-{last.partition}:{last.offset}:{len(batch)}"


@contextlib.contextmanager
def streaming_gc() -> Iterator[None]:
    """Python's cyclic garbage collector tuned for the streaming loop, restored afterwards.

    Each micro-batch allocates hundreds of thousands of short-lived, acyclic objects (records, numpy
    views, scores), and the default threshold (a young-generation pass every 700 allocations, and
    full passes over every long-lived object: sessions, signals, imported libraries) spent 10-20% of
    the detector's time (measured on the short-sessions benchmark). Objects alive at start (modules,
    River, scipy, configuration) are frozen out of collection; young passes run every 50,000
    allocations. Reference counting still frees everything that is not in a cycle at once."""
    previous = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
    try:
        yield
    finally:
        gc.set_threshold(*previous)
        gc.unfreeze()


class _stop_on_signals:
    """SIGINT / SIGTERM ask the source to stop after the current batch; a second SIGINT aborts."""

    def __init__(self, source: Source) -> None:
        self.source = source
        self.previous: dict[int, Any] = {}
        self.requested = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\nprobewatch: {signal.Signals(signum).name} received, finishing the current batch…", file=sys.stderr)
        self.source.stop()

    def __enter__(self) -> _stop_on_signals:
        for signum in (signal.SIGINT, signal.SIGTERM):
            # Outside the main thread (tests) there is no signal handling.
            with contextlib.suppress(ValueError):
                self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

"""Session state checkpoints in a compacted Kafka changelog topic (the Kafka Streams / Quix Streams way).

Each source partition has a changelog partition with the same number; a message is one state entry
keyed ``<logical partition>\\x1f<state key>`` (the value is the entry, a tombstone deletes it) and
the entry ``__position__`` records the source offset the state reflects. When a worker takes a
partition over it replays that changelog partition to its end and continues where the previous owner
stopped. Model-wide entries (logical partition -1, the population baselines) live in changelog
partition 0, which every worker reads once at start.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError

from ingest.transactions import TransactionalProducer
from storage import StorageError

log = logging.getLogger(__name__)

T = TypeVar("T")

POSITION_KEY = "__position__"
_SEP = "\x1f"


def retry_kafka(action: Callable[[], T], what: str, timeout_s: float = 120.0) -> T:
    """Run ``action``, retrying Kafka errors with backoff for up to ``timeout_s`` (a broker that is
    restarting, or a controller not yet elected, answers again within seconds)."""
    deadline = time.monotonic() + timeout_s
    delay = 0.5
    while True:
        try:
            return action()
        except KafkaError as exc:
            if time.monotonic() + delay > deadline:
                raise
            log.warning("%s failed (%s: %s); retrying in %.1f s", what, type(exc).__name__, exc, delay)
            time.sleep(delay)
            delay = min(delay * 2, 10.0)


def create_topic(admin: KafkaAdminClient, topic: NewTopic) -> bool:
    """Create ``topic`` unless it exists; True when this call created it."""
    try:
        admin.create_topics([topic])
    except TopicAlreadyExistsError:
        return False
    return True


REPLAY_REPORT_S = 10.0  # how often a long changelog replay says how far it got


class StateBackend(Protocol):
    """Where the pipeline checkpoints detector state: the changelog topic, or the ClickHouse store."""

    def save_state(self, partition: int, entries: dict[str, bytes | None], position: int, version: int) -> None: ...

    def load_state(
        self, partitions: list[int], progress: Callable[[], None] | None = None
    ) -> tuple[dict[int, dict[str, bytes]], dict[int, int]]:
        """Live state per partition and the source position it reflects; ``progress`` is called now
        and then while a long restore runs (the liveness check counts it as the loop's progress)."""
        ...

    def flush(self) -> None:
        """Make every saved entry durable; called before offsets are committed."""
        ...

    def close(self) -> None: ...


class StoreStateBackend:
    """Checkpoints in the ClickHouse store's `detector_state` table (writes are durable at once).
    Every ``purge_every_s`` (wall clock) it has the store drop the keys deleted since (tombstones)."""

    def __init__(self, store: Any, purge_every_s: float = 3600.0) -> None:
        self.store = store
        self.purge_every_s = purge_every_s
        self._next_purge = time.monotonic() + purge_every_s

    def save_state(self, partition: int, entries: dict[str, bytes | None], position: int, version: int) -> None:
        self.store.save_state(partition, entries, position, version)

    def load_state(
        self, partitions: list[int], progress: Callable[[], None] | None = None
    ) -> tuple[dict[int, dict[str, bytes]], dict[int, int]]:
        result: tuple[dict[int, dict[str, bytes]], dict[int, int]] = self.store.load_state(partitions)
        return result

    def flush(self) -> None:
        if time.monotonic() < self._next_purge:
            return
        self._next_purge = time.monotonic() + self.purge_every_s
        try:
            self.store.purge_deleted_state()
            log.info("asked ClickHouse to purge detector_state keys deleted more than an hour ago")
        except StorageError as exc:  # housekeeping: never fail a checkpoint for it
            log.warning("could not purge deleted detector state (%s: %s); will try again", type(exc).__name__, exc)

    def close(self) -> None:
        return None  # the store is closed by its owner


class KafkaChangelog:
    """A compacted changelog topic with as many partitions as the source topic.

    With ``transactional_producer`` (exactly-once) the entries are produced in the caller's open
    transaction, which makes them visible, and flush() only waits for them; replay reads committed
    entries only, so an aborted checkpoint is never restored. The caller owns that producer."""

    def __init__(
        self,
        topic: str,
        source_topic: str,
        kafka_options: dict[str, Any],
        replication_factor: int = -1,
        *,
        transactional_producer: TransactionalProducer | None = None,
        producer_batch_bytes: int = 524_288,
    ) -> None:
        self.topic = topic
        self.options = kafka_options
        # -1: the broker's default.replication.factor (KIP-464).
        self.replication_factor = replication_factor
        self.partitions = retry_kafka(lambda: self._ensure_topic(source_topic), f"preparing changelog {topic}")
        self._owns_producer = transactional_producer is None
        self._isolation_level = "read_uncommitted" if transactional_producer is None else "read_committed"
        self.producer = transactional_producer or KafkaProducer(
            acks="all", linger_ms=5, batch_size=producer_batch_bytes, **kafka_options
        )

    def _ensure_topic(self, source_topic: str) -> int:
        admin = KafkaAdminClient(**self.options)
        try:
            described = admin.describe_topics([source_topic])
            count = len(described[0]["partitions"]) if described and described[0].get("partitions") else 0
            if count == 0:
                raise RuntimeError(f"source topic {source_topic!r} does not exist (or has no partitions)")
            config = {"cleanup.policy": "compact", "min.compaction.lag.ms": "60000"}
            if create_topic(admin, NewTopic(self.topic, count, self.replication_factor, topic_configs=config)):
                log.info("created changelog topic %s with %d partitions", self.topic, count)
            return count
        finally:
            admin.close()

    def _physical(self, partition: int) -> int:
        return max(partition, 0) % self.partitions

    def save_state(self, partition: int, entries: dict[str, bytes | None], position: int, version: int) -> None:
        # The position message comes last: on replay it is what completes the checkpoint (a process
        # killed in the middle of a flush leaves a prefix of these messages, which replay discards).
        physical = self._physical(partition)
        for key, blob in entries.items():
            self.producer.send(self.topic, key=f"{partition}{_SEP}{key}".encode(), value=blob, partition=physical)
        self.producer.send(
            self.topic,
            key=f"{partition}{_SEP}{POSITION_KEY}".encode(),
            value=str(position).encode(),
            partition=physical,
        )

    def flush(self) -> None:
        self.producer.flush()

    def load_state(
        self, partitions: list[int], progress: Callable[[], None] | None = None
    ) -> tuple[dict[int, dict[str, bytes]], dict[int, int]]:
        return retry_kafka(lambda: self._replay(partitions, progress), f"replaying changelog {self.topic}")

    def _replay(
        self, partitions: list[int], progress: Callable[[], None] | None
    ) -> tuple[dict[int, dict[str, bytes]], dict[int, int]]:
        wanted = set(partitions)
        states: dict[int, dict[str, bytes]] = {p: {} for p in partitions}
        positions: dict[int, int] = {}
        # Per logical partition, the entries read since its last position message: a checkpoint is
        # applied only when its position message is read, so state never runs ahead of its position
        # (otherwise records between the two would be counted twice after the restart).
        unfinished: dict[int, dict[str, bytes | None]] = {p: {} for p in partitions}
        physical = sorted({self._physical(p) for p in partitions})
        if not physical:
            return states, positions
        started = time.monotonic()
        consumer = KafkaConsumer(
            enable_auto_commit=False, group_id=None, isolation_level=self._isolation_level, **self.options
        )
        try:
            tps = [TopicPartition(self.topic, p) for p in physical]
            consumer.assign(tps)
            consumer.seek_to_beginning(*tps)
            ends = consumer.end_offsets(tps)
            remaining = {tp for tp in tps if ends[tp] > 0}
            read = 0
            total = sum(ends[tp] for tp in remaining)
            next_report = started + REPLAY_REPORT_S
            while remaining:
                if progress is not None:
                    progress()
                if time.monotonic() >= next_report:
                    next_report += REPLAY_REPORT_S
                    log.info("replaying changelog %s: %d of at most %d messages read", self.topic, read, total)
                for messages in consumer.poll(timeout_ms=1000, max_records=10_000).values():
                    for message in messages:
                        read += 1
                        logical_text, _, key = message.key.decode().partition(_SEP)
                        logical = int(logical_text)
                        if logical not in wanted:
                            continue
                        if key == POSITION_KEY:
                            positions[logical] = int(message.value)
                            for entry, blob in unfinished[logical].items():
                                if blob is None:
                                    states[logical].pop(entry, None)
                                else:
                                    states[logical][entry] = blob
                            unfinished[logical].clear()
                        else:
                            unfinished[logical][key] = message.value
                # Every partition, not only those that returned records: the end of a transactional
                # changelog can be an aborted transaction and its marker, which return none.
                remaining = {tp for tp in remaining if consumer.position(tp) < ends[tp]}
            dropped = {p: len(u) for p, u in unfinished.items() if u}
            if dropped:
                log.warning(
                    "ignored the unfinished last checkpoint of partitions %s (entries: %s)", sorted(dropped), dropped
                )
            log.info(
                "replayed %d changelog messages of %s partitions %s in %.2f s",
                read,
                self.topic,
                physical,
                time.monotonic() - started,
            )
        finally:
            consumer.close()
        return states, positions

    def close(self) -> None:
        self.producer.flush()
        if self._owns_producer:
            self.producer.close()

"""The population log: the Kafka topic through which the workers of a consumer group share their
population baselines.

Each worker keeps the baselines its sessions are scored against (``detectors.population``). Left to
itself, a worker of N learns them from its 1/N of the clients: they warm up later and judge by fewer
clients (``probewatch eval --workers`` measures what that costs). Here every worker appends each
epoch's evidence (a *contribution*: histogram counts and reference-sample offers) to one single-
partition topic and folds the whole topic, every worker's contributions, in log order. A fold is a
pure function of the baselines and the contribution, so all workers hold the same baselines at the
same log offset, like a Kafka Streams global table. Source groups travel the same way: digests of a
group's members per source partition (``detectors.groups``), folded in the same order.

The offsets folded travel with the baselines in the checkpoint (per model), so a worker restored from
any worker's checkpoint reads on from there and never folds a contribution twice. Contributions are
produced with the batch's checkpoint: in its transaction under exactly-once (an aborted batch's are
never read), before the offsets are committed otherwise (a crash in between can repeat an epoch's
evidence once, which only weighs it double).
"""

from __future__ import annotations

import logging
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic

from ingest.transactions import TransactionalProducer
from probewatch.changelog import create_topic, retry_kafka

log = logging.getLogger(__name__)

# A restored worker reads on from its checkpoint's offsets, so contributions are needed only until
# every worker has folded and checkpointed them (within a batch or two). A day leaves room for a
# worker that is down; one down longer reads on from the oldest contribution still there, says so,
# and misses the rest (evidence the decay of the baselines forgets anyway). Contributions are about
# the size of the published baselines (the reference sample is most of it: 384 inputs at most).
RETENTION_MS = 24 * 3600 * 1000
SEGMENT_MS = 3600 * 1000  # retention deletes whole segments: roll them hourly, not weekly
READ_BATCH = 10_000


class KafkaPopulationLog:
    """Appends contributions, (model id, encoded contribution), and reads everyone's back in order.

    With ``transactional_producer`` (exactly-once) the contributions are produced in the caller's
    open transaction and read ``read_committed``. The caller owns that producer."""

    def __init__(
        self,
        topic: str,
        kafka_options: dict[str, Any],
        replication_factor: int = -1,
        *,
        transactional_producer: TransactionalProducer | None = None,
    ) -> None:
        self.topic = topic
        self.options = kafka_options
        self.replication_factor = replication_factor
        retry_kafka(self._ensure_topic, f"preparing population log {topic}")
        self._partition = TopicPartition(topic, 0)
        self._owns_producer = transactional_producer is None
        self.producer = transactional_producer or KafkaProducer(acks="all", linger_ms=5, **kafka_options)
        self._consumer = KafkaConsumer(
            enable_auto_commit=False,
            group_id=None,
            isolation_level="read_uncommitted" if transactional_producer is None else "read_committed",
            **kafka_options,
        )
        self._consumer.assign([self._partition])

    def _ensure_topic(self) -> None:
        admin = KafkaAdminClient(**self.options)
        try:
            config = {"cleanup.policy": "delete", "retention.ms": str(RETENTION_MS), "segment.ms": str(SEGMENT_MS)}
            # One partition: one order of contributions for every worker.
            if create_topic(admin, NewTopic(self.topic, 1, self.replication_factor, topic_configs=config)):
                log.info("created population log topic %s", self.topic)
        finally:
            admin.close()

    def send(self, contributions: list[tuple[str, bytes]]) -> None:
        for model_id, blob in contributions:
            self.producer.send(self.topic, key=model_id.encode(), value=blob, partition=0)

    def flush(self) -> None:
        self.producer.flush()

    def seek(self, start: int) -> None:
        """Read from offset ``start`` next (a restored state's lowest folded offset)."""
        first = self._consumer.beginning_offsets([self._partition])[self._partition]
        if start < first:
            log.warning(
                "population log %s starts at offset %d, after this state's offset %d (its retention deleted "
                "contributions never folded in here); reading on from %d",
                self.topic,
                first,
                start,
                first,
            )
        self._consumer.seek(self._partition, max(start, first))

    def read(self, *, to_end: bool = False) -> list[tuple[int, str, bytes]]:
        """The next contributions, (offset, model id, contribution), in log order: what one poll brings
        without waiting, or with ``to_end`` everything up to the end of the log (after a restore, so
        that the next batch is scored against the baselines of the whole group)."""
        out: list[tuple[int, str, bytes]] = []
        end = self._consumer.end_offsets([self._partition])[self._partition] if to_end else None
        # The end of a transactional log can be an aborted transaction's marker: the position, not
        # the records returned, tells when it is reached. Checked before polling too: a poll at the
        # end waits its whole timeout for records that are not coming (a second at every start).
        while end is None or self._consumer.position(self._partition) < end:
            polled = self._consumer.poll(timeout_ms=1000 if to_end else 0, max_records=READ_BATCH)
            for message in polled.get(self._partition, []):
                out.append((message.offset, message.key.decode(), message.value))
            if end is None:
                break
        return out

    def close(self) -> None:
        self._consumer.close()
        if self._owns_producer:
            self.producer.close()

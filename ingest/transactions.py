"""Kafka transactions for exactly-once processing (Kafka Streams' ``exactly_once_v2``, KIP-447).

One transactional producer per worker carries, per batch, the dead letters, the changelog entries and
the consumer offsets (sent with the consumer's group metadata, so a consumer that lost its partitions
cannot commit for them). Either all become visible to ``read_committed`` readers, or none does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from kafka import KafkaProducer
from kafka.errors import KafkaError, KafkaTimeoutError, ProducerFencedError

# Kafka Streams' default under exactly-once: a worker killed inside a transaction blocks
# read_committed readers of the partitions it wrote to until the coordinator aborts it, so keep this
# short. A transaction here spans only produce + commit (the ClickHouse write happens before it).
TRANSACTION_TIMEOUT_MS = 10_000
# How long the sinks wait for what a transaction produced. A transaction that a broker restart left
# to the coordinator's timeout is aborted under its producer, whose flush can then wait forever.
FLUSH_TIMEOUT_S = 2 * TRANSACTION_TIMEOUT_MS / 1000


class TransactionAborted(Exception):
    """The batch's transaction was aborted: nothing of it is visible, and it must be processed again."""


class ProducerFenced(Exception):
    """The transactional producer can no longer be used: another producer took over its transactional
    id, or the coordinator ended its epoch (e.g. a transaction outlived the timeout). This worker is a
    zombie and must stop; its partitions are processed by the others."""


class TransactionalProducer:
    """The worker's transactional producer as the sinks see it: ``send`` and a bounded ``flush``. The
    Kafka producer underneath is replaced when it gets stuck (see ``KafkaTransactions.renew``)."""

    def __init__(self, inner: KafkaProducer) -> None:
        self.inner = inner

    def send(self, topic: str, *args: Any, **kwargs: Any) -> Any:
        return self.inner.send(topic, *args, **kwargs)

    def flush(self, timeout: float | None = None) -> None:
        self.inner.flush(timeout=FLUSH_TIMEOUT_S if timeout is None else timeout)

    def close(self, timeout: float | None = None) -> None:
        self.inner.close(timeout=timeout)


class KafkaTransactions:
    """A transactional producer, shared by every sink whose output is part of a batch's transaction."""

    def __init__(self, transactional_id: str, **producer_options: Any) -> None:
        self.transactional_id = transactional_id
        self._options = producer_options
        self.producer = TransactionalProducer(self._start())

    def _start(self) -> KafkaProducer:
        producer = KafkaProducer(
            transactional_id=self.transactional_id,
            enable_idempotence=True,
            transaction_timeout_ms=TRANSACTION_TIMEOUT_MS,
            linger_ms=5,
            **self._options,
        )
        # Also aborts whatever a previous producer with this id left open, and fences it.
        producer.init_transactions()
        return producer

    def renew(self) -> None:
        """Replace a producer stuck in its transaction by a new one with the same transactional id,
        as Kafka Streams does: its initialisation aborts the old transaction, if the coordinator has
        not already, and fences the old producer."""
        with contextlib.suppress(Exception):  # it is being thrown away: best effort
            self.producer.inner.close(timeout=0)
        self.producer.inner = self._start()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Begin a transaction, commit it when the block ends. When the block or the commit fails, the
        transaction is aborted and TransactionAborted raised; ProducerFenced when it cannot be."""
        producer = self.producer.inner
        try:
            producer.begin_transaction()
            yield
            producer.commit_transaction()
        except KafkaError as exc:
            if _is_fenced(exc):
                raise ProducerFenced(f"transactional id {self.transactional_id}: {exc}") from exc
            if isinstance(exc, KafkaTimeoutError):
                # What the transaction produced never completed (its coordinator aborted it under the
                # producer, e.g. across a broker restart): the producer cannot be trusted to abort.
                self.renew()
                raise TransactionAborted(f"{type(exc).__name__}: {exc}; producer renewed") from exc
            try:
                producer.abort_transaction()
            except KafkaError as abort_exc:
                # kafka-python refuses to abort from a fatal state (fencing found by a produce request
                # surfaces only as "in an error state" here): nothing more can be done with this producer.
                raise ProducerFenced(
                    f"transactional id {self.transactional_id}: cannot abort after {exc!r}: {abort_exc}"
                ) from exc
            raise TransactionAborted(f"{type(exc).__name__}: {exc}") from exc
        except BaseException:
            # Not Kafka's failure (a stop, a bug): end the transaction rather than leave it to the timeout.
            with contextlib.suppress(KafkaError):
                producer.abort_transaction()
            raise

    def send_offsets(self, offsets: dict[Any, Any], group_metadata: Any) -> None:
        """Commit the consumer's ``offsets`` ({TopicPartition: OffsetAndMetadata}) with the open transaction."""
        self.producer.inner.send_offsets_to_transaction(offsets, group_metadata)


def _is_fenced(exc: KafkaError) -> bool:
    # kafka-python raises ProducerFencedError itself when a transactional request finds the fencing,
    # but after the fact only a KafkaError naming it in its message.
    return isinstance(exc, ProducerFencedError) or "ProducerFenced" in str(exc)

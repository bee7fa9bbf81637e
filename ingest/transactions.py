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
from kafka.errors import KafkaError, ProducerFencedError

# Kafka Streams' default under exactly-once: a worker killed inside a transaction blocks
# read_committed readers of the partitions it wrote to until the coordinator aborts it, so keep this
# short. A transaction here spans only produce + commit (the ClickHouse write happens before it).
TRANSACTION_TIMEOUT_MS = 10_000


class TransactionAborted(Exception):
    """The batch's transaction was aborted: nothing of it is visible, and it must be processed again."""


class ProducerFenced(Exception):
    """The transactional producer can no longer be used: another producer took over its transactional
    id, or the coordinator ended its epoch (e.g. a transaction outlived the timeout). This worker is a
    zombie and must stop; its partitions are processed by the others."""


class KafkaTransactions:
    """A transactional producer, shared by every sink whose output is part of a batch's transaction."""

    def __init__(self, transactional_id: str, **producer_options: Any) -> None:
        self.transactional_id = transactional_id
        self.producer = KafkaProducer(
            transactional_id=transactional_id,
            enable_idempotence=True,
            transaction_timeout_ms=TRANSACTION_TIMEOUT_MS,
            linger_ms=5,
            **producer_options,
        )
        # Also aborts whatever a previous producer with this id left open, and fences it.
        self.producer.init_transactions()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Begin a transaction, commit it when the block ends. When the block or the commit fails, the
        transaction is aborted and TransactionAborted raised; ProducerFenced when it cannot be."""
        try:
            self.producer.begin_transaction()
            yield
            self.producer.commit_transaction()
        except KafkaError as exc:
            if _is_fenced(exc):
                raise ProducerFenced(f"transactional id {self.transactional_id}: {exc}") from exc
            try:
                self.producer.abort_transaction()
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
                self.producer.abort_transaction()
            raise

    def send_offsets(self, offsets: dict[Any, Any], group_metadata: Any) -> None:
        """Commit the consumer's ``offsets`` ({TopicPartition: OffsetAndMetadata}) with the open transaction."""
        self.producer.send_offsets_to_transaction(offsets, group_metadata)


def _is_fenced(exc: KafkaError) -> bool:
    # kafka-python raises ProducerFencedError itself when a transactional request finds the fencing,
    # but after the fact only a KafkaError naming it in its message.
    return isinstance(exc, ProducerFencedError) or "ProducerFenced" in str(exc)

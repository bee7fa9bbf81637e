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

import kafka
from kafka import KafkaProducer
from kafka.errors import KafkaError, KafkaTimeoutError, ProducerFencedError

# Kafka Streams' default under exactly-once: a worker killed inside a transaction blocks
# read_committed readers of the partitions it wrote to until the coordinator aborts it, so keep this
# short. A transaction here spans only produce + commit (the ClickHouse write happens before it).
TRANSACTION_TIMEOUT_MS = 10_000
# How long the sinks wait for what a transaction produced. A transaction that a broker restart left
# to the coordinator's timeout is aborted under its producer, whose flush can then wait forever.
FLUSH_TIMEOUT_S = 2 * TRANSACTION_TIMEOUT_MS / 1000
# How long commit, abort and send_offsets wait for the transaction coordinator (kafka-python waits
# forever: a coordinator gone mid-commit, e.g. in a broker restart, would hang the worker). Past twice
# the transaction timeout, a live coordinator has aborted the transaction itself.
TRANSACTION_OP_TIMEOUT_S = 2 * TRANSACTION_TIMEOUT_MS / 1000


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

    def __init__(
        self, transactional_id: str, *, op_timeout_s: float = TRANSACTION_OP_TIMEOUT_S, **producer_options: Any
    ) -> None:
        self.transactional_id = transactional_id
        # The bound on commit, abort and send_offsets (see TRANSACTION_OP_TIMEOUT_S).
        self.op_timeout_s = op_timeout_s
        self._options = producer_options
        # Set while the producer is stuck and could not be replaced yet (the broker was unreachable):
        # the next transaction replaces it before it begins.
        self._renewal_due = False
        self.producer = TransactionalProducer(self._start())

    def _start(self) -> KafkaProducer:
        producer = KafkaProducer(
            transactional_id=self.transactional_id,
            enable_idempotence=True,
            transaction_timeout_ms=TRANSACTION_TIMEOUT_MS,
            linger_ms=5,
            **self._options,
        )
        try:
            # Also aborts whatever a previous producer with this id left open, and fences it.
            producer.init_transactions()
        except BaseException:
            with contextlib.suppress(Exception):
                producer.close(timeout=0)
            raise
        return producer

    def renew(self) -> None:
        """Replace a producer stuck in its transaction by a new one with the same transactional id,
        as Kafka Streams does: its initialisation aborts the old transaction, if the coordinator has
        not already, and fences the old producer. Raises KafkaError when the new one cannot start
        (e.g. KafkaTimeoutError: the broker is unreachable); the renewal is then still due."""
        self._renewal_due = True
        _discard(self.producer.inner)
        self.producer.inner = self._start()
        self._renewal_due = False

    def _renew_after(self, exc: BaseException) -> TransactionAborted:
        """The TransactionAborted for a transaction whose producer is stuck: renewed now, or, when the
        broker cannot be reached, before the next transaction begins."""
        try:
            self.renew()
        except KafkaError as renew_exc:
            note = f"producer renewal failed ({renew_exc}), retried at the next transaction"
        else:
            note = "producer renewed"
        return TransactionAborted(f"{exc}; {note}")  # a KafkaError's str starts with its class

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Begin a transaction, commit it when the block ends. When the block or the commit fails, the
        transaction is aborted and TransactionAborted raised; ProducerFenced when it cannot be.

        A commit, abort or send_offsets that does not complete within ``op_timeout_s`` also ends in
        TransactionAborted, after replacing the producer (or, while the broker cannot be reached, at
        the start of the next transaction): the batch is processed again. Had a timed-out commit in
        fact gone through, the replay finds the batch in the committed offsets and checkpoint, so
        nothing counts twice."""
        if self._renewal_due:
            try:
                self.renew()
            except KafkaError as exc:
                raise TransactionAborted(f"producer renewal failed ({exc})") from exc
        producer = self.producer.inner
        try:
            producer.begin_transaction()
            yield
            _bounded_transactional_call(producer, "begin_commit", self.op_timeout_s)
        except KafkaError as exc:
            if _is_fenced(producer, exc):
                raise ProducerFenced(f"transactional id {self.transactional_id}: {exc}") from exc
            if isinstance(exc, KafkaTimeoutError):
                # What the transaction produced never completed (its coordinator aborted it under the
                # producer, e.g. across a broker restart), or the coordinator did not answer the commit
                # or the offsets: the producer cannot be trusted to abort.
                raise self._renew_after(exc) from exc
            try:
                _bounded_transactional_call(producer, "begin_abort", self.op_timeout_s)
            except KafkaTimeoutError as abort_exc:
                raise self._renew_after(abort_exc) from exc
            except KafkaError as abort_exc:
                # kafka-python refuses to abort from a fatal state (fencing found by a produce request
                # surfaces only as "in an error state" here): nothing more can be done with this producer.
                raise ProducerFenced(
                    f"transactional id {self.transactional_id}: cannot abort after {exc!r}: {abort_exc}"
                ) from exc
            raise TransactionAborted(f"{type(exc).__name__}: {exc}") from exc
        except BaseException:
            # Not Kafka's failure (a stop, a bug): end the transaction rather than leave it to the timeout.
            try:
                _bounded_transactional_call(producer, "begin_abort", self.op_timeout_s)
            except KafkaTimeoutError:
                self._renewal_due = True  # not now: this exception is on its way out
            except KafkaError:
                pass
            raise

    def send_offsets(self, offsets: dict[Any, Any], group_metadata: Any) -> None:
        """Commit the consumer's ``offsets`` ({TopicPartition: OffsetAndMetadata}) with the open
        transaction. KafkaTimeoutError after ``op_timeout_s`` (the transaction then aborts)."""
        _bounded_transactional_call(
            self.producer.inner, "send_offsets_to_transaction", self.op_timeout_s, offsets, group_metadata
        )


def _bounded_transactional_call(producer: KafkaProducer, operation: str, timeout_s: float, *args: Any) -> None:
    """``producer.commit_transaction()`` (operation "begin_commit"), ``abort_transaction()``
    ("begin_abort") or ``send_offsets_to_transaction(*args)``, waiting at most ``timeout_s``:
    KafkaTimeoutError after that, the producer's own error when the operation fails.

    kafka-python (3.0) waits for these without a timeout; this does what those methods do (start the
    operation on the producer's transaction manager, wake its sender thread) and then waits with
    ``TransactionalRequestResult.wait(timeout_ms=...)``, which returns False on timeout. With
    ``_discard`` and ``_is_fenced``, the only code here that reaches into kafka-python's internals."""
    start = getattr(getattr(producer, "_transaction_manager", None), operation, None)
    wakeup = getattr(getattr(producer, "_sender", None), "wakeup", None)
    if start is None or wakeup is None:
        raise RuntimeError(
            f"kafka-python {kafka.__version__}: KafkaProducer has no _transaction_manager.{operation} or "
            "_sender.wakeup, which probewatch uses to bound the wait for a transactional operation "
            "(written for kafka-python 3.0; see ingest/transactions.py)"
        )
    result = start(*args)
    wakeup()
    if not result.wait(timeout_ms=timeout_s * 1000):
        raise KafkaTimeoutError(f"{operation} did not complete within {timeout_s:g} s")


def _discard(producer: KafkaProducer) -> None:
    """Close a stuck producer at once, dropping what it has not sent.

    kafka-python's ``close`` flushes first and raises KafkaTimeoutError while records are pending
    (the broker is gone), before stopping the sender thread: the thread and its connections would
    outlive every renewal. So stop the sender without sending (``Sender.force_close``, which fails
    the pending records), then close. The new producer's ``init_transactions`` fences this one, so
    nothing it still had could reach the log anyway. Reaches into kafka-python's internals."""
    try:
        producer.close(timeout=0)
    except KafkaTimeoutError:
        sender = getattr(producer, "_sender", None)
        if sender is None or not hasattr(sender, "force_close"):
            raise RuntimeError(
                f"kafka-python {kafka.__version__}: KafkaProducer has no _sender.force_close, which "
                "probewatch uses to stop a stuck producer (see ingest/transactions.py)"
            ) from None
        sender.force_close()
        sender.join(timeout=5)
        with contextlib.suppress(Exception):  # the sender is stopped: the rest is bookkeeping
            producer.close(timeout=0)
    except Exception:  # it is being thrown away: best effort
        pass


def _is_fenced(producer: KafkaProducer, exc: KafkaError) -> bool:
    """Whether ``exc`` means another producer took over the transactional id. kafka-python raises
    ProducerFencedError itself only from the request that finds the fencing; later calls raise a
    plain KafkaError ("... in an error state"), and the fencing is the transaction manager's last
    error: read by type, not from the message. Reaches into kafka-python's internals."""
    manager = getattr(producer, "_transaction_manager", None)
    return isinstance(exc, ProducerFencedError) or isinstance(getattr(manager, "last_error", None), ProducerFencedError)

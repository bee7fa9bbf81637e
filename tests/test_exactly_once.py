"""Exactly-once processing (kafka.processing_guarantee = "exactly_once") against the real services: an
aborted batch leaves nothing visible to read_committed readers, and once replayed every dead letter is
there exactly once and every record is scored exactly once."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata
from pipeline_helpers import (
    InProcessWorker,
    Scenario,
    SourceWrapper,
    check_results,
    committed_dead_letters,
    dlq_documents,
    kill_one_worker_mid_stream,
    produce,
    topic_values,
)

from ingest.deadletter import KafkaDeadLetterSink
from ingest.records import DeadLetter, SourcePosition
from ingest.sources import KafkaSource, RawMessage
from ingest.transactions import KafkaTransactions, ProducerFenced, TransactionAborted
from probewatch.changelog import KafkaChangelog
from probewatch.config import load_config

pytestmark = pytest.mark.integration


def test_an_aborted_transaction_leaves_no_dead_letters_nor_checkpoint(
    kafka_bootstrap: str, kafka_topic: Callable[..., str], unique_name: Callable[[str], str]
) -> None:
    source = kafka_topic(partitions=2)
    dlq = kafka_topic(f"{source}.dlq", partitions=1)
    transactions = KafkaTransactions(unique_name("txn"), bootstrap_servers=kafka_bootstrap)
    changelog = KafkaChangelog(
        f"{source}.changelog",
        source,
        {"bootstrap_servers": kafka_bootstrap},
        1,
        transactional_producer=transactions.producer,
    )
    letters = KafkaDeadLetterSink(transactions.producer, dlq)

    def batch(n: int) -> None:
        letters.write([DeadLetter(f"bad {n}", f"payload {n}".encode(), SourcePosition(source, 0, n))])
        letters.flush()
        changelog.save_state(0, {"a": f"a{n}".encode()}, position=n + 1, version=n)
        changelog.flush()

    try:
        with transactions.transaction():
            batch(1)
        # Everything of the second batch reached the broker (flushed), then its transaction failed.
        with pytest.raises(TransactionAborted), transactions.transaction():
            batch(2)
            raise KafkaError("injected after producing")
        committed = [d["reason"] for d in dlq_documents(kafka_bootstrap, source, "read_committed")]
        assert committed == ["bad 1"]
        assert len(dlq_documents(kafka_bootstrap, source)) == 2  # the abort came after producing
        states, positions = changelog.load_state([0])
        assert (states, positions) == ({0: {"a": b"a1"}}, {0: 2})
    finally:
        changelog.close()
        transactions.producer.close()


def test_a_fenced_producer_is_reported_as_a_zombie(
    kafka_bootstrap: str, kafka_topic: Callable[..., str], unique_name: Callable[[str], str]
) -> None:
    topic = kafka_topic(partitions=1)
    same_id = unique_name("txn")
    zombie = KafkaTransactions(same_id, bootstrap_servers=kafka_bootstrap)
    successor = KafkaTransactions(same_id, bootstrap_servers=kafka_bootstrap)  # fences the first
    try:
        with pytest.raises(ProducerFenced), zombie.transaction():
            zombie.producer.send(topic, b"from the zombie").get(timeout=30)
        # Its next transaction fails with kafka-python's plain KafkaError ("... in an error state"):
        # still recognised as fencing, by the transaction manager's last error, without trying to abort.
        with pytest.raises(ProducerFenced, match="error state") as fenced, zombie.transaction():
            pass
        assert "cannot abort" not in str(fenced.value)
        with successor.transaction():
            successor.producer.send(topic, b"from its successor")
    finally:
        zombie.producer.close()
        successor.producer.close()


def end_offset(bootstrap: str, topic: str, isolation_level: str) -> int:
    """Partition 0's end for a reader with ``isolation_level`` (read_committed: the last stable offset)."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, isolation_level=isolation_level)
    try:
        tp = TopicPartition(topic, 0)
        return int(consumer.end_offsets([tp])[tp])
    finally:
        consumer.close()


def test_transactions_the_coordinator_never_answers_are_aborted_in_bounded_time(
    kafka_bootstrap: str,
    kafka_topic: Callable[..., str],
    unique_name: Callable[[str], str],
    services_ctl: Callable[..., object],
) -> None:
    """The broker goes away under four open transactions: one ending in an abort (its batch failed),
    one flushing what it produced, one sending its offsets, one committing. kafka-python would wait
    for each until the broker is back; here each gives up after its bound and the batch is to be
    replayed."""
    topic = kafka_topic(partitions=1)

    def transactions() -> KafkaTransactions:
        return KafkaTransactions(
            unique_name("txn"),
            op_timeout_s=1.0,
            bootstrap_servers=kafka_bootstrap,
            # The producer's renewal, tried while the broker is down, gives up this fast (kafka-python's
            # default: 30 s); it is then tried again when the next transaction begins.
            bootstrap_timeout_ms=1000,
        )

    committer, offsetter, flusher, aborter = transactions(), transactions(), transactions(), transactions()
    outcome: dict[str, BaseException] = {}
    stopped: list[float] = []

    def in_transaction(name: str, txns: KafkaTransactions, then: Callable[[], None]) -> None:
        try:
            with txns.transaction():
                txns.producer.send(topic, f"aborted: {name}".encode()).get(timeout=30)  # on the broker
                then()
        except BaseException as exc:
            outcome[name] = exc

    def stop_the_broker_then_fail() -> None:
        services_ctl("kafka", "stop")
        stopped.append(time.monotonic())
        raise KafkaError("injected: the batch failed")

    def then_flush() -> None:
        in_transaction("abort", aborter, stop_the_broker_then_fail)
        # As the sinks do at the end of a batch (their bound is FLUSH_TIMEOUT_S): the record never
        # reaches the broker, and the renewed producer must not send it later either.
        flusher.producer.send(topic, b"never sent: flush")
        flusher.producer.flush(timeout=1.0)

    def then_send_offsets() -> None:
        in_transaction("flush", flusher, then_flush)
        offsetter.send_offsets({TopicPartition(topic, 0): OffsetAndMetadata(1, "", -1)}, unique_name("group"))

    def then_commit() -> None:
        in_transaction("send_offsets", offsetter, then_send_offsets)

    # The threads of the producers that get stuck: each renewal must stop its old producer's thread.
    stuck_threads = {
        f"{t.producer.inner.config['client_id']}-network-thread" for t in (committer, offsetter, flusher, aborter)
    }
    try:
        ending = threading.Thread(target=in_transaction, args=("commit", committer, then_commit), daemon=True)
        ending.start()
        # Unbounded (kafka-python's abort_transaction etc.), each would wait until the broker is back.
        ending.join(timeout=60)
        assert not ending.is_alive(), f"still waiting for the coordinator; so far: {outcome}"
        assert stopped, f"the broker was not stopped: {outcome}"
        given_up_after = time.monotonic() - stopped[0]
        assert set(outcome) == {"abort", "flush", "send_offsets", "commit"}, outcome
        assert all(isinstance(exc, TransactionAborted) for exc in outcome.values()), outcome
        for name, operation in [("abort", "begin_abort"), ("send_offsets", "send_offsets_to_transaction")]:
            assert f"{operation} did not complete within 1 s" in str(outcome[name]), outcome
        assert "begin_commit did not complete within 1 s" in str(outcome["commit"]), outcome
        # The flush's own KafkaTimeoutError; the producer could not be replaced with the broker down.
        assert str(outcome["flush"]).startswith("KafkaTimeoutError"), outcome
        assert "renewal failed" in str(outcome["flush"]), outcome
        # kafka-python's close gives up on a producer with records pending before stopping its thread.
        assert not stuck_threads & {thread.name for thread in threading.enumerate()}
        assert given_up_after < 20, given_up_after  # each: 1 s waiting + 1 s trying to renew, and slack
        # Still no broker: the next transaction cannot replace the producer, and is aborted too.
        with pytest.raises(TransactionAborted, match="renewal failed"), committer.transaction():
            pass
        services_ctl("kafka", "start")
        # Now each replaces its stuck producer before it begins, which aborts what was left open.
        for name, txns in [("commit", committer), ("send_offsets", offsetter), ("flush", flusher), ("abort", aborter)]:
            with txns.transaction():
                txns.producer.send(topic, f"committed: {name}".encode())
        committed = sorted(topic_values(kafka_bootstrap, topic, "read_committed"))
        assert committed == [b"committed: abort", b"committed: commit", b"committed: flush", b"committed: send_offsets"]
        everything = sorted(topic_values(kafka_bootstrap, topic, "read_uncommitted"))
        aborted = [b"aborted: abort", b"aborted: commit", b"aborted: flush", b"aborted: send_offsets"]
        assert everything == [*aborted, *committed]
    finally:
        services_ctl("kafka", "start")  # before closing: a producer stuck in its commit needs the broker
        for txns in (committer, offsetter, flusher, aborter):
            txns.producer.close(timeout=5)


def test_a_stop_inside_a_transaction_aborts_it_at_once(
    kafka_bootstrap: str, kafka_topic: Callable[..., str], unique_name: Callable[[str], str]
) -> None:
    """Not Kafka's failure (a signal, a bug) inside the batch: the exception goes on its way, and the
    transaction is aborted there and then, not left to the coordinator's timeout, during which
    read_committed readers of the topic would be stuck behind it."""
    topic = kafka_topic(partitions=1)
    transactions = KafkaTransactions(unique_name("txn"), bootstrap_servers=kafka_bootstrap)
    try:
        with pytest.raises(KeyboardInterrupt), transactions.transaction():
            transactions.producer.send(topic, b"interrupted").get(timeout=30)
            raise KeyboardInterrupt
        # Ended at once: read_committed readers see the whole log (the abort marker included), not
        # a last stable offset stuck before the open transaction until the coordinator's timeout.
        assert end_offset(kafka_bootstrap, topic, "read_committed") == end_offset(
            kafka_bootstrap, topic, "read_uncommitted"
        )
        assert topic_values(kafka_bootstrap, topic, "read_committed") == []
        assert topic_values(kafka_bootstrap, topic, "read_uncommitted") == [b"interrupted"]
        with transactions.transaction():  # the producer is still good for the next batch
            transactions.producer.send(topic, b"next")
        assert topic_values(kafka_bootstrap, topic, "read_committed") == [b"next"]
    finally:
        transactions.producer.close()


class AbortOnceWithDeadLetters(SourceWrapper):
    """A KafkaSource whose commit, inside the batch's transaction, fails the first time it is given a
    batch holding malformed records: by then the batch's dead letters and changelog entries are
    produced, so the transaction aborts after producing (as when the group rebalanced meanwhile)."""

    def __init__(self, inner: KafkaSource, malformed: set[bytes]) -> None:
        super().__init__(inner)
        self.malformed = malformed
        self.failed: set[tuple[int, int]] = set()

    def commit(self, batch: list[RawMessage]) -> None:
        self.inner.commit(batch)
        bad = {(m.position.partition, m.position.offset) for m in batch if m.value in self.malformed}
        if bad - self.failed:
            self.failed |= bad
            raise KafkaError("injected: offsets not accepted")


def test_aborted_batches_are_replayed_exactly_once(
    pipeline_env: dict[str, str], scenario: Scenario, kafka_bootstrap: str
) -> None:
    topic = pipeline_env["PROBEWATCH__KAFKA__TOPIC"]
    produce(kafka_bootstrap, topic, scenario)
    overrides = {
        "source": "kafka",
        # Larger batches than the worker tests': fewer transactions, and still each dead letter aborts one.
        "kafka": {"processing_guarantee": "exactly_once", "batch_max_records": 1000},
        "alerting": {"console": False},
    }
    worker = InProcessWorker(load_config(environ=pipeline_env, overrides=overrides), kafka_bootstrap)
    source = AbortOnceWithDeadLetters(worker.source, set(scenario.malformed))
    worker.run(source, len(scenario.lines), timeout=120)
    pipeline = worker.pipeline
    assert len(source.failed) == len(scenario.malformed), "not every dead letter was aborted once"
    aborted = pipeline.metrics.registry.get_sample_value("probewatch_transactions_aborted_total")
    assert aborted and aborted <= len(scenario.malformed)
    # Each aborted batch was counted only when its replay committed, and nothing was skipped as
    # already applied: the aborted checkpoint was not restored.
    assert pipeline.summary.records_read == len(scenario.lines)
    assert pipeline.summary.skipped_replayed == 0
    docs = dlq_documents(kafka_bootstrap, topic, "read_committed")
    letters = Counter((d["source"]["partition"], d["source"]["offset"]) for d in docs)
    assert set(letters) == source.failed and set(letters.values()) == {1}, letters
    # The aborted transactions did produce their dead letters: read_uncommitted sees each at least
    # twice (more when a replayed batch held another dead letter's first attempt too).
    produced = Counter((d["source"]["partition"], d["source"]["offset"]) for d in dlq_documents(kafka_bootstrap, topic))
    assert set(produced) == source.failed and min(produced.values()) >= 2, produced
    check_results(pipeline_env, scenario)  # every record scored once, no session counted twice


def test_a_worker_killed_mid_stream_leaves_each_dead_letter_once(
    pipeline_env: dict[str, str], scenario: Scenario, kafka_bootstrap: str, tmp_path: Path
) -> None:
    env = {**pipeline_env, "PROBEWATCH__KAFKA__PROCESSING_GUARANTEE": "exactly_once"}
    topic = env["PROBEWATCH__KAFKA__TOPIC"]
    log = tmp_path / "workers.log"
    # SIGKILL: whatever the killed worker had produced in its open transaction stays invisible, and
    # its partitions are processed again by the other from the last committed transaction.
    kill_one_worker_mid_stream(env, scenario, kafka_bootstrap, log, workers=2)
    check_results(env, scenario)
    assert committed_dead_letters(kafka_bootstrap, topic) == sorted(scenario.malformed)
    assert "processing guarantee: exactly_once, transactional id" in log.read_text()

"""Exactly-once processing (kafka.processing_guarantee = "exactly_once") against the real services: an
aborted batch leaves nothing visible to read_committed readers, and once replayed every dead letter is
there exactly once and every record is scored exactly once."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from kafka.errors import KafkaError
from pipeline_helpers import (
    Scenario,
    check_results,
    committed_dead_letters,
    dlq_documents,
    kill_one_worker_mid_stream,
    produce,
)

from ingest.deadletter import KafkaDeadLetterSink
from ingest.records import DeadLetter, SourcePosition
from ingest.sources import KafkaSource, RawMessage
from ingest.transactions import KafkaTransactions, ProducerFenced, TransactionAborted
from probewatch.app import Pipeline, new_worker_id
from probewatch.changelog import KafkaChangelog
from probewatch.config import load_config
from probewatch.wiring import build_state_backend, transactional_id
from storage import open_store

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
        with successor.transaction():
            successor.producer.send(topic, b"from its successor")
    finally:
        zombie.producer.close()
        successor.producer.close()


class AbortOnceWithDeadLetters:
    """A KafkaSource whose commit, inside the batch's transaction, fails the first time it is given a
    batch holding malformed records: by then the batch's dead letters and changelog entries are
    produced, so the transaction aborts after producing (as when the group rebalanced meanwhile)."""

    def __init__(self, inner: KafkaSource, malformed: set[bytes]) -> None:
        self.inner = inner
        self.name = inner.name
        self.malformed = malformed
        self.failed: set[tuple[int, int]] = set()

    def batches(self) -> Iterator[list[RawMessage]]:
        return self.inner.batches()

    def commit(self, batch: list[RawMessage]) -> None:
        self.inner.commit(batch)
        bad = {(m.position.partition, m.position.offset) for m in batch if m.value in self.malformed}
        if bad - self.failed:
            self.failed |= bad
            raise KafkaError("injected: offsets not accepted")

    def rewind(self) -> None:
        self.inner.rewind()

    def stop(self) -> None:
        self.inner.stop()

    @property
    def stopped(self) -> bool:
        return self.inner.stopped

    def close(self) -> None:
        self.inner.close()


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
    config = load_config(environ=pipeline_env, overrides=overrides)
    store = open_store(config.storage)
    store.migrate()
    worker_id = new_worker_id(config)
    transactions = KafkaTransactions(transactional_id(config, worker_id), bootstrap_servers=kafka_bootstrap)
    pipeline = Pipeline(
        config,
        store,
        KafkaDeadLetterSink(transactions.producer, config.kafka.effective_dlq_topic),
        [],
        state=build_state_backend(config, store, transactions),
        worker_id=worker_id,
        transactions=transactions,
    )
    source = AbortOnceWithDeadLetters(
        KafkaSource(
            config.kafka,
            on_assigned=pipeline.on_partitions_assigned,
            on_revoked=pipeline.on_partitions_revoked,
            transactions=transactions,
        ),
        set(scenario.malformed),
    )
    deadline = time.monotonic() + 120  # a replay that never completes fails the test, not hangs it
    try:
        for batch in source.batches():
            pipeline.process_batch(batch, source)
            if pipeline.summary.records_read >= len(scenario.lines) or time.monotonic() > deadline:
                break
    finally:
        source.close()
        pipeline.close()
        transactions.producer.close()
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

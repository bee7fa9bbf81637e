"""A worker thrown out of its consumer group while it processes a batch commits nothing of the batch.

kafka-python keeps the group membership on its IO thread. While the application processes a batch,
the member can be thrown out (a session that expired across a broker restart, a stall past
max_poll_interval_ms) and its partitions handed to another worker, which restores their state from
the checkpoints committed so far. Had the batch's checkpoint landed after that restore, it would
overwrite the new owner's newer state of the batch's clients (entries are written only for the
clients a batch changed): their next restore would miss the records in between. In CI that showed
as sessions whose final query count fell short after a broker restart and a rolling restart."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from pipeline_helpers import InProcessWorker, Scenario, SourceWrapper, check_results, produce

from ingest.sources import AssignmentLost, KafkaSource, RawMessage
from ingest.transactions import KafkaTransactions, TransactionAborted
from probewatch.config import load_config
from probewatch.wiring import changelog_topic

pytestmark = pytest.mark.integration

# Past this without a poll, kafka-python's heartbeat thread leaves the group for the consumer.
STALL_MS = 3000


def left_the_group(source: KafkaSource, timeout: float = 30) -> None:
    """Wait until the stalled consumer is no longer a member."""
    deadline = time.monotonic() + timeout
    while source._consumer.group_metadata().generation_id >= 0:
        assert time.monotonic() < deadline, "the stalled consumer is still a member"
        time.sleep(0.2)


def test_the_broker_refuses_the_offsets_of_a_batch_polled_before_the_member_left(
    kafka_bootstrap: str, kafka_topic: Callable[..., str], unique_name: Callable[[str], str]
) -> None:
    """A transactional offset commit from a consumer that is no longer a member at all (generation -1)
    is accepted by the broker unfenced. The source sends the membership the batch was polled under."""
    topic = kafka_topic(partitions=1)
    group = unique_name("group")
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap)
    for i in range(5):
        producer.send(topic, f"record {i}".encode(), partition=0)
    producer.close()
    overrides = {
        "kafka": {
            "bootstrap_servers": kafka_bootstrap,
            "topic": topic,
            "group_id": group,
            "client_id": group,
            "processing_guarantee": "exactly_once",
            "poll_timeout_ms": 1000,
            "session_timeout_ms": 6000,
            "max_poll_interval_ms": STALL_MS,
        }
    }
    config = load_config(environ={}, overrides=overrides).kafka
    transactions = KafkaTransactions(unique_name("txn"), bootstrap_servers=kafka_bootstrap)
    source = KafkaSource(config, transactions=transactions)
    batches = source.batches()
    try:
        deadline = time.monotonic() + 60
        batch: list[RawMessage] = []
        while not batch:
            assert time.monotonic() < deadline, "no records polled"
            batch = next(batches)
        source.confirm_assignment()  # polled just now, by a member
        left_the_group(source)
        with pytest.raises(AssignmentLost):
            source.confirm_assignment()
        # Even past that check (a stall right after it), the broker refuses the offsets.
        with pytest.raises(TransactionAborted), transactions.transaction():
            source.commit(batch)
        reader = KafkaConsumer(bootstrap_servers=kafka_bootstrap, group_id=group, enable_auto_commit=False)
        try:
            assert reader.committed(TopicPartition(topic, 0)) is None
        finally:
            reader.close()
    finally:
        batches.close()
        source.close()
        transactions.producer.close()


class StallsOnce(SourceWrapper):
    """A KafkaSource whose worker stalls, the first time it is asked to confirm a batch with records,
    until its consumer has left the group. It notes the changelog's end offsets at that moment."""

    def __init__(self, inner: KafkaSource, changelog_ends: Callable[[], int]) -> None:
        super().__init__(inner)
        self.changelog_ends = changelog_ends
        self.stalled_batch: list[RawMessage] | None = None
        self.ends_at_stall = -1
        self.commits: list[list[RawMessage]] = []
        self._batch: list[RawMessage] = []

    def batches(self) -> Iterator[list[RawMessage]]:
        for batch in self.inner.batches():
            self._batch = batch
            yield batch

    def confirm_assignment(self) -> None:
        if self.stalled_batch is None and self._batch:
            self.stalled_batch = self._batch
            left_the_group(self.inner)
            self.ends_at_stall = self.changelog_ends()
        self.inner.confirm_assignment()

    def commit(self, batch: list[RawMessage]) -> None:
        self.commits.append(batch)
        self.inner.commit(batch)


@pytest.mark.parametrize("guarantee", ["at_least_once", "exactly_once"])
def test_a_batch_whose_worker_left_the_group_commits_nothing_and_is_processed_again(
    pipeline_env: dict[str, str],
    scenario: Scenario,
    kafka_bootstrap: str,
    guarantee: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    topic = pipeline_env["PROBEWATCH__KAFKA__TOPIC"]
    produce(kafka_bootstrap, topic, scenario)
    overrides = {
        "source": "kafka",
        "kafka": {
            "processing_guarantee": guarantee,
            "batch_max_records": 1000,
            "session_timeout_ms": 6000,
            "max_poll_interval_ms": STALL_MS,
        },
        "alerting": {"console": False},
    }
    config = load_config(environ=pipeline_env, overrides=overrides)
    worker = InProcessWorker(config, kafka_bootstrap)
    changelog = changelog_topic(config)
    ends_reader = KafkaConsumer(bootstrap_servers=kafka_bootstrap)

    def changelog_ends() -> int:
        partitions = [TopicPartition(changelog, p) for p in sorted(ends_reader.partitions_for_topic(changelog) or ())]
        return sum(ends_reader.end_offsets(partitions).values())

    source = StallsOnce(worker.source, changelog_ends)

    def nothing_of_the_stalled_batch_committed(batch: list[RawMessage]) -> None:
        if batch is source.stalled_batch:  # no checkpoint entry, no offsets
            assert changelog_ends() == source.ends_at_stall
            assert not any(committed is batch for committed in source.commits)

    try:
        worker.run(source, len(scenario.lines), timeout=180, after_batch=nothing_of_the_stalled_batch_committed)
    finally:
        ends_reader.close()
    assert source.stalled_batch, "the worker never stalled"
    assert "not committing the batch" in caplog.text
    assert worker.pipeline.metrics.registry.get_sample_value("probewatch_assignment_lost_total") == 1
    assert "partitions lost" in caplog.text  # said where an operator sees it, at the rejoin
    # The batch was processed again from the committed offsets and state: every record counted once.
    assert worker.pipeline.summary.records_read == len(scenario.lines)
    check_results(pipeline_env, scenario)

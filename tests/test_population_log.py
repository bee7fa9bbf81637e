"""The population log against a real broker: every worker reads every worker's contributions, in one
order; under exactly-once, only those of committed batches."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from kafka.errors import KafkaError

from ingest.transactions import KafkaTransactions, TransactionAborted
from probewatch.population_log import KafkaPopulationLog

pytestmark = pytest.mark.integration


def test_workers_read_every_contribution_in_one_order(kafka_bootstrap: str, unique_name: Callable[[str], str]) -> None:
    topic = unique_name("population")
    options = {"bootstrap_servers": kafka_bootstrap}
    first, second = KafkaPopulationLog(topic, options, 1), KafkaPopulationLog(topic, options, 1)
    try:
        for worker, contributions in [
            (first, [("m1", b"a1")]),
            (second, [("m1", b"b1"), ("m2", b"b2")]),
            (first, [("m2", b"a2")]),
        ]:
            worker.send(contributions)
            worker.flush()
        expected = [(0, "m1", b"a1"), (1, "m1", b"b1"), (2, "m2", b"b2"), (3, "m2", b"a2")]
        for worker in (first, second):
            worker.seek(0)
            assert worker.read(to_end=True) == expected
        # A restored state reads on from its lowest folded offset, and then only what is new.
        second.seek(2)
        assert second.read(to_end=True) == expected[2:]
        first.send([("m1", b"a3")])
        first.flush()
        assert second.read(to_end=True) == [(4, "m1", b"a3")]
        assert second.read(to_end=True) == []
    finally:
        first.close()
        second.close()


def test_contributions_of_an_aborted_batch_are_never_read(
    kafka_bootstrap: str, unique_name: Callable[[str], str]
) -> None:
    topic = unique_name("population")
    options = {"bootstrap_servers": kafka_bootstrap}
    transactions = KafkaTransactions(unique_name("txn"), **options)
    population_log = KafkaPopulationLog(topic, options, 1, transactional_producer=transactions.producer)
    try:
        with transactions.transaction():
            population_log.send([("m", b"committed")])
            population_log.flush()
        with pytest.raises(TransactionAborted), transactions.transaction():
            population_log.send([("m", b"aborted")])
            population_log.flush()
            raise KafkaError("injected after producing")
        # The log ends with the aborted batch and its marker: reading to the end still returns.
        population_log.seek(0)
        assert [value for _, _, value in population_log.read(to_end=True)] == [b"committed"]
    finally:
        population_log.close()
        transactions.producer.close()

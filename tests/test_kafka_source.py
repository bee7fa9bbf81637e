"""KafkaSource against the real broker: every partition whose records it hands out has been announced
(restored) first, even when kafka-python's rebalance callback did not say so."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import msgspec
import pytest
from kafka import KafkaProducer

from ingest.sources import KafkaSource, RawMessage
from probewatch.config import KafkaConfig, load_config

pytestmark = pytest.mark.integration

Event = tuple[str, list[int]]


def source_config(bootstrap: str, topic: str, group: str) -> KafkaConfig:
    overrides = {
        "kafka": {
            "bootstrap_servers": bootstrap,
            "topic": topic,
            "group_id": group,
            "client_id": group,
            "poll_timeout_ms": 2000,
            "session_timeout_ms": 6000,
        }
    }
    return load_config(environ={}, overrides=overrides).kafka


def produce_to(bootstrap: str, topic: str, partitions: list[int], tag: str) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap)
    try:
        for partition in partitions:
            producer.send(topic, f"{tag} p{partition}".encode(), partition=partition).get(timeout=30)
    finally:
        producer.close()


def poll_until(
    batches: Iterator[list[RawMessage]], events: list[Event], done: Callable[[], bool], timeout: float = 60
) -> list[bytes]:
    """Poll the source until ``done()``; each batch handed out is logged in ``events`` after the
    announcements its poll made, as ``("batch", partitions of its records)``. Returns the values of
    the records handed out."""
    values: list[bytes] = []
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"timed out; events so far: {events}"
        batch = next(batches)
        events.append(("batch", sorted({m.position.partition for m in batch})))
        values += [m.value for m in batch]
    return values


def test_an_assignment_change_without_a_callback_is_announced_before_its_records(
    kafka_bootstrap: str, kafka_topic: Callable[..., str], unique_name: Callable[[str], str]
) -> None:
    topic = kafka_topic(partitions=3)
    events: list[Event] = []
    source = KafkaSource(
        source_config(kafka_bootstrap, topic, unique_name("group")),
        on_assigned=lambda partitions: events.append(("restore", list(partitions))),
        on_revoked=lambda partitions: events.append(("drop", list(partitions))),
    )
    batches = source.batches()
    try:
        # The first assignment comes through the rebalance listener.
        poll_until(batches, events, lambda: ("restore", [0, 1, 2]) in events)
        assert events[0] == ("restore", [0, 1, 2]), events
        assert [e for e in events if e[0] != "batch"] == [("restore", [0, 1, 2])]
        assert source._owned == {0, 1, 2}

        # Steady polls that hand out records announce nothing.
        events.clear()
        produce_to(kafka_bootstrap, topic, [0, 1, 2], "steady")
        poll_until(batches, events, lambda: sum(len(e[1]) for e in events) >= 3)
        assert all(kind == "batch" for kind, _ in events), events

        # A callback that went missing: partition 1 was assigned without a restore, and partition 7
        # (the topic has 3) is believed owned though the consumer does not have it.
        produce_to(kafka_bootstrap, topic, [1, 1, 1], "after the missed callback")
        source._owned.discard(1)
        source._owned.add(7)
        events.clear()
        poll_until(batches, events, lambda: any(kind == "batch" and 1 in ps for kind, ps in events))
        # The very poll after the change announced it, and handed out partition 1's records (already
        # on the broker, so this poll fetches them) only after its restore.
        assert events == [("drop", [7]), ("restore", [1]), ("batch", [1])], events
        assert source._owned == {0, 1, 2}

        # And steady again.
        events.clear()
        produce_to(kafka_bootstrap, topic, [0, 1, 2], "steady again")
        poll_until(batches, events, lambda: sum(len(e[1]) for e in events) >= 3)
        assert all(kind == "batch" for kind, _ in events), events
    finally:
        batches.close()
        source.close()


def test_a_restore_that_failed_is_announced_again_before_any_record(
    kafka_bootstrap: str, kafka_topic: Callable[..., str], unique_name: Callable[[str], str]
) -> None:
    topic = kafka_topic(partitions=3)
    produce_to(kafka_bootstrap, topic, [0, 1, 2], "waiting")
    events: list[Event] = []

    def restore(partitions: list[int]) -> None:
        events.append(("restore", list(partitions)))
        if len(events) == 1:  # e.g. the changelog could not be read
            raise RuntimeError("injected: state restore failed")

    source = KafkaSource(
        source_config(kafka_bootstrap, topic, unique_name("group")),
        on_assigned=restore,
        on_revoked=lambda partitions: events.append(("drop", list(partitions))),
    )
    batches = source.batches()
    try:
        # The source hands out nothing from the poll whose restore failed, puts its records back, and
        # restores the partitions again at the next poll, before handing out their records.
        values = poll_until(batches, events, lambda: sum(len(ps) for kind, ps in events if kind == "batch") >= 3)
        first_records = next(i for i, (kind, ps) in enumerate(events) if kind == "batch" and ps)
        announced = [e for e in events[:first_records] if e[0] != "batch"]
        assert announced == [("restore", [0, 1, 2]), ("restore", [0, 1, 2])], events
        assert sorted(values) == [b"waiting p0", b"waiting p1", b"waiting p2"]  # none lost, none twice
        assert source._owned == {0, 1, 2}
    finally:
        batches.close()
        source.close()


def test_a_slow_restore_runs_on_the_polling_thread_and_the_worker_keeps_its_partitions(
    kafka_bootstrap: str, kafka_topic: Callable[..., str], unique_name: Callable[[str], str]
) -> None:
    """Restoring a large changelog takes a while. kafka-python runs its rebalance listener on the IO
    loop that also sends heartbeats: a restore there longer than the session timeout would have the
    coordinator throw the worker out of the group, and every restart or scale-out would turn into a
    rebalance storm. The source restores on the polling thread instead."""
    topic = kafka_topic(partitions=3)
    produce_to(kafka_bootstrap, topic, [0, 1, 2], "waiting")
    config = source_config(kafka_bootstrap, topic, unique_name("group"))
    events: list[Event] = []
    threads: list[int] = []

    def slow_restore(partitions: list[int]) -> None:
        events.append(("restore", list(partitions)))
        threads.append(threading.get_ident())
        if len(events) == 1:
            time.sleep(1.5 * config.session_timeout_ms / 1000)

    source = KafkaSource(
        config, on_assigned=slow_restore, on_revoked=lambda partitions: events.append(("drop", list(partitions)))
    )
    batches = source.batches()
    try:
        poll_until(batches, events, lambda: sum(len(ps) for kind, ps in events if kind == "batch") >= 3)
        # A few more polls, past a heartbeat round: a member thrown out would be told here.
        for _ in range(3):
            events.append(("batch", sorted({m.position.partition for m in next(batches)})))
        assert threads == [threading.get_ident()], "restored on another thread"
        assert [e for e in events if e[0] != "batch"] == [("restore", [0, 1, 2])], events
        assert source._owned == {0, 1, 2}
    finally:
        batches.close()
        source.close()


class BackgroundMember:
    """A KafkaSource of the same group polled on its own thread (a member must poll for a join to
    complete); ``paused`` holds its polls, as a worker busy with a long batch would."""

    def __init__(self, config: KafkaConfig) -> None:
        self.events: list[Event] = []
        self.source = KafkaSource(
            config,
            on_assigned=lambda partitions: self.events.append(("restore", list(partitions))),
            on_revoked=lambda partitions: self.events.append(("drop", list(partitions))),
        )
        self.paused = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll)
        self._thread.start()

    def _poll(self) -> None:
        batches = self.source.batches()
        try:
            while not self._stop.is_set():
                if self.paused.is_set():
                    time.sleep(0.05)
                else:
                    next(batches)
        finally:
            batches.close()
            self.source.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def test_an_eager_rebalance_restores_only_what_the_group_settles_on(
    kafka_bootstrap: str, kafka_topic: Callable[..., str], unique_name: Callable[[str], str]
) -> None:
    """Under an eager strategy kafka-python revokes every partition when a rejoin begins but keeps them
    in its assignment until the join completes, which can take several polls (here a busy member
    rejoins late). The source drops them at once and restores only what the completed join gives
    it, not the old assignment again in the middle of the rejoin (the group may be handing those
    partitions to another worker meanwhile)."""
    topic = kafka_topic(partitions=3)
    config = msgspec.structs.replace(
        source_config(kafka_bootstrap, topic, unique_name("group")), assignment_strategy="range", poll_timeout_ms=500
    )
    events: list[Event] = []
    first = KafkaSource(
        config,
        on_assigned=lambda partitions: events.append(("restore", list(partitions))),
        on_revoked=lambda partitions: events.append(("drop", list(partitions))),
    )
    batches = first.batches()
    members: list[BackgroundMember] = []
    try:
        poll_until(batches, events, lambda: ("restore", [0, 1, 2]) in events)
        members.append(BackgroundMember(config))
        poll_until(batches, events, lambda: 0 < len(first._owned) < 3 and bool(members[0].source._owned))
        held = sorted(first._owned)
        events.clear()
        members[0].paused.set()  # busy: it rejoins only when it polls again
        members.append(BackgroundMember(config))
        deadline = time.monotonic() + 5  # polls while the join waits for the busy member
        poll_until(batches, events, lambda: time.monotonic() > deadline)
        assert [e for e in events if e[0] != "batch"] == [("drop", held)], events
        assert not any(ps for kind, ps in events if kind == "batch"), "records handed out mid-rejoin"
        members[0].paused.clear()
        poll_until(batches, events, lambda: any(kind == "restore" for kind, _ in events))
        announced = [e for e in events if e[0] != "batch"]
        assert len(announced) == 2 and announced[1][0] == "restore" and len(announced[1][1]) == 1, events
        assert first._owned == set(announced[1][1])
    finally:
        for member in members:
            member.close()
        batches.close()
        first.close()


def test_a_batch_holds_no_more_than_a_fetch_brings_per_partition(
    kafka_bootstrap: str, kafka_topic: Callable[..., str], unique_name: Callable[[str], str]
) -> None:
    """kafka.max_partition_fetch_bytes bounds what a worker buffers per partition, and with it a batch
    of a worker that is behind: records beyond it wait on the broker for the next poll, however large
    batch_max_records is."""
    topic = kafka_topic(partitions=1)
    value = b"x" * 400
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap)
    try:
        for _ in range(40):  # one record batch each: a fetch's limit is counted in whole record batches
            producer.send(topic, value, partition=0).get(timeout=30)
    finally:
        producer.close()
    config = msgspec.structs.replace(
        source_config(kafka_bootstrap, topic, unique_name("group")),
        batch_max_records=1000,
        max_partition_fetch_bytes=4096,
    )
    source = KafkaSource(config)
    batches = source.batches()
    sizes: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while sum(sizes) < 40:
            assert time.monotonic() < deadline, f"read {sum(sizes)} of 40 records in batches {sizes}"
            batch = next(batches)
            if batch:
                sizes.append(len(batch))
    finally:
        batches.close()
        source.close()
    assert sum(sizes) == 40
    assert max(sizes) * len(value) <= 2 * 4096, sizes  # each fetch about 4 KB: a few records at a time
    assert len(sizes) >= 5, sizes

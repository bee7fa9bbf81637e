"""The Kafka changelog state backend against a real broker: a checkpoint counts only when whole."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest

from probewatch.changelog import KafkaChangelog
from probewatch.config import Config, load_config
from probewatch.wiring import changelog_topic
from storage.schema import POSITION_KEY

pytestmark = pytest.mark.integration


def test_an_unfinished_checkpoint_is_not_restored(kafka_bootstrap: str, kafka_topic: Callable[..., str]) -> None:
    source = kafka_topic(partitions=2)
    changelog = KafkaChangelog(f"{source}.changelog", source, {"bootstrap_servers": kafka_bootstrap}, 1)
    try:
        changelog.save_state(0, {"a": b"a1", "b": b"b1"}, position=100, version=1)
        changelog.save_state(1, {"c": b"c1"}, position=7, version=1)
        changelog.save_state(0, {"a": b"a2", "b": None}, position=200, version=2)
        # A worker killed in the middle of its next flush: the entries reached the broker, the
        # position message that completes the checkpoint did not.
        for key, value in ((b"0\x1fa", b"a3"), (b"0\x1fd", b"d3")):
            changelog.producer.send(changelog.topic, key=key, value=value, partition=0)
        changelog.flush()
        states, positions = changelog.load_state([0, 1])
        # State and position agree: records after offset 200 are replayed onto the state they left.
        assert positions == {0: 200, 1: 7}
        assert states == {0: {"a": b"a2"}, 1: {"c": b"c1"}}
        assert POSITION_KEY not in states[0]
    finally:
        changelog.producer.close()


def test_a_long_replay_reports_progress(kafka_bootstrap: str, kafka_topic: Callable[..., str]) -> None:
    """Restoring runs on the polling thread; the liveness check must see it working, not stalled."""
    source = kafka_topic(partitions=1)
    changelog = KafkaChangelog(f"{source}.changelog", source, {"bootstrap_servers": kafka_bootstrap}, 1)
    try:
        for position in range(1, 4):
            changelog.save_state(0, {f"client-{i}": b"x" * 100 for i in range(10_000)}, position, version=1)
        changelog.flush()
        calls: list[float] = []
        states, positions = changelog.load_state([0], progress=lambda: calls.append(0.0))
        assert positions == {0: 3} and len(states[0]) == 10_000
        assert len(calls) >= 3  # the replay polls 10,000 messages at a time: 30,003 of them
    finally:
        changelog.producer.close()


def test_each_consumer_group_has_its_own_changelog_and_an_old_one_is_kept(
    kafka_bootstrap: str, kafka_topic: Callable[..., str], caplog: pytest.LogCaptureFixture
) -> None:
    """Two applications reading one topic (a canary beside production) must not restore each other's
    sessions: the default changelog is the group's. A deployment whose state is in the topic-only name
    of earlier versions keeps it (a new name would start every session from zero), and is told."""

    def config(topic: str, group: str, **state: str) -> Config:
        kafka = {"bootstrap_servers": kafka_bootstrap, "topic": topic, "group_id": group}
        return load_config(environ={}, overrides={"source": "kafka", "kafka": kafka, "state": state})

    source = kafka_topic(partitions=1)
    assert changelog_topic(config(source, "prod")) == f"{source}.prod.changelog"
    assert changelog_topic(config(source, "canary")) == f"{source}.canary.changelog"
    assert changelog_topic(config(source, "prod", changelog_topic="mine")) == "mine"
    kafka_topic(f"{source}.changelog", partitions=1)  # the state of an earlier version's deployment
    with caplog.at_level(logging.WARNING, logger="probewatch"):
        assert changelog_topic(config(source, "prod")) == f"{source}.changelog"
    assert f"state.changelog_topic = '{source}.changelog'" in caplog.text
    # Once the group's own changelog exists, it is used whatever else is there.
    kafka_topic(f"{source}.prod.changelog", partitions=1)
    assert changelog_topic(config(source, "prod")) == f"{source}.prod.changelog"

"""Through the REAL store (chDB, i.e. ClickHouse, in a tmp dir): alerts written by write_batch are the
outbox; a receiver outage plus a crash leaves them undelivered; after the restart the policy is rebuilt
from the outbox (no second page for an ongoing attack) and the sweep delivers every alert once."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from pipeline_helpers import HandedBatches

from alerting.alert import ROLLUP_KIND
from alerting.dispatch import DeliverySettings, Dispatcher
from alerting.outbox import StoreOutbox
from alerting.policy import AlertPolicy, PolicySettings, rollup_slot
from alerting.receivers import WebhookReceiver
from alerting.render import AlertFormatter
from alerting.testing import RecordingServer
from detectors.scores import SessionScore
from ingest.deadletter import FileDeadLetterSink
from probewatch.app import Pipeline
from probewatch.changelog import StoreStateBackend
from probewatch.config import ChdbConfig, StorageConfig, load_config
from storage import BatchStats, StoredBatch, open_store

pytestmark = pytest.mark.integration

FAST = DeliverySettings(backoff_initial_s=0.05, backoff_max_s=0.3, sweep_s=0.3, tick_s=0.2, shutdown_timeout_s=1)
SETTINGS = PolicySettings(cooldown_s=600, renotify_s=0, resolve_after_s=3600)
T0 = time.time() - 3600


def score(client: str, t: float, n: int, closed: bool = False) -> SessionScore:
    return SessionScore(
        model_id="fraud-v3",
        client_id=client,
        session_id="s1",
        event_time=t,
        first_seen=T0,
        n_queries=n,
        client_queries=n,
        score=0.9,
        kind_scores={"extraction": 0.9},
        signals={"distinct_cells": 312.0},
        reasons=["extraction: 312 distinct cells in 400 queries; 97th percentile of clients is 40"],
        source_ips=["203.0.113.7"],
        closed=closed,
        peak_kind_scores={"extraction": 0.9},
    )


def test_outbox_restart_recovery_through_the_real_store(tmp_path: Path) -> None:
    store = open_store(StorageConfig(backend="chdb", chdb=ChdbConfig(path=str(tmp_path / "db"))))
    try:
        store.migrate()
        down = RecordingServer().start()
        port = down.port
        down.stop()
        hook = WebhookReceiver("siem", f"http://127.0.0.1:{port}/hook", AlertFormatter())

        # Run 1: three attacks page; the receiver is down; the process dies.
        policy = AlertPolicy(SETTINGS)
        scores = [score(f"acct-{i}", T0 + 60, 100) for i in range(3)]
        first = policy.evaluate(scores)
        assert [a.notification for a in first] == ["new"] * 3
        store.write_batch(StoredBatch(batch_id="b1", scores=scores, alerts=first, stats=BatchStats(worker="t")))
        dispatcher = Dispatcher([hook], StoreOutbox(store), FAST).start()
        dispatcher.submit(first)
        time.sleep(0.8)
        dispatcher.close(timeout=0.1)
        assert sorted(a.alert_id for a, _ in store.undelivered(["siem"], 100)) == sorted(a.alert_id for a in first)
        pending = store.query(
            "SELECT argMax(status, version), argMax(last_error, version) FROM {t:Identifier} "
            "WHERE receiver = 'siem' GROUP BY alert_id",
            {"t": f"{store.database}.alert_deliveries"},
        )
        assert pending and all(s == "pending" and "ConnectionError" in e for s, e in pending)

        # Run 2: the policy is rebuilt from the outbox; the attacks go on (no new page), acct-0 ends.
        outbox = StoreOutbox(store)
        restarted = AlertPolicy(SETTINGS)
        assert restarted.restore(outbox.latest_alerts(horizon_s=10_000)) == 3
        later = [score(f"acct-{i}", T0 + 120, 125) for i in range(3)] + [score("acct-0", T0 + 180, 150, closed=True)]
        second = restarted.evaluate(later)
        assert [(a.client_id, a.notification) for a in second] == [("acct-0", "resolve")]
        store.write_batch(StoredBatch(batch_id="b2", scores=later, alerts=second, stats=BatchStats(worker="t")))

        # The receiver is back: the sweep delivers everything the outbox holds, once, in order.
        up = RecordingServer(port=port).start()
        try:
            dispatcher = Dispatcher([WebhookReceiver("siem", f"{up.url}/hook", AlertFormatter())], outbox, FAST)
            dispatcher.start()
            assert up.wait_for(lambda reqs: len(reqs) >= 4, 15)
            assert dispatcher.flush(5)
            time.sleep(1.0)  # further sweeps find nothing left
            dispatcher.close()
            delivered = [r.headers["idempotency-key"] for r in up.requests]
            expected = [a.alert_id for a in first + second]
            assert sorted(delivered) == sorted(expected) and len(delivered) == len(set(delivered))
            assert delivered.index(second[0].alert_id) > delivered.index(first[0].alert_id)
            assert store.undelivered(["siem"], 100) == []
            states = store.query(
                "SELECT alert_id, argMax(status, version) FROM {t:Identifier} WHERE receiver = 'siem' "
                "GROUP BY alert_id",
                {"t": f"{store.database}.alert_deliveries"},
            )
            assert sorted(states) == sorted((alert_id, "delivered") for alert_id in expected)
        finally:
            up.stop()
    finally:
        store.close()


def test_a_storm_roll_up_goes_with_the_partition_it_names(tmp_path: Path) -> None:
    """Two workers of a group on four partitions, one real outbox (chDB). Worker A reads partitions 2
    and 3: it pages half of max_per_minute and rolls its storm up under a roll-up of partition 2.
    Worker B, on partitions 0 and 1, does not take that roll-up up; when partition 2 moves to B, A
    hands the roll-up over and B restores it from the outbox, so exactly one worker holds it."""
    config = load_config(
        environ={},
        overrides={
            "source": "kafka",
            "state": {"backend": "clickhouse", "shared_baselines": False},
            "storage": {"backend": "chdb", "chdb": {"path": str(tmp_path / "db")}},
            "alerting": {"console": False, "max_per_minute": 4, "cooldown_s": 600, "renotify_s": 0},
        },
    )
    store = open_store(config.storage)
    store.migrate()

    def worker(name: str) -> Pipeline:
        return Pipeline(
            config, store, FileDeadLetterSink(str(tmp_path / f"{name}.dlq")), [], state=StoreStateBackend(store)
        )

    a, b, source = worker("a"), worker("b"), HandedBatches(partitions=4)
    try:
        a.on_partitions_assigned([2, 3])
        b.on_partitions_assigned([0, 1])
        a.process_batch([], source)  # the batch after the poll that assigned them
        b.process_batch([], source)
        assert a.policy.page_cap == 2 and rollup_slot(a.policy.rollup_client) == 2
        alerts = a.policy.evaluate([score(f"acct-{i}", T0 + 60 + i, 100) for i in range(10)])
        assert len([x for x in alerts if x.notification == "new"]) == 3  # two pages and the roll-up
        (storm,) = [x for x in alerts if x.kind == ROLLUP_KIND]
        store.write_batch(StoredBatch(batch_id="a1", alerts=alerts, stats=BatchStats(worker="a")))
        b.on_partitions_assigned([0, 1])  # assigned again: its restore reads A's roll-up, and leaves it
        assert storm.dedup_key not in b.policy.incidents
        a.on_partitions_revoked([2])
        assert storm.dedup_key not in a.policy.incidents
        b.on_partitions_assigned([2])
        assert storm.dedup_key in b.policy.incidents
    finally:
        a.close()
        b.close()

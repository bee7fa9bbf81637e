"""Storage: the same tests against both backends — chDB in a temporary directory and the real
ClickHouse server (Debian's 18.16, deploy/local/clickhouse.sh; ``integration``) — plus unit tests of
the shared schema, SQL binding and row conversion, and a cross-backend equality check.

The server tests FAIL (never skip) when ClickHouse is not answering at $PROBEWATCH_TEST_CLICKHOUSE
(default 127.0.0.1:19000). Every test uses its own database and drops it afterwards.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import random
import re
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest

from alerting.alert import Alert
from detectors.scores import SessionScore
from ingest.records import QueryRecord, SourcePosition
from probewatch.config import ChdbConfig, ClickHouseServerConfig, StorageConfig
from storage import (
    BatchStats,
    Delivery,
    StorageError,
    StorageUnavailable,
    Store,
    StoredBatch,
    TopSession,
    open_store,
    sample_event,
)
from storage.base import BaseStore, parse_version
from storage.chdb_store import converter_for, json_compact_rows, rowbinary_rows
from storage.models import DeliveryStatus
from storage.rows import ALERT_SELECT_COLUMNS, IpHasher, RowBuilder, alert_from_row
from storage.schema import (
    ALERT_DELIVERIES,
    ALERTS,
    DETECTOR_STATE,
    EVENTS,
    PIPELINE_BATCHES,
    POSITION_KEY,
    SCHEMA_MIGRATIONS,
    SCHEMA_VERSION,
    SESSION_SCORES,
    TABLES,
    describe_markdown,
    engine_ttl,
    render_create_table,
    supports_ttl,
)
from storage.sql import BindError, bind, quote_string, render_literal, validate_identifier


def unique_name(prefix: str) -> str:
    """A database name no other test (run) uses."""
    return f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:8]}"


NOW = float(int(time.time())) + 0.25  # recent: TTL'd tables keep the rows on every backend
IP_KEY = b"test-ip-hash-key"

BACKENDS = [
    pytest.param("chdb", id="chdb"),
    pytest.param("clickhouse", id="clickhouse", marks=pytest.mark.integration),
]


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="session")
def chdb_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # chDB serves one data directory per process, so all chDB tests share one (and use their own databases).
    return tmp_path_factory.mktemp("chdb")


StoreFactory = Callable[..., BaseStore]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def make_store(backend: str, request: pytest.FixtureRequest, chdb_dir: Path) -> Iterator[StoreFactory]:
    """Factory: ``make_store(**storage_overrides)`` opens and migrates a store of this test's backend
    on a fresh database; every database created is dropped after the test."""
    server: tuple[str, int] | None = None
    if backend == "clickhouse":
        server = request.getfixturevalue("clickhouse_server")
    opened: list[BaseStore] = []

    def make(database: str | None = None, migrate: bool = True, **overrides: Any) -> BaseStore:
        config = storage_config(backend, database or unique_name("pw_storage"), chdb_dir, server, **overrides)
        store = open_store(config, ip_hash_key=IP_KEY)
        assert isinstance(store, BaseStore)
        opened.append(store)
        if migrate:
            store.migrate()
        return store

    yield make
    databases = {s.database for s in opened}
    for store in opened:
        store.close()
    if databases:
        cleaner = open_store(storage_config(backend, "default", chdb_dir, server))
        try:
            for database in databases:
                cleaner.query(f"DROP DATABASE IF EXISTS {database}")
        finally:
            cleaner.close()


@pytest.fixture
def store(make_store: StoreFactory) -> BaseStore:
    return make_store()


def storage_config(
    backend: str, database: str, chdb_dir: Path, server: tuple[str, int] | None, **overrides: Any
) -> StorageConfig:
    host, port = server or ("127.0.0.1", 19000)
    fields: dict[str, Any] = {
        "backend": backend,
        "database": database,
        "chdb": ChdbConfig(path=str(chdb_dir)),
        "clickhouse": ClickHouseServerConfig(host=host, port=port, connect_timeout_s=5.0),
    }
    fields.update(overrides)
    return StorageConfig(**fields)


# ------------------------------------------------------------------------------------------ data


def make_score(i: int, n_queries: int = 10, **changes: Any) -> SessionScore:
    rng = random.Random(i * 7919 + n_queries)
    kinds = {"extraction": rng.random(), "boundary_probing": rng.random(), "volume": rng.random() / 3}
    fields: dict[str, Any] = {
        "model_id": f"model-{i % 2}",
        "client_id": f"client-{i % 5}",
        "session_id": f"s-{i}",
        "event_time": NOW + i + rng.random(),
        "first_seen": NOW - 600.123456789 + i,
        "n_queries": n_queries,
        "client_queries": 1000 * i + n_queries,
        "score": max(kinds.values()),
        "kind_scores": kinds,
        "signals": {
            "distinct_cells": float(rng.randint(0, 400)),
            "entropy": rng.random() * 5,
            "tiny": 1e-300,
        },
        "reasons": [f"extraction: {i} distinct cells in 400 queries; 97th percentile of clients is 40"],
        "source_ips": ["203.0.113.7", "2001:db8::1"],
        "closed": False,
        "warming_up": i % 3 == 0,
        "state_bytes": 1234 + i,
        "crossed_kinds": ["extraction"] if i % 4 == 1 else [],
        "peak_kind_scores": {k: min(1.0, v + 0.1) for k, v in kinds.items()},
    }
    fields.update(changes)
    return SessionScore(**fields)


def make_alert(i: int, **changes: Any) -> Alert:
    fields: dict[str, Any] = {
        "alert_id": f"alert-{i:04d}",
        "dedup_key": f"model-0|client-{i}|extraction",
        "status": "firing",
        "kind": "extraction",
        "model_id": "model-0",
        "client_id": f"client-{i}",
        "session_id": f"s-{i}",
        "severity": "high",
        "score": 0.9 + i / 1000,
        "n_queries": 400 + i,
        "event_time": NOW + i + 0.123,
        "first_seen": NOW - 3600.5,
        "reasons": ["extraction: 312 distinct cells in 400 queries", "ünïcødé ✓ 'quoted' \\ back\nslash"],
        "signals": {"distinct_cells": 312.0, "margin_p10": 0.015625},
        "source_ips": ["203.0.113.7"],
        "summary": f"client-{i} is extracting model-0",
        "notification": "new",
        "seq": 0,
    }
    fields.update(changes)
    return Alert(**fields)


def make_record(offset: int, partition: int = 0, **changes: Any) -> QueryRecord:
    fields: dict[str, Any] = {
        "ts": NOW + offset / 1000,
        "client_id": f"client-{offset % 3}",
        "model_id": "model-0",
        "position": SourcePosition("inference-logs", partition, offset),
        "request_id": f"req-{offset}",
        "session_id": None if offset % 2 else f"s-{offset % 4}",
        "source_ip": "198.51.100.23",
        "vector": np.array([0.1, -2.5, offset], dtype=np.float32),
        "label": str(offset % 10),
        "confidence": 0.75,
        "margin": None if offset % 2 else 0.5,
        "latency_ms": 12.5,
        "status": 200,
    }
    fields.update(changes)
    return QueryRecord(**fields)


def make_batch(batch_id: str = "b-1", n_scores: int = 20, n_alerts: int = 5, n_events: int = 50) -> StoredBatch:
    return StoredBatch(
        batch_id=batch_id,
        scores=[make_score(i) for i in range(n_scores)],
        alerts=[make_alert(i) for i in range(n_alerts)],
        events=[make_record(o) for o in range(n_events)],
        stats=BatchStats(
            worker="worker-1",
            finished_at=NOW,
            records=n_events,
            dead_lettered=2,
            batch_latency_ms=12.5,
            lag=-1,
            dlq_reasons={"not valid JSON": 1, "contract violation": 1},
        ),
    )


def same(a: Any, b: Any) -> bool:
    """Equality treating NaN as equal to NaN (recursively)."""
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or a == b
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return bool(a == b)


# ------------------------------------------------------------------------------------------ both backends


def test_store_satisfies_protocol(store: BaseStore) -> None:
    assert isinstance(store, Store)
    assert store.server_version() >= (18, 16)


def test_migrate_is_idempotent(store: BaseStore) -> None:
    def snapshot() -> tuple[Any, ...]:
        tables = store.query(
            "SELECT name, engine_full FROM system.tables WHERE database = {db:String} ORDER BY name",
            {"db": store.database},
        )
        columns = store.query(
            "SELECT table, name, type, default_expression FROM system.columns "
            "WHERE database = {db:String} ORDER BY table, name",
            {"db": store.database},
        )
        versions = store.query(f"SELECT version, description FROM {store.database}.schema_migrations")
        return tables, columns, versions

    before = snapshot()
    assert [name for name, _ in before[0]] == sorted(t.name for t in TABLES)
    assert before[2] == [(SCHEMA_VERSION, before[2][0][1])]
    store.migrate()
    store.migrate()
    assert snapshot() == before


def test_migrate_adds_missing_columns_and_refuses_a_newer_schema(store: BaseStore) -> None:
    db = store.database
    store.query(f"DROP TABLE {db}.alerts")
    store.query(
        f"CREATE TABLE {db}.alerts (alert_id String, event_time DateTime) ENGINE = MergeTree() ORDER BY alert_id"
    )
    store.migrate()
    names = [r[0] for r in store.query(f"SELECT name FROM system.columns WHERE database = '{db}' AND table = 'alerts'")]
    assert names == [c.name for c in ALERTS.columns]

    store.query(f"INSERT INTO {db}.schema_migrations (version, description) SELECT {SCHEMA_VERSION + 1}, 'future'")
    with pytest.raises(StorageError, match="newer than this probewatch"):
        store.migrate()


def test_ttl_only_where_the_server_supports_it(make_store: StoreFactory) -> None:
    store = make_store(retention_days=7)
    engines = dict(store.query(f"SELECT name, engine_full FROM system.tables WHERE database = '{store.database}'"))
    for table in TABLES:
        expected = ("inserted_at", 7) if table.ttl_column and supports_ttl(store.server_version()) else None
        assert engine_ttl(engines[table.name]) == expected, (table.name, engines[table.name])
    if store.server_version() < (19, 6):
        assert not any("TTL" in e for e in engines.values())

    # Changing the retention re-applies the TTL (where there is one) on the next migrate.
    again = make_store(database=store.database, retention_days=9)
    engines = dict(again.query(f"SELECT name, engine_full FROM system.tables WHERE database = '{store.database}'"))
    want = ("inserted_at", 9) if supports_ttl(store.server_version()) else None
    assert engine_ttl(engines["session_scores"]) == want
    assert engine_ttl(engines["detector_state"]) is None

    off = make_store(retention_days=0)
    engines = dict(off.query(f"SELECT name, engine_full FROM system.tables WHERE database = '{off.database}'"))
    assert not any("TTL" in e for e in engines.values())


def test_write_batch_twice_gives_no_duplicates(make_store: StoreFactory) -> None:
    store = make_store(raw_sample_rate=0.5)
    batch = make_batch()
    store.write_batch(batch)
    first = store.counts()
    store.write_batch(make_batch())  # the same batch, rebuilt: a replay after a crash
    assert store.counts() == first
    sampled = sum(sample_event(r.position, 0.5) for r in batch.events)
    assert 0 < sampled < len(batch.events)
    assert first == {
        "schema_migrations": 1,
        "session_scores": len(batch.scores),
        "alerts": len(batch.alerts),
        "alert_deliveries": 0,
        "events": sampled,
        "pipeline_batches": 1,
        "detector_state": 0,
    }
    # The physical rows are duplicated until a merge; readers see them once.
    raw = store.query(f"SELECT count() FROM {store.database}.session_scores")[0][0]
    assert len(batch.scores) <= raw <= 3 * len(batch.scores)
    (stats,) = store.query(
        f"SELECT batch_id, worker, records, dead_lettered, scored_sessions, alerts, events_sampled, lag, "
        f"dlq_reasons, dlq_counts, store_latency_ms FROM {store.database}.pipeline_batches FINAL"
    )
    assert stats[:10] == (
        "b-1",
        "worker-1",
        50,
        2,
        20,
        5,
        sampled,
        -1,
        ["contract violation", "not valid JSON"],
        [1, 1],
    )
    assert stats[10] > 0.0  # measured by the store


def test_empty_batch_and_sampling_off(store: BaseStore) -> None:
    store.write_batch(StoredBatch(batch_id="empty"))
    store.write_batch(StoredBatch(batch_id="events-only", events=[make_record(1)]))  # raw_sample_rate = 0
    assert store.counts()["events"] == 0
    assert store.counts()["pipeline_batches"] == 0


def test_session_scores_round_trip(store: BaseStore) -> None:
    scores = [
        make_score(1),
        make_score(2, reasons=[], source_ips=[], signals={}, kind_scores={}, score=0.0, peak_kind_scores={}),
        make_score(
            3,
            reasons=["ünïcødé ✓ — 日本語 😀", "quote ' and \" and \\ and \n newline and \t tab", "null"],
            signals={"nan": math.nan, "inf": math.inf, "-inf": -math.inf, "big": 1.7976931348623157e308},
            closed=True,
            n_queries=2**32 - 1,
            client_queries=2**64 - 1,
        ),
    ]
    store.write_batch(StoredBatch(batch_id="rt", scores=scores))
    rows = store.query(
        f"SELECT session_id, event_time, event_ts, first_seen, n_queries, client_queries, score, top_kind, "
        f"kind_names, kind_scores, signal_names, signal_values, reasons, source_ips, closed, warming_up, "
        f"state_bytes, batch_id, crossed_kinds, peak_kind_names, peak_kind_scores "
        f"FROM {store.database}.session_scores FINAL ORDER BY session_id"
    )
    assert len(rows) == 3
    for score, row in zip(scores, rows, strict=True):
        assert row[0] == score.session_id
        assert row[1] == datetime.fromtimestamp(math.floor(score.event_time), UTC)
        assert row[2] == score.event_time and row[3] == score.first_seen  # exact floats
        assert row[4:8] == (score.n_queries, score.client_queries, score.score, score.top_kind)
        assert same(dict(zip(row[8], row[9], strict=True)), score.kind_scores)
        assert same(dict(zip(row[10], row[11], strict=True)), score.signals)
        assert row[12] == score.reasons
        assert row[13] == score.source_ips  # not hashed unless configured
        assert row[14:18] == (int(score.closed), int(score.warming_up), score.state_bytes, "rt")
        assert row[18] == score.crossed_kinds
        assert dict(zip(row[19], row[20], strict=True)) == score.peak_kind_scores


def test_source_ips_are_hashed_when_configured(make_store: StoreFactory) -> None:
    plain = make_store()
    hashed = make_store(hash_source_ips=True, raw_sample_rate=1.0)
    batch = StoredBatch(batch_id="ip", scores=[make_score(1)], alerts=[make_alert(1)], events=[make_record(1)])
    plain.write_batch(batch)
    hashed.write_batch(batch)
    expected = hmac.new(IP_KEY, b"203.0.113.7", hashlib.sha256).hexdigest()[:16]
    assert plain.query(f"SELECT source_ips FROM {plain.database}.session_scores")[0][0][0] == "203.0.113.7"
    ips = hashed.query(f"SELECT source_ips FROM {hashed.database}.session_scores")[0][0]
    assert ips[0] == expected and re.fullmatch(r"[0-9a-f]{16}", ips[1])
    assert hashed.query(f"SELECT source_ips FROM {hashed.database}.alerts")[0][0] == [expected]
    event_ip = hashed.query(f"SELECT source_ip FROM {hashed.database}.events")[0][0]
    assert event_ip == hmac.new(IP_KEY, b"198.51.100.23", hashlib.sha256).hexdigest()[:16]


def test_events_round_trip_and_inputs_only_when_enabled(make_store: StoreFactory) -> None:
    without = make_store(raw_sample_rate=1.0)
    with_inputs = make_store(raw_sample_rate=1.0, store_inputs=True)
    records = [
        make_record(0),
        make_record(1),
        make_record(2, confidence=None, status=None, label=None, source_ip=None),
    ]
    for store in (without, with_inputs):
        store.write_batch(StoredBatch(batch_id="ev", events=records))
    columns = (
        "event_ts, model_id, client_id, session_id, request_id, source_ip, label, confidence, margin, "
        "latency_ms, status, source_topic, source_partition, source_offset, input"
    )
    rows = without.query(f"SELECT {columns} FROM {without.database}.events FINAL ORDER BY source_offset")
    assert rows[0] == (
        NOW,
        "model-0",
        "client-0",
        "s-0",
        "req-0",
        "198.51.100.23",
        "0",
        0.75,
        0.5,
        12.5,
        200,
        "inference-logs",
        0,
        0,
        [],
    )
    assert rows[1][3] == "" and rows[1][8] is None
    assert rows[2][5:8] == ("", "", None) and rows[2][10] is None
    vectors = [
        r[0] for r in with_inputs.query(f"SELECT input FROM {with_inputs.database}.events FINAL ORDER BY source_offset")
    ]
    assert vectors == [[float(v) for v in np.asarray(r.vector).tolist()] for r in records]  # exact float32


def test_alerts_round_trip_through_the_outbox(store: BaseStore) -> None:
    alerts = [make_alert(i) for i in range(3)]
    alerts[2] = make_alert(2, status="resolved", notification="resolve", seq=4, signals={}, source_ips=[], reasons=[])
    store.write_batch(StoredBatch(batch_id="al", alerts=alerts))
    got = store.undelivered(["pagerduty"], 10)
    assert [g[1] for g in got] == ["pagerduty"] * 3
    assert [g[0] for g in got] == alerts  # every field, exactly
    columns = ", ".join(ALERT_SELECT_COLUMNS)
    rows = store.query(f"SELECT {columns} FROM {store.database}.alerts FINAL ORDER BY alert_id")
    assert [alert_from_row(r) for r in rows] == alerts


def test_outbox_undelivered_and_record_deliveries(store: BaseStore) -> None:
    alerts = [make_alert(i) for i in range(4)]
    store.write_batch(StoredBatch(batch_id="ob", alerts=alerts))
    receivers = ["alertmanager", "webhook"]

    def pairs() -> list[tuple[str, str]]:
        return [(a.alert_id, r) for a, r in store.undelivered(receivers, 100)]

    assert pairs() == [(a.alert_id, r) for a in alerts for r in receivers]  # no delivery rows yet
    assert store.undelivered([], 10) == [] and store.undelivered(receivers, 0) == []
    assert len(store.undelivered(receivers, 3)) == 3

    def deliver(alert_id: str, receiver: str, status: DeliveryStatus, at: float, attempts: int = 1) -> Delivery:
        return Delivery(
            alert_id=alert_id,
            receiver=receiver,
            status=status,
            attempts=attempts,
            updated_at=at,
            last_error="" if status == "delivered" else "HTTP 503 ünï",
        )

    store.record_deliveries(
        [
            deliver("alert-0000", "alertmanager", "delivered", NOW),
            deliver("alert-0000", "webhook", "failed", NOW),
            deliver("alert-0001", "alertmanager", "pending", NOW),
            deliver("alert-0001", "alertmanager", "delivered", NOW + 1, attempts=2),  # later wins
            deliver("alert-0002", "webhook", "delivered", NOW + 5),
            deliver("alert-0002", "webhook", "failed", NOW + 1),  # older: loses though inserted later
        ]
    )
    store.record_deliveries([deliver("alert-0001", "alertmanager", "delivered", NOW + 1, attempts=2)])  # replay
    assert pairs() == [
        ("alert-0000", "webhook"),
        ("alert-0001", "webhook"),
        ("alert-0002", "alertmanager"),
        ("alert-0003", "alertmanager"),
        ("alert-0003", "webhook"),
    ]
    assert [a.alert_id for a, _ in store.undelivered(receivers, 100, since=NOW + 2.5)] == ["alert-0003"] * 2
    assert store.counts()["alert_deliveries"] == 4  # pairs
    latest = store.query(
        f"SELECT status, attempts, last_error FROM {store.database}.alert_deliveries FINAL "
        "WHERE alert_id = 'alert-0000' AND receiver = 'webhook'"
    )
    assert latest == [("failed", 1, "HTTP 503 ünï")]


def test_state_save_load_delete_with_binary_blobs(make_store: StoreFactory) -> None:
    store = make_store()
    every_byte = bytes(range(256))
    rng = random.Random(5)
    big = bytes(rng.getrandbits(8) for _ in range(200_000))
    tricky = b"\x00'\"\\\n\r\t\xff\xfe null {x:String} \xe2\x82"  # invalid UTF-8 on purpose
    store.save_state(0, {"a": every_byte, "b": b"", "c": big, "d": b"gone soon"}, position=100, version=1)
    store.save_state(1, {"a": tricky}, position=7, version=1)
    store.save_state(-1, {"population:model-0": b"\x01\x02"}, position=0, version=1)
    store.save_state(0, {"d": None, "e": tricky}, position=150, version=2)
    store.save_state(0, {"d": None, "e": tricky}, position=150, version=2)  # replayed checkpoint

    states, positions = store.load_state([0, 1, -1, 5])
    assert states == {
        0: {"a": every_byte, "b": b"", "c": big, "e": tricky},
        1: {"a": tricky},
        -1: {"population:model-0": b"\x01\x02"},
        5: {},
    }
    assert positions == {0: 150, 1: 7, -1: 0}
    assert store.load_state([]) == ({}, {})

    # A fresh store on the same database (a restart) sees the same, and refuses to go back in version.
    restarted = make_store(database=store.database)
    assert restarted.load_state([0, 1]) == ({0: states[0], 1: states[1]}, {0: 150, 1: 7})
    with pytest.raises(StorageError, match="below the stored"):
        restarted.save_state(0, {"a": b"old"}, position=1, version=1)
    with pytest.raises(ValueError, match="reserved"):
        restarted.save_state(0, {POSITION_KEY: b"x"}, position=1, version=3)
    restarted.save_state(0, {"a": b"new", "b": None}, position=200, version=3)
    assert store.load_state([0])[0][0] == {"a": b"new", "c": big, "e": tricky}


def test_top_sessions(store: BaseStore) -> None:
    scores = [
        make_score(0, n_queries=10, score=0.2, client_id="c1", model_id="m"),
        make_score(0, n_queries=20, score=0.95, client_id="c1", model_id="m"),  # latest of s-0
        make_score(1, n_queries=30, score=0.99, client_id="c1", model_id="m"),
        make_score(1, n_queries=40, score=0.5, client_id="c1", model_id="m"),  # latest of s-1 -> lower
        make_score(2, n_queries=5, score=0.7, client_id="c2", model_id="m"),
        make_score(3, n_queries=5, score=0.1, client_id="c3", model_id="m"),
    ]
    store.write_batch(StoredBatch(batch_id="t1", scores=scores[:3]))
    store.write_batch(StoredBatch(batch_id="t2", scores=scores[3:]))
    top = store.top_sessions(2)
    assert [(t.client_id, t.session_id, t.score, t.n_queries) for t in top] == [
        ("c1", "s-0", 0.95, 20),
        ("c2", "s-2", 0.7, 5),
    ]
    assert isinstance(top[0], TopSession) and top[0].reasons == scores[1].reasons
    assert same(top[0].kind_scores, scores[1].kind_scores) and top[0].event_time == scores[1].event_time
    assert len(store.top_sessions(10)) == 3 and store.top_sessions(0) == []


def test_query_binds_parameters_safely(store: BaseStore) -> None:
    hostile = "x'); DROP DATABASE " + store.database + "; -- \\' \" \n {v:String} \x00 ünï"
    names, rows = store.query_with_columns(
        "SELECT {v:String} AS v, {n:UInt64} AS n, {f:Float64} AS f, {a:Array(String)} AS a, "
        "'{v:String}' AS literal, {e:Array(Float64)} AS e, {t:DateTime} AS t, "
        "{m:Nullable(Float64)} AS m -- {v:String}",
        {
            "v": hostile,
            "n": 2**64 - 1,
            "f": 0.1,
            "a": ["a'b", "c\\d", ""],
            "e": [],
            "t": datetime.fromtimestamp(NOW, UTC),
            "m": None,
        },
    )
    assert names == ["v", "n", "f", "a", "literal", "e", "t", "m"]
    assert rows == [
        (
            hostile,
            2**64 - 1,
            0.1,
            ["a'b", "c\\d", ""],
            "{v:String}",
            [],
            datetime.fromtimestamp(int(NOW), UTC),
            None,
        )
    ]
    table = store.query("SELECT count() FROM {t:Identifier}", {"t": f"{store.database}.session_scores"})
    assert table == [(0,)]
    with pytest.raises(BindError):
        store.query("SELECT {t:Identifier}", {"t": "a b"})
    with pytest.raises(BindError, match="not given"):
        store.query("SELECT {missing:String}")
    with pytest.raises(StorageError):
        store.query("SELECT * FROM no_such_database.no_such_table")
    assert store.counts()["schema_migrations"] == 1  # still there


def test_closed_store_refuses_work(make_store: StoreFactory) -> None:
    store = make_store()
    store.close()
    store.close()  # idempotent
    with pytest.raises(StorageError, match="closed"):
        store.counts()


# ------------------------------------------------------------------------------------------ cross-backend


@pytest.mark.integration
def test_chdb_and_server_store_the_same(chdb_dir: Path, clickhouse_server: tuple[str, int]) -> None:
    database = unique_name("pw_same")
    stores = [
        open_store(
            storage_config(
                b,
                database,
                chdb_dir,
                clickhouse_server,
                raw_sample_rate=0.5,
                store_inputs=True,
                hash_source_ips=True,
            ),
            ip_hash_key=IP_KEY,
        )
        for b in ("chdb", "clickhouse")
    ]
    try:
        batches = [make_batch("b-1"), make_batch("b-2", n_scores=7, n_alerts=2, n_events=20)]
        batches[1].scores.append(make_score(99, signals={"nan": math.nan, "inf": math.inf}, reasons=["null", "😀"]))
        for store in stores:
            store.migrate()
            for batch in batches:
                store.write_batch(batch)
                store.write_batch(batch)
            store.save_state(3, {"k": bytes(range(256)), "x": None}, position=9, version=1)
            store.record_deliveries([Delivery(alert_id="alert-0001", receiver="r", status="delivered", updated_at=NOW)])
        results = []
        for store in stores:
            tables = {}
            for table in TABLES:
                columns = ", ".join(
                    f"hex({c.name})" if c.binary else c.name
                    for c in table.insert_columns
                    if not (table is PIPELINE_BATCHES and c.name == "store_latency_ms")  # measured
                )
                tables[table.name] = store.query(
                    f"SELECT {columns} FROM {database}.{table.name} FINAL ORDER BY {columns}"
                )
            results.append(
                (
                    tables,
                    store.counts(),
                    store.top_sessions(50),
                    store.undelivered(["r", "s"], 100),
                    store.load_state([3]),
                )
            )
        chdb_result, server_result = results
        for name in chdb_result[0]:
            assert same(chdb_result[0][name], server_result[0][name]), name
        assert chdb_result[1] == server_result[1]
        assert same(
            [msgspec.structs.astuple(t) for t in chdb_result[2]],
            [msgspec.structs.astuple(t) for t in server_result[2]],
        )
        assert chdb_result[3] == server_result[3]
        assert chdb_result[4] == server_result[4]
    finally:
        for store in stores:
            try:
                store.query(f"DROP DATABASE IF EXISTS {database}")
            finally:
                store.close()


def test_unreachable_server_fails_clearly() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = StorageConfig(backend="clickhouse", clickhouse=ClickHouseServerConfig(port=port, connect_timeout_s=2.0))
    with pytest.raises(StorageUnavailable, match=f"cannot reach ClickHouse at 127.0.0.1:{port}"):
        open_store(config)


# ------------------------------------------------------------------------------------------ unit: schema


@pytest.mark.parametrize("version", [(18, 16, 1), (19, 5), (19, 6), (26, 9, 2, 1)])
def test_ddl_fits_the_server_version(version: tuple[int, ...]) -> None:
    for table in TABLES:
        ddl = render_create_table(table, "probewatch", version, retention_days=30)
        assert ddl.startswith(f"CREATE TABLE IF NOT EXISTS `probewatch`.`{table.name}`")
        assert "ENGINE = ReplacingMergeTree(" in ddl
        for forbidden in ("DateTime64", "LowCardinality", "Map(", "JSON", "CODEC", "Object("):
            assert forbidden not in ddl
        has_ttl = "TTL `inserted_at` + INTERVAL 30 DAY" in ddl
        assert has_ttl == (table.ttl_column is not None and version >= (19, 6))
        assert render_create_table(table, "probewatch", version, retention_days=0).count("TTL") == 0


def test_key_columns() -> None:
    assert SESSION_SCORES.order_by == ("model_id", "client_id", "session_id", "n_queries")
    assert ALERTS.order_by == ("alert_id",)
    assert (ALERT_DELIVERIES.order_by, ALERT_DELIVERIES.version_column) == (
        ("alert_id", "receiver"),
        "version",
    )
    assert ALERT_DELIVERIES.partition_by is None  # FINAL must always see both states of a pair
    assert EVENTS.order_by[-3:] == ("source_topic", "source_partition", "source_offset")
    assert (DETECTOR_STATE.order_by, DETECTOR_STATE.version_column) == (
        ("source_partition", "state_key"),
        "version",
    )
    assert DETECTOR_STATE.ttl_column is None and SCHEMA_MIGRATIONS.ttl_column is None
    assert [c.name for c in DETECTOR_STATE.columns if c.binary] == ["blob"]


def test_readme_documents_the_current_schema() -> None:
    readme = (Path(__file__).resolve().parents[1] / "storage" / "README.md").read_text()
    assert describe_markdown().strip() in readme, "regenerate storage/README.md's Tables section"


def test_rows_match_the_insert_columns() -> None:
    build = RowBuilder(IpHasher(IP_KEY), store_inputs=True)
    batch = make_batch()
    assert batch.stats is not None
    samples = {
        SESSION_SCORES: build.score_row(batch.scores[0], "b"),
        ALERTS: build.alert_row(batch.alerts[0], "b"),
        EVENTS: build.event_row(batch.events[0], "b"),
        PIPELINE_BATCHES: build.batch_row(
            "b", batch.stats, scored_sessions=1, alerts=1, events_sampled=1, store_latency_ms=1.0
        ),
        ALERT_DELIVERIES: build.delivery_row(Delivery(alert_id="a", receiver="r", status="pending", updated_at=NOW)),
        DETECTOR_STATE: build.state_rows(1, {"k": b"v"}, 5, 2)[0],
    }
    for table, row in samples.items():
        assert len(row) == len(table.insert_names), table.name
        json_compact_rows(table, [row], msgspec.json.Encoder())
        rowbinary_rows(table, [row])
    assert build.state_rows(1, {"k": None}, 5, 2) == [(1, "k", 2, b"", 1, 5), (1, POSITION_KEY, 2, b"", 0, 5)]


def test_json_rows_carry_non_finite_floats_as_strings() -> None:
    build = RowBuilder()
    row = build.score_row(make_score(1, signals={"a": math.nan, "b": math.inf, "c": -math.inf}), "b")
    payload = json_compact_rows(SESSION_SCORES, [row], msgspec.json.Encoder())
    assert b'["a","b","c"],["nan","inf","-inf"]' in payload


def test_sampling_is_deterministic_and_close_to_the_rate() -> None:
    positions = [SourcePosition("t", p, o) for p in range(3) for o in range(4000)]
    picked = [p for p in positions if sample_event(p, 0.1)]
    assert picked == [p for p in positions if sample_event(SourcePosition(p.topic, p.partition, p.offset), 0.1)]
    assert 0.08 < len(picked) / len(positions) < 0.12
    assert not any(sample_event(p, 0.0) for p in positions[:100])
    assert all(sample_event(p, 1.0) for p in positions[:100])
    assert {p for p in picked if sample_event(p, 0.1)} == set(picked)  # idempotent


def test_ip_hasher() -> None:
    hasher = IpHasher(b"k")
    assert hasher("10.0.0.1") == hmac.new(b"k", b"10.0.0.1", hashlib.sha256).hexdigest()[:16]
    assert hasher("10.0.0.1") != IpHasher(b"other")("10.0.0.1")


# ------------------------------------------------------------------------------------------ unit: SQL


def test_quote_string_escapes() -> None:
    assert quote_string("it's \\ a\nb\tc\0") == "'it\\'s \\\\ a\\nb\\tc\\0'"
    assert quote_string("ünï 😀") == "'ünï 😀'"
    assert quote_string(b"\x00\xff'a") == "'\\0\\xff\\'a'"


def test_render_literal() -> None:
    assert render_literal(None) == "NULL"
    assert render_literal(True) == "1"
    assert render_literal(-5) == "-5"
    assert render_literal(0.1) == "0.1"
    assert [render_literal(x) for x in (math.nan, math.inf, -math.inf)] == ["nan", "inf", "-inf"]
    assert render_literal(["a", 1, [2.5]]) == "['a', 1, [2.5]]"
    assert render_literal(datetime(2026, 1, 1, tzinfo=UTC)) == "1767225600"
    assert render_literal(datetime(2026, 1, 1)) == "1767225600"  # naive = UTC
    with pytest.raises(BindError):
        render_literal(object())


def test_bind_skips_literals_comments_and_quoted_identifiers() -> None:
    sql = (
        "SELECT {a:String}, '{a:String}', 'it''s {a:String}', 'esc \\' {a:String}', `{a:String}`, "
        '"{a:String}" /* {a:String} */ -- {a:String}\n, {b:Array(Nullable(Float64))}'
    )
    bound = bind(sql, {"a": "v'", "b": [1.5, None]})
    assert bound == (
        "SELECT CAST('v\\'' AS String), '{a:String}', 'it''s {a:String}', 'esc \\' {a:String}', "
        '`{a:String}`, "{a:String}" /* {a:String} */ -- {a:String}\n, '
        "CAST([1.5, NULL] AS Array(Nullable(Float64)))"
    )
    assert bind("SELECT 1", None) == "SELECT 1"
    assert bind("SELECT {x:Identifier}", {"x": "db.t"}) == "SELECT `db`.`t`"
    for bad_sql, params in (
        ("SELECT {x:Identifier}", {"x": "a`b"}),
        ("SELECT {x:Identifier}", {"x": "a.b.c"}),
        ("SELECT {x:String; DROP}", {"x": "1"}),
        ("SELECT 'unterminated {x:String}", {"x": "1"}),
        ("SELECT {x:String}", {}),
    ):
        with pytest.raises(BindError):
            bind(bad_sql, params)


def test_validate_identifier() -> None:
    assert validate_identifier("probewatch_1") == "probewatch_1"
    for bad in ("", "1db", "a-b", "a b", "a`b", "ünï", "x" * 200):
        with pytest.raises(ValueError):
            validate_identifier(bad)


def test_chdb_result_conversion() -> None:
    assert converter_for("DateTime")("1700000000") == datetime.fromtimestamp(1700000000, UTC)
    converted = converter_for("Array(Nullable(Float64))")([1.5, None, "nan", "-inf"])
    assert converted[:2] == [1.5, None] and math.isnan(converted[2]) and converted[3] == -math.inf
    assert converter_for("Float32")(0.1) == float(np.float32(0.1))
    assert converter_for("Tuple(a UInt8, b Array(String))")({"a": 1, "b": ["x"]}) == (1, ["x"])
    assert converter_for("Map(String, UInt64)")({"k": 1}) == {"k": 1}
    assert converter_for("LowCardinality(String)")("x") == "x"
    assert parse_version("18.16.1") == (18, 16, 1) and parse_version("26.9.2.1") == (26, 9, 2, 1)


def test_purge_removes_deleted_state_keys_and_nothing_else(make_store: StoreFactory) -> None:
    store = make_store()
    store.save_state(0, {"ended": b"v1", "kept": b"v1", "back": b"v1"}, position=10, version=1)
    store.save_state(0, {"ended": None, "back": None}, position=20, version=2)
    store.save_state(0, {"back": b"v3"}, position=30, version=3)  # deleted, then written again
    time.sleep(1.1)  # inserted_at has whole seconds: let "older than 0 s" be true
    store.purge_deleted_state(older_than_s=0)

    def rows(key: str) -> int:
        sql = f"SELECT count() FROM {store._t(DETECTOR_STATE)} WHERE state_key = {{k:String}}"
        return int(store.query(sql, {"k": key})[0][0])

    deadline = time.monotonic() + 30
    while rows("ended") and time.monotonic() < deadline:  # a mutation: applied in the background
        time.sleep(0.2)
    assert rows("ended") == 0  # its live row and its tombstone are both gone
    assert rows("back") >= 1 and rows("kept") == 1
    assert store.load_state([0]) == ({0: {"kept": b"v1", "back": b"v3"}}, {0: 30})

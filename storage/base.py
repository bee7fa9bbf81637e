"""Everything the two backends share: migration, batch writes, state checkpoints, outbox, readers.

A backend only implements four primitives: run one SQL statement and return its result
(:meth:`BaseStore._execute`), insert rows of one table (:meth:`BaseStore._insert_rows`), report the
server version and close. All SQL text is built here, from :mod:`storage.schema` and
:func:`storage.sql.bind`, and is valid on ClickHouse 18.16 as well as on current versions.
"""

from __future__ import annotations

import abc
import logging
import re
import threading
import time
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, ClassVar

from alerting.alert import Alert
from probewatch.config import StorageConfig
from storage.models import Delivery, StorageError, StoredBatch, TopSession
from storage.rows import ALERT_SELECT_COLUMNS, Row, RowBuilder, alert_from_row, make_ip_hasher, sample_event
from storage.schema import (
    ALERT_DELIVERIES,
    ALERTS,
    DETECTOR_STATE,
    EVENTS,
    PIPELINE_BATCHES,
    POSITION_KEY,
    SCHEMA_DESCRIPTION,
    SCHEMA_MIGRATIONS,
    SCHEMA_VERSION,
    SESSION_SCORES,
    TABLES,
    ServerVersion,
    Table,
    engine_ttl,
    render_create_table,
    supports_ttl,
    ttl_clause,
)
from storage.sql import bind, qualified, quote_identifier, quote_string, validate_identifier

log = logging.getLogger(__name__)

Result = tuple[list[str], list[str], list[tuple[Any, ...]]]  # column names, ClickHouse types, rows
_INLINE_INSERT = re.compile(r"\s*(--[^\n]*\n\s*|/\*.*?\*/\s*)*INSERT\b", re.IGNORECASE | re.DOTALL)
_HAS_SELECT = re.compile(r"\bSELECT\b", re.IGNORECASE)


def first_line(exc: BaseException, limit: int = 500) -> str:
    """A server error without its multi-kilobyte stack trace."""
    text = str(exc).split("Stack trace:", 1)[0].strip()
    text = " ".join(text.split())
    return text[:limit] or type(exc).__name__


def _refuse_inline_insert(sql: str) -> None:
    if _INLINE_INSERT.match(sql) and not _HAS_SELECT.search(sql):
        raise StorageError("query(): INSERT with inline data is not supported; use INSERT ... SELECT")


def parse_version(text: str) -> ServerVersion:
    """``'18.16.1'`` / ``'26.9.2.1'`` -> a tuple of ints (non-numeric parts dropped)."""
    parts: list[int] = []
    for part in text.strip().split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    if not parts:
        raise StorageError(f"cannot parse server version {text!r}")
    return tuple(parts)


class BaseStore(abc.ABC):
    """The storage API over one ClickHouse (server or embedded). Thread-safe: calls are serialised."""

    backend: ClassVar[str] = ""

    def __init__(self, config: StorageConfig, *, ip_hash_key: bytes | None = None) -> None:
        self.config = config
        self.database = validate_identifier(config.database)
        self.rows = RowBuilder(make_ip_hasher(config.hash_source_ips, ip_hash_key), config.store_inputs)
        self._lock = threading.RLock()
        self._version: ServerVersion | None = None
        self._state_versions: dict[int, int] = {}
        self._closed = False

    def stored_ip(self, ip: str) -> str:
        """An IP address (or network) as this store writes it: itself, or its keyed hash when
        ``storage.hash_source_ips`` is on."""
        return self.rows.hasher(ip) if self.rows.hasher is not None else ip

    # -- backend primitives ---------------------------------------------------------------------------

    @abc.abstractmethod
    def _execute(self, sql: str) -> Result:
        """Run one statement; return (names, types, rows). Raise StorageError on failure."""

    @abc.abstractmethod
    def _insert_rows(self, table: Table, rows: Sequence[Row]) -> None:
        """Insert rows (tuples in ``table.insert_names`` order); durable when it returns."""

    @abc.abstractmethod
    def _fetch_server_version(self) -> ServerVersion: ...

    @abc.abstractmethod
    def _close(self) -> None: ...

    # -- helpers --------------------------------------------------------------------------------------

    def _run(self, sql: str, params: Mapping[str, Any] | None = None) -> Result:
        if self._closed:
            raise StorageError("the store is closed")
        bound = bind(sql, params)
        with self._lock:
            return self._execute(bound)

    def _insert(self, table: Table, rows: Sequence[Row]) -> None:
        if not rows:
            return
        if self._closed:
            raise StorageError("the store is closed")
        with self._lock:
            self._insert_rows(table, rows)

    def _t(self, table: Table) -> str:
        return qualified(self.database, table.name)

    def __enter__(self) -> BaseStore:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- API ------------------------------------------------------------------------------------------

    def server_version(self) -> ServerVersion:
        """The ClickHouse version, e.g. (18, 16, 1) or (26, 9, 2, 1)."""
        if self._version is None:
            with self._lock:
                self._version = self._fetch_server_version()
        return self._version

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            with self._lock:
                self._close()

    def migrate(self) -> None:
        """Create the database and tables, add missing columns, align the TTL, record the version.

        Idempotent: a second run changes nothing. Raises StorageError if the database was migrated by
        a newer probewatch (higher schema version) or a column has an unexpected type.
        """
        version = self.server_version()
        retention = self.config.retention_days
        self._run(f"CREATE DATABASE IF NOT EXISTS {quote_identifier(self.database)}")
        self._run(render_create_table(SCHEMA_MIGRATIONS, self.database, version, retention))
        _, _, rows = self._run(f"SELECT max(version) FROM {self._t(SCHEMA_MIGRATIONS)}")
        applied = int(rows[0][0]) if rows and rows[0][0] is not None else 0
        if applied > SCHEMA_VERSION:
            raise StorageError(
                f"database {self.database!r} has schema version {applied}, newer than this probewatch's "
                f"{SCHEMA_VERSION}; upgrade probewatch"
            )
        for table in TABLES:
            self._run(render_create_table(table, self.database, version, retention))
        self._reconcile_columns()
        if supports_ttl(version):
            self._reconcile_ttl(version, retention)
        elif retention > 0:
            log.warning(
                "storage: ClickHouse %s has no TTL (needs 19.6+): retention_days=%d is not enforced; "
                "drop old month partitions by hand (ALTER TABLE ... DROP PARTITION YYYYMM)",
                ".".join(map(str, version)),
                retention,
            )
        if applied < SCHEMA_VERSION:
            self._insert(SCHEMA_MIGRATIONS, [(SCHEMA_VERSION, SCHEMA_DESCRIPTION)])
            log.info("storage: database %s migrated to schema version %d", self.database, SCHEMA_VERSION)

    def _reconcile_columns(self) -> None:
        _, _, rows = self._run(
            "SELECT table, name, type FROM system.columns WHERE database = {db:String}", {"db": self.database}
        )
        existing: dict[str, dict[str, str]] = {}
        for table_name, name, type_name in rows:
            existing.setdefault(table_name, {})[name] = type_name
        problems = []
        for table in TABLES:
            have = existing.get(table.name, {})
            previous: str | None = None
            for column in table.columns:
                if column.name not in have:
                    after = f" AFTER {quote_identifier(previous)}" if previous else ""
                    self._run(f"ALTER TABLE {self._t(table)} ADD COLUMN {column.ddl()}{after}")
                    log.info("storage: added column %s.%s", table.name, column.name)
                elif have[column.name] != column.type:
                    found = have[column.name]
                    problems.append(f"{table.name}.{column.name} is {found}, expected {column.type}")
                previous = column.name
        if problems:
            raise StorageError("schema mismatch (needs an explicit migration): " + "; ".join(problems))

    def _reconcile_ttl(self, version: ServerVersion, retention: int) -> None:
        _, _, rows = self._run(
            "SELECT name, engine_full FROM system.tables WHERE database = {db:String}", {"db": self.database}
        )
        engines = {name: engine_full for name, engine_full in rows}
        for table in TABLES:
            current = engine_ttl(engines.get(table.name, ""))
            clause = ttl_clause(table, version, retention)
            wanted = (table.ttl_column, int(retention)) if clause else None
            if clause and current != wanted:
                self._run(f"ALTER TABLE {self._t(table)} MODIFY {clause}")
                log.info("storage: %s now has %s", table.name, clause)
            elif clause is None and current is not None:
                log.warning(
                    "storage: %s keeps its TTL %s + %d days; retention_days=%d does not remove it",
                    table.name,
                    current[0],
                    current[1],
                    retention,
                )

    def write_batch(self, batch: StoredBatch) -> None:
        """Write a micro-batch's scores, alerts, sampled events and stats; durable when it returns.

        Idempotent: every table is a ReplacingMergeTree keyed so that the same batch written again
        collapses onto the same rows (as seen through FINAL / the readers here). The stats row is
        written last, so a `pipeline_batches` row means the batch's data is stored.
        """
        started = time.perf_counter()
        rate = self.config.raw_sample_rate
        events = [r for r in batch.events if sample_event(r.position, rate)] if rate > 0 else []
        build = self.rows
        if events:
            self._insert(EVENTS, [build.event_row(r, batch.batch_id) for r in events])
        if batch.scores:
            self._insert(SESSION_SCORES, [build.score_row(s, batch.batch_id) for s in batch.scores])
        if batch.alerts:
            self._insert(ALERTS, [build.alert_row(a, batch.batch_id) for a in batch.alerts])
        if batch.stats is not None:
            row = build.batch_row(
                batch.stats.batch_id or batch.batch_id,
                batch.stats,
                scored_sessions=len(batch.scores),
                alerts=len(batch.alerts),
                events_sampled=len(events),
                store_latency_ms=(time.perf_counter() - started) * 1000.0,
            )
            self._insert(PIPELINE_BATCHES, [row])

    def save_state(self, partition: int, entries: Mapping[str, bytes | None], position: int, version: int) -> None:
        """Checkpoint detector state of one source partition: ``entries`` maps state keys to
        serialized state (None deletes the key); ``position`` is the source position the state
        reflects. One INSERT, so state and position land together.

        ``version`` must not decrease for a partition (e.g. use the source offset or a batch counter
        that survives restarts): the highest version of a key wins. Raises StorageError if it is lower
        than a version this store already saved or loaded for the partition.
        """
        partition = int(partition)
        last = self._state_versions.get(partition)
        if last is not None and version < last:
            raise StorageError(f"state version {version} for partition {partition} is below the stored version {last}")
        self._insert(DETECTOR_STATE, self.rows.state_rows(partition, entries, position, version))
        self._state_versions[partition] = int(version)

    def load_state(self, partitions: list[int]) -> tuple[dict[int, dict[str, bytes]], dict[int, int]]:
        """Live state per partition (every requested partition has a dict, maybe empty) and the saved
        source position per partition (only partitions that have one)."""
        states: dict[int, dict[str, bytes]] = {int(p): {} for p in partitions}
        positions: dict[int, int] = {}
        if not states:
            return states, positions
        _, _, rows = self._run(
            f"SELECT source_partition, state_key, hex(blob), deleted, source_offset, version "
            f"FROM {self._t(DETECTOR_STATE)} FINAL WHERE has({{partitions:Array(Int32)}}, source_partition)",
            {"partitions": sorted(states)},
        )
        for partition, key, blob_hex, deleted, offset, version in rows:
            partition = int(partition)
            self._state_versions[partition] = max(self._state_versions.get(partition, 0), int(version))
            if key == POSITION_KEY:
                positions[partition] = int(offset)
            elif not deleted:
                states[partition][key] = bytes.fromhex(blob_hex)
        return states, positions

    def purge_deleted_state(self, older_than_s: int = 3600) -> None:
        """Remove every row of the state keys whose newest row is a tombstone written more than
        ``older_than_s`` ago (ended sessions, forgotten clients), so that `detector_state` does not
        grow forever: ReplacingMergeTree keeps a tombstone row per key, and older versions until
        merges. All rows of such a key go together, so no older version can resurface. A mutation:
        the server applies it in the background, to the parts that exist when it is submitted (a key
        written again meanwhile lands in a new part and is kept)."""
        table = self._t(DETECTOR_STATE)
        self._run(
            f"ALTER TABLE {table} DELETE WHERE (source_partition, state_key) IN ("
            f"SELECT source_partition, state_key FROM {table} GROUP BY source_partition, state_key "
            f"HAVING argMax(deleted, version) = 1 AND max(inserted_at) < now() - {int(older_than_s)})"
        )

    def record_deliveries(self, rows: list[Delivery]) -> None:
        """Record delivery attempts/outcomes; per (alert_id, receiver) the latest updated_at wins."""
        self._insert(ALERT_DELIVERIES, [self.rows.delivery_row(d) for d in rows])

    def undelivered(self, receivers: list[str], limit: int, *, since: float | None = None) -> list[tuple[Alert, str]]:
        """(alert, receiver) pairs whose latest delivery state is not 'delivered' (including pairs with
        no delivery row yet), oldest event time first. ``since`` (epoch s) ignores older alerts, e.g.
        so that adding a receiver does not replay the whole history to it."""
        if not receivers or limit <= 0:
            return []
        columns = ", ".join(ALERT_SELECT_COLUMNS)
        _, _, rows = self._run(
            f"""
            SELECT {columns}, receiver
            FROM
            (
                SELECT {columns}, arrayJoin({{receivers:Array(String)}}) AS receiver
                FROM {self._t(ALERTS)} FINAL
                WHERE event_ts >= {{since:Float64}}
            ) AS pending_alerts
            ANY LEFT JOIN
            (
                SELECT alert_id, receiver, argMax(status, version) AS delivery_status
                FROM {self._t(ALERT_DELIVERIES)}
                WHERE has({{receivers:Array(String)}}, receiver)
                GROUP BY alert_id, receiver
            ) AS deliveries USING (alert_id, receiver)
            WHERE delivery_status != 'delivered'
            ORDER BY event_ts, seq, alert_id, receiver
            LIMIT {int(limit)}
            """,
            {"receivers": [str(r) for r in receivers], "since": float(since or 0.0)},
        )
        return [(alert_from_row(row), row[-1]) for row in rows]

    def query(self, sql: str, params: Mapping[str, Any] | None = None) -> list[tuple[Any, ...]]:
        """Run SQL (``{name:Type}`` placeholders bound from ``params``) and return its rows.

        Value types are the same on both backends for the types probewatch stores: int, float, str,
        list (arrays), tuple, None (Nullable), and ``DateTime`` as an aware UTC datetime. (A String
        that is not UTF-8 comes back as ``bytes`` from the server, with U+FFFD replacements from chDB:
        select ``hex(col)`` for binary data.) Do not add a ``FORMAT`` clause. ``INSERT ... VALUES``
        with inline data is refused (the server's native protocol would wait for data blocks): use
        ``INSERT ... SELECT``.
        """
        _refuse_inline_insert(sql)
        return self._run(sql, params)[2]

    def query_with_columns(
        self, sql: str, params: Mapping[str, Any] | None = None
    ) -> tuple[list[str], list[tuple[Any, ...]]]:
        """Like :meth:`query`, also returning the column names."""
        _refuse_inline_insert(sql)
        names, _, rows = self._run(sql, params)
        return names, rows

    def top_sessions(self, limit: int = 20) -> list[TopSession]:
        """Per (model, client) the session with the highest latest score, highest first."""
        _, _, rows = self._run(
            f"""
            SELECT model_id, client_id, session_id, score, top_kind, kind_names, kind_scores, n_queries,
                   client_queries, event_ts, first_seen, reasons, closed, warming_up
            FROM
            (
                SELECT model_id, client_id, session_id, score, top_kind, kind_names, kind_scores, n_queries,
                       client_queries, event_ts, first_seen, reasons, closed, warming_up
                FROM {self._t(SESSION_SCORES)} FINAL
                ORDER BY model_id, client_id, session_id, n_queries DESC, event_ts DESC
                LIMIT 1 BY model_id, client_id, session_id
            ) AS latest
            ORDER BY score DESC, event_ts DESC, model_id, client_id, session_id
            LIMIT 1 BY model_id, client_id
            LIMIT {max(int(limit), 0)}
            """
        )
        return [
            TopSession(
                model_id=r[0],
                client_id=r[1],
                session_id=r[2],
                score=float(r[3]),
                top_kind=r[4],
                kind_scores={str(k): float(v) for k, v in zip(r[5], r[6], strict=True)},
                n_queries=int(r[7]),
                client_queries=int(r[8]),
                event_time=float(r[9]),
                first_seen=float(r[10]),
                reasons=list(r[11]),
                closed=bool(r[12]),
                warming_up=bool(r[13]),
            )
            for r in rows
        ]

    def counts(self) -> dict[str, int]:
        """Rows per table as readers see them (after ReplacingMergeTree dedup, i.e. FINAL)."""
        parts = [f"SELECT {quote_string(t.name)} AS table_name, count() AS n FROM {self._t(t)} FINAL" for t in TABLES]
        _, _, rows = self._run(" UNION ALL ".join(parts))
        found = {str(name): int(n) for name, n in rows}
        return {t.name: found.get(t.name, 0) for t in TABLES}

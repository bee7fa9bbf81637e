"""The probewatch ClickHouse schema, as data, rendered to DDL per server version.

One definition serves both backends. Everything here is accepted by ClickHouse **18.16** (the
oldest server we support) as well as by current versions (chDB):

* no DateTime64 / LowCardinality / Map / JSON / CODEC: times are ``DateTime`` (whole seconds, UTC;
  the partitioning, TTL and Grafana time column) plus an exact ``Float64`` epoch-seconds twin
  (``*_ts``); key/value data are parallel ``Array(String)`` / ``Array(Float64)`` columns;
* engines are ``ReplacingMergeTree[(version)] [PARTITION BY ...] ORDER BY (...)`` so that replaying a
  micro-batch collapses onto the rows it already wrote; readers use ``FINAL`` (or ``argMax``);
* ``TTL`` is only rendered when the server supports it (ClickHouse >= 19.6) and
  ``retention_days > 0``. The TTL is on ``inserted_at`` (storage time), not on event time: with an
  event-time TTL a current ClickHouse drops rows *at insert* whenever their event time is already
  older than the retention, so replaying or evaluating historical logs would store nothing.

Schema changes: bump :data:`SCHEMA_VERSION`, add columns at the end of a table's definition (``migrate``
adds missing columns with ``ALTER TABLE ... ADD COLUMN``; type changes need an explicit migration).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from storage.sql import qualified, quote_identifier, validate_identifier

ServerVersion = tuple[int, ...]

SCHEMA_VERSION = 1
SCHEMA_DESCRIPTION = (
    "initial schema: session_scores, alerts, alert_deliveries, events, pipeline_batches, detector_state"
)
TTL_MIN_VERSION: ServerVersion = (19, 6)
# detector_state row holding a partition's source position (its blob is empty).
POSITION_KEY = "__position__"


@dataclass(frozen=True)
class Column:
    """One column. ``default`` is a SQL expression; columns with a default are filled by the server and
    not written by the store. ``binary`` marks a ``String`` holding arbitrary bytes (not text)."""

    name: str
    type: str
    doc: str
    default: str | None = None
    binary: bool = False

    def ddl(self) -> str:
        text = f"{quote_identifier(self.name)} {self.type}"
        return f"{text} DEFAULT {self.default}" if self.default is not None else text


@dataclass(frozen=True)
class Table:
    """One table: columns, ReplacingMergeTree key/version, partitioning and (optional) TTL column."""

    name: str
    doc: str
    columns: tuple[Column, ...]
    order_by: tuple[str, ...]
    version_column: str | None = None
    partition_by: str | None = None
    ttl_column: str | None = None

    def __post_init__(self) -> None:
        validate_identifier(self.name)
        names = [c.name for c in self.columns]
        for name in names:
            validate_identifier(name)
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate column in {self.name}")
        for key in (*self.order_by, self.version_column, self.ttl_column):
            if key is not None and key not in names:
                raise ValueError(f"{self.name}: unknown column {key!r}")

    @property
    def insert_columns(self) -> tuple[Column, ...]:
        """The columns the store writes, in the order rows are built."""
        return tuple(c for c in self.columns if c.default is None)

    @property
    def insert_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.insert_columns)

    def column(self, name: str) -> Column:
        for c in self.columns:
            if c.name == name:
                return c
        raise KeyError(name)


def supports_ttl(version: ServerVersion) -> bool:
    return tuple(version[:2]) >= TTL_MIN_VERSION


def ttl_clause(table: Table, version: ServerVersion, retention_days: int) -> str | None:
    """``TTL <col> + INTERVAL n DAY`` when the table has a TTL column, retention is on and the server
    supports TTL; otherwise None."""
    if table.ttl_column is None or retention_days <= 0 or not supports_ttl(version):
        return None
    return f"TTL {quote_identifier(table.ttl_column)} + INTERVAL {int(retention_days)} DAY"


def render_create_table(table: Table, database: str, version: ServerVersion, retention_days: int) -> str:
    """``CREATE TABLE IF NOT EXISTS`` for ``table`` as the server of ``version`` accepts it."""
    columns = ",\n    ".join(c.ddl() for c in table.columns)
    version_column = quote_identifier(table.version_column) if table.version_column else ""
    lines = [
        f"CREATE TABLE IF NOT EXISTS {qualified(database, table.name)}\n(\n    {columns}\n)",
        f"ENGINE = ReplacingMergeTree({version_column})",
    ]
    if table.partition_by:
        lines.append(f"PARTITION BY {table.partition_by}")
    lines.append("ORDER BY (" + ", ".join(quote_identifier(c) for c in table.order_by) + ")")
    ttl = ttl_clause(table, version, retention_days)
    if ttl:
        lines.append(ttl)
    return "\n".join(lines)


_ENGINE_TTL = re.compile(r"\bTTL\s+`?(\w+)`?\s*\+\s*toIntervalDay\((\d+)\)")


def engine_ttl(engine_full: str) -> tuple[str, int] | None:
    """(column, days) of a ``TTL col + INTERVAL n DAY`` as ``system.tables.engine_full`` shows it."""
    match = _ENGINE_TTL.search(engine_full)
    return (match.group(1), int(match.group(2))) if match else None


_INSERTED_AT = Column("inserted_at", "DateTime", "wall-clock time the row was stored (server clock)", "now()")

SESSION_SCORES = Table(
    name="session_scores",
    doc="""One row per (session, micro-batch in which it changed): the detector's SessionScore.

    Replays collapse on (model_id, client_id, session_id, n_queries); among equal keys the last insert
    wins (so a session's final `closed` row replaces the open row with the same n_queries). Read with
    FINAL, or argMax(..., n_queries) per session for the latest state.""",
    columns=(
        Column("event_time", "DateTime", "event time of the newest record in the session (whole seconds)"),
        Column("event_ts", "Float64", "the same event time, exact epoch seconds"),
        Column("first_seen", "Float64", "event time of the session's first record, epoch seconds"),
        Column("model_id", "String", "model queried"),
        Column("client_id", "String", "client (API key / tenant) querying"),
        Column("session_id", "String", "session id (given by the producer, or derived by inactivity gap)"),
        Column("n_queries", "UInt32", "queries in this session so far"),
        Column("client_queries", "UInt64", "this client's queries to this model over all its sessions"),
        Column("score", "Float64", "session score in [0, 1]: the maximum of kind_scores"),
        Column("top_kind", "String", "attack kind with the highest score"),
        Column("kind_names", "Array(String)", "attack kinds, sorted; parallel to kind_scores"),
        Column("kind_scores", "Array(Float64)", "calibrated score per attack kind"),
        Column("signal_names", "Array(String)", "raw signal names, sorted; parallel to signal_values"),
        Column("signal_values", "Array(Float64)", "raw signal values"),
        Column("reasons", "Array(String)", "human-readable evidence"),
        Column("source_ips", "Array(String)", "source IPs seen (keyed-hash hex when hash_source_ips)"),
        Column("closed", "UInt8", "1 on the session's final score"),
        Column("warming_up", "UInt8", "1 while the model's population baseline is warming up"),
        Column("state_bytes", "UInt32", "approximate bytes of detector state held for the session"),
        Column("crossed_kinds", "Array(String)", "kinds that reached the alert threshold first at this row"),
        Column("peak_kind_names", "Array(String)", "attack kinds, sorted; parallel to peak_kind_scores"),
        Column("peak_kind_scores", "Array(Float64)", "highest score per kind in the session so far"),
        Column("batch_id", "String", "micro-batch that produced the row"),
        _INSERTED_AT,
    ),
    order_by=("model_id", "client_id", "session_id", "n_queries"),
    partition_by="toYYYYMM(event_time)",
    ttl_column="inserted_at",
)

ALERTS = Table(
    name="alerts",
    doc="""The alert outbox: every Alert the policy emitted, keyed by its deterministic alert_id
    (a replay writes the same id and collapses). Delivery state lives in alert_deliveries.""",
    columns=(
        Column("alert_id", "String", "deterministic id of this notification"),
        Column("dedup_key", "String", "incident key (model, client, kind)"),
        Column("status", "String", "'firing' | 'resolved'"),
        Column("kind", "String", "attack kind"),
        Column("model_id", "String", "model"),
        Column("client_id", "String", "client"),
        Column("session_id", "String", "session that triggered the alert"),
        Column("severity", "String", "'info' | 'warning' | 'high' | 'critical'"),
        Column("score", "Float64", "score that fired the alert"),
        Column("n_queries", "UInt64", "client's queries to the model when it fired"),
        Column("event_time", "DateTime", "event time the alert fired/resolved (whole seconds)"),
        Column("event_ts", "Float64", "the same, exact epoch seconds"),
        Column("first_seen", "Float64", "event time the incident started, epoch seconds"),
        Column("reasons", "Array(String)", "evidence"),
        Column("signal_names", "Array(String)", "signal names, parallel to signal_values (as given)"),
        Column("signal_values", "Array(Float64)", "signal values"),
        Column("source_ips", "Array(String)", "source IPs (keyed-hash hex when hash_source_ips)"),
        Column("summary", "String", "one-line summary"),
        Column("notification", "String", "'new' | 'update' | 'escalation' | 'reminder' | 'resolve' | 'test'"),
        Column("seq", "UInt32", "notifications of this incident before this one"),
        Column("batch_id", "String", "micro-batch that produced the alert"),
        _INSERTED_AT,
    ),
    order_by=("alert_id",),
    partition_by="toYYYYMM(event_time)",
    ttl_column="inserted_at",
)

ALERT_DELIVERIES = Table(
    name="alert_deliveries",
    doc="""Delivery state per (alert_id, receiver); the row with the highest `version` (updated_ts in
    microseconds) wins. Not partitioned, so FINAL always collapses a pair to one row.""",
    columns=(
        Column("alert_id", "String", "alert delivered"),
        Column("receiver", "String", "receiver name"),
        Column("status", "String", "'pending' | 'delivered' | 'failed'"),
        Column("attempts", "UInt32", "delivery attempts so far"),
        Column("last_error", "String", "last error message ('' if none)"),
        Column("updated_at", "DateTime", "when this state was recorded (whole seconds)"),
        Column("updated_ts", "Float64", "the same, exact epoch seconds"),
        Column("version", "UInt64", "replacement version: updated_ts in microseconds"),
        _INSERTED_AT,
    ),
    order_by=("alert_id", "receiver"),
    version_column="version",
    ttl_column="inserted_at",
)

EVENTS = Table(
    name="events",
    doc="""Raw query events, deterministically sampled by a hash of the source position (so a replay
    samples the same records) at storage.raw_sample_rate; keyed by source position so replays collapse.
    `input` is empty unless storage.store_inputs.""",
    columns=(
        Column("event_time", "DateTime", "event time (whole seconds)"),
        Column("event_ts", "Float64", "event time, exact epoch seconds"),
        Column("model_id", "String", "model"),
        Column("client_id", "String", "client"),
        Column("session_id", "String", "producer's session id ('' if none)"),
        Column("request_id", "String", "request id ('' if none)"),
        Column("source_ip", "String", "source IP ('' if none; keyed-hash hex when hash_source_ips)"),
        Column("label", "String", "predicted top-1 label ('' if none)"),
        Column("confidence", "Nullable(Float64)", "top-1 probability"),
        Column("margin", "Nullable(Float64)", "top-1 minus top-2 probability"),
        Column("score", "Nullable(Float64)", "regression / single-score output"),
        Column("latency_ms", "Nullable(Float64)", "inference latency"),
        Column("status", "Nullable(Int32)", "response status code"),
        Column("source_topic", "String", "Kafka topic (or input file path)"),
        Column("source_partition", "Int32", "Kafka partition (0 for files)"),
        Column("source_offset", "Int64", "Kafka offset (line number for files)"),
        Column("input", "Array(Float32)", "input vector (only with storage.store_inputs)"),
        Column("batch_id", "String", "micro-batch"),
        _INSERTED_AT,
    ),
    order_by=("model_id", "client_id", "source_topic", "source_partition", "source_offset"),
    partition_by="toYYYYMM(event_time)",
    ttl_column="inserted_at",
)

PIPELINE_BATCHES = Table(
    name="pipeline_batches",
    doc="""One row per micro-batch for the pipeline-health dashboard; a replayed batch_id replaces
    the earlier row (within the same month partition).""",
    columns=(
        Column("batch_id", "String", "micro-batch id"),
        Column("worker", "String", "worker / consumer instance"),
        Column("finished_at", "DateTime", "wall-clock time the batch finished (whole seconds)"),
        Column("finished_ts", "Float64", "the same, exact epoch seconds"),
        Column("records", "UInt32", "records consumed"),
        Column("dead_lettered", "UInt32", "records dead-lettered"),
        Column("scored_sessions", "UInt32", "session scores written"),
        Column("alerts", "UInt32", "alerts written"),
        Column("events_sampled", "UInt32", "raw events written to `events`"),
        Column("batch_latency_ms", "Float64", "batch processing time"),
        Column("store_latency_ms", "Float64", "time spent writing the batch to storage"),
        Column("lag", "Int64", "consumer lag (records) after the batch"),
        Column("dlq_reasons", "Array(String)", "dead-letter reasons, parallel to dlq_counts"),
        Column("dlq_counts", "Array(UInt64)", "records per dead-letter reason"),
        _INSERTED_AT,
    ),
    order_by=("batch_id",),
    partition_by="toYYYYMM(finished_at)",
    ttl_column="inserted_at",
)

DETECTOR_STATE = Table(
    name="detector_state",
    doc=f"""Checkpoints of per-session detector state per source partition. The highest `version` of a
    (source_partition, state_key) wins; `deleted`=1 is a tombstone. The row with state_key
    '{POSITION_KEY}' carries the partition's source position in `source_offset`. No TTL: a worker
    using this table for state has every row of the keys deleted more than an hour ago removed, hourly
    (`purge_deleted_state`).""",
    columns=(
        Column("source_partition", "Int32", "source (Kafka) partition"),
        Column("state_key", "String", f"detector state key; '{POSITION_KEY}' for the position row"),
        Column("version", "UInt64", "checkpoint version (must not decrease per partition)"),
        Column("blob", "String", "serialized state, arbitrary bytes", binary=True),
        Column("deleted", "UInt8", "1 = the key was deleted"),
        Column("source_offset", "Int64", "source position of the checkpoint"),
        _INSERTED_AT,
    ),
    order_by=("source_partition", "state_key"),
    version_column="version",
)

SCHEMA_MIGRATIONS = Table(
    name="schema_migrations",
    doc="Schema versions applied to this database.",
    columns=(
        Column("version", "UInt32", "schema version"),
        Column("description", "String", "what the version contains"),
        Column("applied_at", "DateTime", "when it was applied", "now()"),
    ),
    order_by=("version",),
)

# Creation order; schema_migrations first so a failed migrate leaves no version row behind.
TABLES: tuple[Table, ...] = (
    SCHEMA_MIGRATIONS,
    SESSION_SCORES,
    ALERTS,
    ALERT_DELIVERIES,
    EVENTS,
    PIPELINE_BATCHES,
    DETECTOR_STATE,
)
TABLES_BY_NAME: dict[str, Table] = {t.name: t for t in TABLES}


def describe_markdown() -> str:
    """The table reference in storage/README.md, as Markdown (a test keeps the README in sync)."""
    import inspect

    out: list[str] = []
    for table in TABLES:
        clauses = []
        if table.partition_by:
            clauses.append(f"PARTITION BY {table.partition_by}")
        clauses.append("ORDER BY (" + ", ".join(table.order_by) + ")")
        if table.ttl_column:
            clauses.append(f"[TTL {table.ttl_column} + INTERVAL retention_days DAY, server >= 19.6]")
        engine = f"ReplacingMergeTree({table.version_column or ''})"
        out += [f"### `{table.name}`", "", inspect.cleandoc(table.doc), "", f"`{engine} {' '.join(clauses)}`", ""]
        out += ["| column | type | meaning |", "|---|---|---|"]
        for c in table.columns:
            meaning = c.doc + (f" (DEFAULT `{c.default}`)" if c.default else "")
            out.append(f"| `{c.name}` | `{c.type}` | {meaning.replace('|', '/')} |")
        out.append("")
    return "\n".join(out)

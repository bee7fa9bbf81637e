"""probewatch's three dashboards: Overview, Client drill-down, Pipeline health.

Every query reads the tables of :mod:`storage.schema` and runs on ClickHouse 18.16 as well as on
current versions (chDB): no window functions, no ``toStartOfInterval`` (time is bucketed with
:func:`dashboards.macros.time_bucket`), arrays through ``ARRAY JOIN`` / ``indexOf``. Tables are
ReplacingMergeTree: aggregates that a replayed duplicate cannot change (max, uniq, argMax, DISTINCT)
read without ``FINAL``; counts over ``alerts`` / ``alert_deliveries`` (small tables) use ``FINAL``.

Time columns: scores and alerts are plotted on **event time** (``event_time``, the record's ``ts``);
pipeline batches and deliveries on **wall-clock** time (``finished_at`` / ``updated_at``).
"""

from __future__ import annotations

from dataclasses import dataclass

from dashboards.macros import time_bucket
from dashboards.model import (
    Dashboard,
    DashboardLink,
    DataLink,
    FieldOverride,
    Panel,
    Query,
    Threshold,
    Variable,
)
from detectors.scores import ATTACK_KINDS, GROUP_PREFIX
from storage.schema import POSITION_KEY
from storage.sql import quote_string, validate_identifier

OVERVIEW_UID = "probewatch-overview"
CLIENT_UID = "probewatch-client"
PIPELINE_UID = "probewatch-pipeline"
FOLDER_UID = "probewatch"
FOLDER_TITLE = "probewatch"
DATASOURCE_UID = "probewatch-clickhouse"
DATASOURCE_NAME = "probewatch ClickHouse"

# Signals shown on the drill-down (names as in detectors.signals OUTPUTS).
NEAR_DUPLICATE_SIGNALS = ("near_duplicate_share", "label_flip_share", "halving_step_share", "sparse_step_share")
COVERAGE_SIGNAL = "cell_coverage"
LOW_MARGIN_SIGNAL = "low_margin_share"
RATE_SIGNAL = "query_rate_per_min"
SCORE_BUCKETS = 10

CLIENT_LINK = (
    f"/d/{CLIENT_UID}/probewatch-client-drill-down?var-model=${{__data.fields.model_id:percentencode}}"
    f"&var-client=${{__data.fields.client_id:percentencode}}&${{__url_time_range}}"
)


@dataclass(frozen=True)
class Settings:
    """What the dashboards are built for: the ClickHouse database and the alert threshold."""

    database: str = "probewatch"
    alert_threshold: float = 0.8

    def __post_init__(self) -> None:
        validate_identifier(self.database)
        if not 0.0 < self.alert_threshold <= 1.0:
            raise ValueError("alert_threshold must be in (0, 1]")

    def t(self, table: str) -> str:
        return f"{self.database}.{validate_identifier(table)}"


def _signal(name: str) -> str:
    return f"signal_values[indexOf(signal_names, {quote_string(name)})]"


def _kind(name: str) -> str:
    return f"kind_scores[indexOf(kind_names, {quote_string(name)})]"


def _in_list(names: tuple[str, ...]) -> str:
    return "(" + ", ".join(quote_string(n) for n in names) + ")"


MODEL_FILTER = "model_id IN (${model:singlequote})"
# Source groups (client ids starting with GROUP_PREFIX) are scored too; their query counts are their
# members' sums, so traffic panels leave them out (the tables of suspicious clients keep them).
CLIENTS_ONLY = f"client_id NOT LIKE {quote_string(GROUP_PREFIX + '%')}"
CLIENT_FILTER = "model_id = ${model:singlequote} AND client_id = ${client:singlequote}"


# ------------------------------------------------------------------------------------ overview
def _model_variable(scores: str, *, multi: bool) -> Variable:
    """The `model` template variable: models with scores in the time range (several, or one)."""
    query = f"SELECT DISTINCT model_id FROM {scores} WHERE $__timeFilter(event_time) ORDER BY model_id"
    return Variable("model", "Model", query=query, multi=multi, include_all=multi)


def overview(s: Settings) -> Dashboard:
    scores = s.t("session_scores")
    b = time_bucket("event_time")
    events_per_s = f"""
SELECT {time_bucket("t")} AS time, model_id, sum(dq) / $__interval_s AS events_per_s
FROM
(
    SELECT model_id, p.1 AS t, p.2 AS dq
    FROM
    (
        SELECT model_id, pts,
            arrayMap(x -> toInt64(x.2), pts) AS q,
            arrayPopFront(arrayDifference(arrayPushFront(q, if(fs >= toUInt32($__fromTime), 0, q[1])))) AS dqs
        FROM
        (
            SELECT model_id, client_id, session_id,
                arraySort(x -> x.2, groupArray((event_time, n_queries))) AS pts, min(first_seen) AS fs
            FROM
            (
                SELECT DISTINCT model_id, client_id, session_id, n_queries, event_time, first_seen
                FROM {scores}
                WHERE $__timeFilter(event_time) AND {MODEL_FILTER} AND {CLIENTS_ONLY}
            )
            GROUP BY model_id, client_id, session_id
        )
    )
    ARRAY JOIN arrayMap((x, d) -> (x.1, d), pts, dqs) AS p
)
GROUP BY time, model_id
ORDER BY time, model_id"""
    active_clients = f"""
SELECT {b} AS time, model_id, uniqExact(client_id) AS clients
FROM {scores}
WHERE $__timeFilter(event_time) AND {MODEL_FILTER} AND {CLIENTS_ONLY}
GROUP BY time, model_id
ORDER BY time, model_id"""
    alerts_by_severity = f"""
SELECT {b} AS time, severity, count() AS alerts
FROM {s.t("alerts")} FINAL
WHERE $__timeFilter(event_time) AND status = 'firing' AND {MODEL_FILTER}
GROUP BY time, severity
ORDER BY time, severity"""
    threshold = repr(float(s.alert_threshold))
    top_clients = f"""
SELECT
    model_id,
    client_id,
    round(max(score), 3) AS max_score,
    argMax(top_kind, score) AS kind,
    arrayStringConcat(arraySort(groupUniqArrayArray(
        arrayFilter((k, v) -> v >= {threshold}, kind_names, kind_scores))), ', ') AS alerting_kinds,
    max(client_queries) AS queries,
    uniqExact(session_id) AS sessions,
    toDateTime(toUInt32(min(first_seen))) AS first_seen,
    max(event_time) AS last_seen
FROM {scores}
WHERE $__timeFilter(event_time) AND {MODEL_FILTER}
GROUP BY model_id, client_id
HAVING max_score > 0
ORDER BY max_score DESC, queries DESC
LIMIT 25"""
    labels = ", ".join(
        quote_string(f"{i / SCORE_BUCKETS:.1f}–{(i + 1) / SCORE_BUCKETS:.1f}") for i in range(SCORE_BUCKETS)
    )
    distribution = f"""
SELECT [{labels}][bucket + 1] AS score_range, count() AS sessions
FROM
(
    SELECT least(toUInt8(floor(argMax(score, n_queries) * {SCORE_BUCKETS})), {SCORE_BUCKETS - 1}) AS bucket
    FROM {scores}
    WHERE $__timeFilter(event_time) AND {MODEL_FILTER} AND {CLIENTS_ONLY}
    GROUP BY model_id, client_id, session_id
)
GROUP BY bucket
ORDER BY bucket"""
    return Dashboard(
        uid=OVERVIEW_UID,
        title="probewatch: Overview",
        description="Traffic, alerts and the most suspicious clients across the watched models.",
        tags=("probewatch", "security", "ml"),
        variables=[_model_variable(scores, multi=True)],
        links=(
            DashboardLink("Client drill-down", f"/d/{CLIENT_UID}"),
            DashboardLink("Pipeline health", f"/d/{PIPELINE_UID}"),
        ),
        panels=[
            Panel(
                "Events/s per model",
                "timeseries",
                [Query(events_per_s, "time_series")],
                description="Queries per second per model (event time), from the sessions' query counts at "
                "each score. Sessions already open before the range start count from their first score in it.",
                unit="reqps",
            ),
            Panel(
                "Active clients per model",
                "timeseries",
                [Query(active_clients, "time_series")],
                description="Distinct clients with a session score in each interval (event time).",
                unit="short",
            ),
            Panel(
                "Alerts by severity",
                "timeseries",
                [Query(alerts_by_severity, "time_series")],
                description="Firing alerts per interval by severity (event time the alert fired).",
                bars=True,
                stacked=True,
                unit="short",
                overrides=tuple(
                    FieldOverride(sev, (("color", {"mode": "fixed", "fixedColor": color}),))
                    for sev, color in (
                        ("info", "blue"),
                        ("warning", "yellow"),
                        ("high", "orange"),
                        ("critical", "red"),
                    )
                ),
            ),
            Panel(
                "Score distribution (latest score per session)",
                "barchart",
                [Query(distribution)],
                description="Sessions active in the range by their latest score.",
                x_field="score_range",
                log_scale=True,
                unit="short",
            ),
            Panel(
                "Top suspicious clients",
                "table",
                [Query(top_clients)],
                description=f"Clients by their highest session score in the range; alerting_kinds are the "
                f"attack kinds at or above the alert threshold ({s.alert_threshold}). Client ids starting "
                f"with {GROUP_PREFIX} are source groups (API keys sharing a network). Click a client for "
                "its drill-down.",
                width=24,
                height=10,
                overrides=(
                    FieldOverride(
                        "client_id",
                        (("links", [DataLink("Client drill-down", CLIENT_LINK).to_json()]),),
                    ),
                    FieldOverride(
                        "max_score",
                        (
                            ("custom.cellOptions", {"type": "color-background"}),
                            (
                                "thresholds",
                                {
                                    "mode": "absolute",
                                    "steps": [
                                        {"value": None, "color": "green"},
                                        {"value": round(s.alert_threshold / 2, 3), "color": "orange"},
                                        {"value": s.alert_threshold, "color": "red"},
                                    ],
                                },
                            ),
                        ),
                    ),
                ),
            ),
        ],
    )


# ------------------------------------------------------------------------------------ client
def client_drilldown(s: Settings) -> Dashboard:
    scores = s.t("session_scores")
    b = time_bucket("event_time")
    kinds = ",\n    ".join(f"max({_kind(k)}) AS {k}" for k in ATTACK_KINDS)
    score_sql = f"""
SELECT event_time AS time, max(score) AS score,
    {kinds}
FROM {scores}
WHERE {CLIENT_FILTER} AND $__timeFilter(event_time)
GROUP BY time
ORDER BY time"""
    signals_sql = f"""
SELECT event_time AS time, name AS signal, max(v) AS value
FROM {scores}
ARRAY JOIN signal_names AS name, signal_values AS v
WHERE {CLIENT_FILTER} AND $__timeFilter(event_time) AND isFinite(v)
GROUP BY time, signal
ORDER BY time, signal"""
    coverage_sql = f"""
SELECT n_queries,
    maxIf(v, client_id = ${{client:singlequote}}) AS client,
    quantilesIf(0.1, 0.5, 0.9)(v, client_id != ${{client:singlequote}})[1] AS population_p10,
    quantilesIf(0.1, 0.5, 0.9)(v, client_id != ${{client:singlequote}})[2] AS population_median,
    quantilesIf(0.1, 0.5, 0.9)(v, client_id != ${{client:singlequote}})[3] AS population_p90
FROM
(
    SELECT client_id, n_queries, {_signal(COVERAGE_SIGNAL)} AS v
    FROM {scores}
    WHERE model_id = ${{model:singlequote}} AND $__timeFilter(event_time)
        AND has(signal_names, {quote_string(COVERAGE_SIGNAL)}) AND isFinite(v)
)
GROUP BY n_queries
HAVING countIf(client_id = ${{client:singlequote}}) > 0
ORDER BY n_queries"""
    low_margin_client = f"""
SELECT event_time AS time, max({_signal(LOW_MARGIN_SIGNAL)}) AS low_margin_share
FROM {scores}
WHERE {CLIENT_FILTER} AND $__timeFilter(event_time) AND has(signal_names, {quote_string(LOW_MARGIN_SIGNAL)})
GROUP BY time
ORDER BY time"""
    low_margin_population = f"""
SELECT {b} AS time, quantile(0.5)(v) AS population_median, quantile(0.9)(v) AS population_p90
FROM
(
    SELECT event_time, {_signal(LOW_MARGIN_SIGNAL)} AS v
    FROM {scores}
    WHERE model_id = ${{model:singlequote}} AND $__timeFilter(event_time)
        AND has(signal_names, {quote_string(LOW_MARGIN_SIGNAL)}) AND isFinite(v)
)
GROUP BY time
ORDER BY time"""
    neardup_sql = f"""
SELECT event_time AS time, name AS signal, max(v) AS value
FROM {scores}
ARRAY JOIN signal_names AS name, signal_values AS v
WHERE {CLIENT_FILTER} AND $__timeFilter(event_time) AND name IN {_in_list(NEAR_DUPLICATE_SIGNALS)} AND isFinite(v)
GROUP BY time, signal
ORDER BY time, signal"""
    rate_sql = f"""
SELECT event_time AS time, max({_signal(RATE_SIGNAL)}) AS queries_per_min, max(client_queries) AS total_queries
FROM {scores}
WHERE {CLIENT_FILTER} AND $__timeFilter(event_time)
GROUP BY time
ORDER BY time"""
    ips_sql = f"""
SELECT ip AS source_ip, uniqExact(session_id) AS sessions, max(n_queries) AS max_session_queries,
    toDateTime(toUInt32(min(first_seen))) AS first_seen, max(event_time) AS last_seen
FROM {scores}
ARRAY JOIN source_ips AS ip
WHERE {CLIENT_FILTER} AND $__timeFilter(event_time)
GROUP BY source_ip
ORDER BY last_seen DESC
LIMIT 100"""
    alerts_sql = f"""
SELECT event_time AS time, status, severity, kind, round(score, 3) AS alert_score, n_queries, session_id, summary
FROM {s.t("alerts")} FINAL
WHERE {CLIENT_FILTER} AND $__timeFilter(event_time)
ORDER BY time DESC
LIMIT 200"""
    threshold_steps = (Threshold(None, "green"), Threshold(s.alert_threshold, "red"))
    return Dashboard(
        uid=CLIENT_UID,
        title="probewatch: Client drill-down",
        description="One client of one model: its score, the signals behind it, its sources and alerts.",
        tags=("probewatch", "security", "ml"),
        variables=[
            _model_variable(scores, multi=False),
            Variable(
                "client",
                "Client",
                query=f"SELECT client_id FROM {scores} WHERE model_id = ${{model:singlequote}} AND "
                "$__timeFilter(event_time) GROUP BY client_id ORDER BY max(score) DESC, client_id LIMIT 1000",
                description="Clients of the model in the range, most suspicious first.",
            ),
        ],
        links=(
            DashboardLink("Overview", f"/d/{OVERVIEW_UID}"),
            DashboardLink("Pipeline health", f"/d/{PIPELINE_UID}"),
        ),
        panels=[
            Panel(
                "Score and attack-kind scores",
                "timeseries",
                [Query(score_sql, "time_series")],
                description=f"The session score (max over kinds) and each kind's calibrated score; the red "
                f"line is the alert threshold ({s.alert_threshold}).",
                width=24,
                min=0,
                max=1,
                thresholds=threshold_steps,
                threshold_line=True,
            ),
            Panel(
                "Signals",
                "timeseries",
                [Query(signals_sql, "time_series")],
                description="Every raw signal of the client's sessions (max over concurrent sessions).",
                width=24,
            ),
            Panel(
                "Coverage growth vs population",
                "trend",
                [Query(coverage_sql)],
                description="Input-space cell coverage by session query count: this client against the "
                "10th–90th percentile of the model's other sessions at the same count.",
                x_field="n_queries",
                unit="percentunit",
            ),
            Panel(
                "Low-margin share",
                "timeseries",
                [Query(low_margin_client, "time_series", "A"), Query(low_margin_population, "time_series", "B")],
                description="Share of the client's queries close to the decision boundary (top-1 minus top-2 "
                "probability < 0.1), against the model's population.",
                unit="percentunit",
                min=0,
                max=1,
            ),
            Panel(
                "Near-duplicate chains",
                "timeseries",
                [Query(neardup_sql, "time_series")],
                description="Boundary-attack evidence: near-duplicate queries, label flips between them, "
                "halving and sparse step patterns.",
                unit="percentunit",
                min=0,
                max=1,
            ),
            Panel(
                "Query rate",
                "timeseries",
                [Query(rate_sql, "time_series")],
                description="The session's query rate (per minute) and the client's total queries to the model.",
                overrides=(FieldOverride("total_queries", (("custom.axisPlacement", "right"),)),),
            ),
            Panel(
                "Source IPs",
                "table",
                [Query(ips_sql)],
                description="Where the client's sessions came from (keyed hashes when storage.hash_source_ips).",
            ),
            Panel(
                "Alerts for this client",
                "table",
                [Query(alerts_sql)],
                width=24,
            ),
        ],
    )


# ------------------------------------------------------------------------------------ pipeline
def pipeline_health(s: Settings) -> Dashboard:
    batches = s.t("pipeline_batches")
    b = time_bucket("finished_at")
    deliveries = s.t("alert_deliveries")
    return Dashboard(
        uid=PIPELINE_UID,
        title="probewatch: Pipeline health",
        description="Consumer lag, throughput, latency, dead letters, ClickHouse writes and alert delivery.",
        tags=("probewatch", "pipeline"),
        links=(DashboardLink("Overview", f"/d/{OVERVIEW_UID}"),),
        panels=[
            Panel(
                "Consumer lag per worker",
                "timeseries",
                [
                    Query(
                        f"""
SELECT {b} AS time, worker, max(lag) AS lag
FROM {batches}
WHERE $__timeFilter(finished_at)
GROUP BY time, worker
ORDER BY time, worker""",
                        "time_series",
                    )
                ],
                description="Records behind the end of the assigned partitions after each batch, per worker "
                "(each worker owns a set of partitions; 0 for file runs).",
                unit="short",
            ),
            Panel(
                "Checkpointed position per partition",
                "table",
                [
                    Query(
                        f"""
SELECT source_partition AS partition, argMax(source_offset, version) AS position,
    max(inserted_at) AS checkpointed_at
FROM {s.t("detector_state")}
WHERE state_key = {quote_string(POSITION_KEY)}
GROUP BY partition
ORDER BY partition"""
                    )
                ],
                description="Next source offset of each Kafka partition folded into the checkpointed state "
                "(Kafka runs only).",
            ),
            Panel(
                "Throughput",
                "timeseries",
                [
                    Query(
                        f"""
SELECT {b} AS time, worker, sum(records) / $__interval_s AS records_per_s
FROM {batches}
WHERE $__timeFilter(finished_at)
GROUP BY time, worker
ORDER BY time, worker""",
                        "time_series",
                    )
                ],
                unit="reqps",
            ),
            Panel(
                "Batch latency",
                "timeseries",
                [
                    Query(
                        f"""
SELECT {b} AS time, quantile(0.5)(batch_latency_ms) AS p50, quantile(0.99)(batch_latency_ms) AS p99,
    max(batch_latency_ms) AS max
FROM {batches}
WHERE $__timeFilter(finished_at)
GROUP BY time
ORDER BY time""",
                        "time_series",
                    )
                ],
                description="Time to process a micro-batch, from its first record to its checkpoint.",
                unit="ms",
            ),
            Panel(
                "Dead-lettered records",
                "timeseries",
                [
                    Query(
                        f"""
SELECT {b} AS time, sum(dead_lettered) AS dead_lettered, sum(records) AS records
FROM {batches}
WHERE $__timeFilter(finished_at)
GROUP BY time
ORDER BY time""",
                        "time_series",
                    )
                ],
                bars=True,
                unit="short",
            ),
            Panel(
                "Dead-letter reasons",
                "table",
                [
                    Query(
                        f"""
SELECT reason, sum(n) AS records, max(finished_at) AS last_seen
FROM {batches}
ARRAY JOIN dlq_reasons AS reason, dlq_counts AS n
WHERE $__timeFilter(finished_at)
GROUP BY reason
ORDER BY records DESC
LIMIT 50"""
                    )
                ],
            ),
            Panel(
                "ClickHouse write latency",
                "timeseries",
                [
                    Query(
                        f"""
SELECT {b} AS time, quantile(0.5)(store_latency_ms) AS p50, quantile(0.99)(store_latency_ms) AS p99,
    max(store_latency_ms) AS max
FROM {batches}
WHERE $__timeFilter(finished_at)
GROUP BY time
ORDER BY time""",
                        "time_series",
                    )
                ],
                description="Time each batch spent writing scores, alerts, events and stats to ClickHouse.",
                unit="ms",
            ),
            Panel(
                "ClickHouse errors (server counters since start)",
                "stat",
                [
                    Query(
                        """
SELECT sumIf(value, event = 'FailedInsertQuery') AS failed_inserts,
    sumIf(value, event = 'FailedQuery') AS failed_queries
FROM system.events"""
                    )
                ],
                description="Failed INSERTs and queries the ClickHouse server counted since it started "
                "(system.events). A write that fails is retried by the worker; batches are replayed, not lost.",
                thresholds=(Threshold(None, "green"), Threshold(1, "orange")),
            ),
            Panel(
                "Alert deliveries",
                "timeseries",
                [
                    Query(
                        f"""
SELECT {time_bucket("updated_at")} AS time, concat(receiver, ' ', status) AS receiver_status, count() AS alerts
FROM {deliveries} FINAL
WHERE $__timeFilter(updated_at)
GROUP BY time, receiver_status
ORDER BY time, receiver_status""",
                        "time_series",
                    )
                ],
                description="Latest delivery state of each (alert, receiver) by the time it was recorded.",
                bars=True,
                stacked=True,
                unit="short",
            ),
            Panel(
                "Failed alert deliveries",
                "table",
                [
                    Query(
                        f"""
SELECT updated_at AS time, receiver, alert_id, attempts, last_error
FROM {deliveries} FINAL
WHERE status = 'failed' AND $__timeFilter(updated_at)
ORDER BY time DESC
LIMIT 100"""
                    )
                ],
            ),
        ],
    )


def all_dashboards(settings: Settings | None = None) -> list[Dashboard]:
    s = settings or Settings()
    return [overview(s), client_drilldown(s), pipeline_health(s)]

"""Conversion between probewatch records and table rows, shared by both backends.

Every ``*_row`` function returns a tuple in the order of the table's ``insert_names`` (see
:mod:`storage.schema`), holding only plain Python values: ``str``, ``int``, ``float``, ``bytes`` (for
``binary`` columns), ``None`` (Nullable columns) and lists. ``DateTime`` columns get integer epoch
seconds. The backends only differ in how they ship these tuples to ClickHouse.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from alerting.alert import Alert
from detectors.scores import SessionScore
from ingest.records import QueryRecord, SourcePosition
from storage.models import BatchStats, Delivery
from storage.schema import POSITION_KEY

log = logging.getLogger(__name__)

U32_MAX = 2**32 - 1
I64_MAX = 2**63 - 1
U64_MAX = 2**64 - 1
IP_HASH_KEY_ENV = "PROBEWATCH_IP_HASH_KEY"
_FALLBACK_IP_KEY = b"probewatch-ip-hash-v1"

Row = tuple[Any, ...]


def clamp_u32(value: float) -> int:
    return min(max(int(value), 0), U32_MAX)


def clamp_u64(value: float) -> int:
    return min(max(int(value), 0), U64_MAX)


def clamp_i64(value: float) -> int:
    return min(max(int(value), -I64_MAX - 1), I64_MAX)


def datetime_seconds(epoch_s: float) -> int:
    """Whole epoch seconds for a ``DateTime`` column (floor; clamped to the type's 1970..2106 range)."""
    return clamp_u32(math.floor(epoch_s)) if math.isfinite(epoch_s) else 0


# ---------------------------------------------------------------------------------------------------
# Source-IP hashing and deterministic event sampling


class IpHasher:
    """Keyed hash of a source IP: HMAC-SHA256 truncated to 16 hex characters (64 bits).

    Keyed so that the 2^32 IPv4 addresses cannot simply be hashed and looked up; deterministic for a
    given key so replays and dashboards group consistently.
    """

    def __init__(self, key: bytes) -> None:
        if not key:
            raise ValueError("empty IP hash key")
        self._key = bytes(key)
        self._cache: dict[str, str] = {}

    def __call__(self, ip: str) -> str:
        hashed = self._cache.get(ip)
        if hashed is None:
            hashed = hmac.new(self._key, ip.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()[:16]
            if len(self._cache) >= 100_000:
                self._cache.clear()
            self._cache[ip] = hashed
        return hashed


def make_ip_hasher(enabled: bool, key: bytes | None = None) -> IpHasher | None:
    """The hasher for ``storage.hash_source_ips``: the given key, else ``$PROBEWATCH_IP_HASH_KEY``, else
    a built-in key (with a warning: hashes of IPv4 addresses under a public key can be reversed)."""
    if not enabled:
        return None
    if key is None:
        env = os.environ.get(IP_HASH_KEY_ENV, "")
        key = env.encode() if env else None
    if not key:
        log.warning(
            "storage.hash_source_ips is on but no key is set (%s); using the built-in key, so hashed "
            "IPv4 addresses can be recovered by brute force",
            IP_HASH_KEY_ENV,
        )
        key = _FALLBACK_IP_KEY
    return IpHasher(key)


def sample_event(position: SourcePosition, rate: float) -> bool:
    """Whether the record at ``position`` belongs to the raw-event sample at ``rate``.

    Deterministic (a BLAKE2b hash of topic, partition and offset), so a replay samples exactly the
    same records; idempotent, so filtering twice at the same rate keeps the same set.
    """
    if rate <= 0.0:
        return False
    if rate >= 1.0:
        return True
    digest = hashlib.blake2b(
        f"{position.topic}\x1f{position.partition}\x1f{position.offset}".encode("utf-8", "surrogatepass"),
        digest_size=8,
    ).digest()
    return int.from_bytes(digest, "big") < rate * 2.0**64


# ---------------------------------------------------------------------------------------------------
# Rows


def _pairs(mapping: Mapping[str, float]) -> tuple[list[str], list[float]]:
    """Names (sorted, so replays write identical rows) and their values as floats."""
    if not mapping:
        return [], []
    names = sorted(mapping)
    return names, list(map(float, map(mapping.__getitem__, names)))


class RowBuilder:
    """Builds the rows of every table; holds the per-store options (IP hashing, input storage)."""

    def __init__(self, hasher: Callable[[str], str] | None = None, store_inputs: bool = False) -> None:
        self.hasher = hasher
        self.store_inputs = store_inputs

    def _ips(self, ips: Iterable[str]) -> list[str]:
        hasher = self.hasher
        return [hasher(ip) for ip in ips] if hasher is not None else [str(ip) for ip in ips]

    def score_row(self, score: SessionScore, batch_id: str) -> Row:
        kind_names, kind_values = _pairs(score.kind_scores)
        signal_names, signal_values = _pairs(score.signals)
        peak_names, peak_values = _pairs(score.peak_kind_scores)
        event_ts = float(score.event_time)
        return (
            datetime_seconds(event_ts),
            event_ts,
            float(score.first_seen),
            score.model_id,
            score.client_id,
            score.session_id,
            clamp_u32(score.n_queries),
            clamp_u64(score.client_queries),
            float(score.score),
            score.top_kind,
            kind_names,
            kind_values,
            signal_names,
            signal_values,
            [str(r) for r in score.reasons],
            self._ips(score.source_ips),
            1 if score.closed else 0,
            1 if score.warming_up else 0,
            clamp_u32(score.state_bytes),
            list(score.crossed_kinds),
            peak_names,
            peak_values,
            batch_id,
        )

    def alert_row(self, alert: Alert, batch_id: str) -> Row:
        signal_names, signal_values = _pairs(alert.signals)
        event_ts = float(alert.event_time)
        return (
            alert.alert_id,
            alert.dedup_key,
            alert.status,
            alert.kind,
            alert.model_id,
            alert.client_id,
            alert.session_id,
            alert.severity,
            float(alert.score),
            clamp_u64(alert.n_queries),
            datetime_seconds(event_ts),
            event_ts,
            float(alert.first_seen),
            [str(r) for r in alert.reasons],
            signal_names,
            signal_values,
            self._ips(alert.source_ips),
            alert.summary,
            alert.notification,
            clamp_u32(alert.seq),
            batch_id,
        )

    def event_row(self, record: QueryRecord, batch_id: str) -> Row:
        position = record.position
        ip = record.source_ip
        vector: list[float] = []
        if self.store_inputs and record.vector is not None:
            vector = [float(v) for v in record.vector.tolist()]
        return (
            datetime_seconds(record.ts),
            float(record.ts),
            record.model_id,
            record.client_id,
            record.session_id or "",
            record.request_id or "",
            "" if ip is None else (self.hasher(ip) if self.hasher is not None else ip),
            record.label or "",
            _opt_float(record.confidence),
            _opt_float(record.margin),
            _opt_float(record.score),
            _opt_float(record.latency_ms),
            None if record.status is None else max(min(int(record.status), 2**31 - 1), -(2**31)),
            position.topic,
            int(position.partition),
            clamp_i64(position.offset),
            vector,
            batch_id,
        )

    @staticmethod
    def batch_row(
        batch_id: str,
        stats: BatchStats,
        *,
        scored_sessions: int,
        alerts: int,
        events_sampled: int,
        store_latency_ms: float,
    ) -> Row:
        reasons = sorted(stats.dlq_reasons)
        finished = float(stats.finished_at)
        return (
            batch_id,
            stats.worker,
            datetime_seconds(finished),
            finished,
            clamp_u32(stats.records),
            clamp_u32(stats.dead_lettered),
            clamp_u32(scored_sessions if stats.scored_sessions is None else stats.scored_sessions),
            clamp_u32(alerts if stats.alerts is None else stats.alerts),
            clamp_u32(events_sampled),
            float(stats.batch_latency_ms),
            float(stats.store_latency_ms or store_latency_ms),
            clamp_i64(stats.lag),
            reasons,
            [clamp_u64(stats.dlq_reasons[r]) for r in reasons],
        )

    @staticmethod
    def delivery_row(delivery: Delivery) -> Row:
        updated = float(delivery.updated_at)
        return (
            delivery.alert_id,
            delivery.receiver,
            delivery.status,
            clamp_u32(delivery.attempts),
            delivery.last_error,
            datetime_seconds(updated),
            updated,
            clamp_u64(round(updated * 1_000_000)),
        )

    @staticmethod
    def state_rows(
        partition: int,
        entries: Mapping[str, bytes | bytearray | memoryview | None],
        position: int,
        version: int,
    ) -> list[Row]:
        """Rows of one checkpoint: one per entry (None = tombstone) plus the position row."""
        if POSITION_KEY in entries:
            raise ValueError(f"state key {POSITION_KEY!r} is reserved for the source position")
        partition = int(partition)
        version = clamp_u64(version)
        offset = clamp_i64(position)
        rows: list[Row] = []
        for key, blob in entries.items():
            if not isinstance(key, str):
                raise TypeError(f"state keys must be str, got {type(key).__name__}")
            if blob is None:
                rows.append((partition, key, version, b"", 1, offset))
            elif isinstance(blob, bytes | bytearray | memoryview):
                rows.append((partition, key, version, bytes(blob), 0, offset))
            else:
                raise TypeError(f"state values must be bytes or None, got {type(blob).__name__}")
        rows.append((partition, POSITION_KEY, version, b"", 0, offset))
        return rows


def _opt_float(value: float | None) -> float | None:
    return None if value is None else float(value)


# ---------------------------------------------------------------------------------------------------
# Reading alerts back

ALERT_SELECT_COLUMNS: tuple[str, ...] = (
    "alert_id",
    "dedup_key",
    "status",
    "kind",
    "model_id",
    "client_id",
    "session_id",
    "severity",
    "score",
    "n_queries",
    "event_ts",
    "first_seen",
    "reasons",
    "signal_names",
    "signal_values",
    "source_ips",
    "summary",
    "notification",
    "seq",
)


def alert_from_row(row: Sequence[Any]) -> Alert:
    """An Alert from a row of ALERT_SELECT_COLUMNS."""
    (
        alert_id,
        dedup_key,
        status,
        kind,
        model_id,
        client_id,
        session_id,
        severity,
        score,
        n_queries,
        event_ts,
        first_seen,
        reasons,
        signal_names,
        signal_values,
        source_ips,
        summary,
        notification,
        seq,
    ) = row[: len(ALERT_SELECT_COLUMNS)]
    return Alert(
        alert_id=alert_id,
        dedup_key=dedup_key,
        status=status,
        kind=kind,
        model_id=model_id,
        client_id=client_id,
        session_id=session_id,
        severity=severity,
        score=float(score),
        n_queries=int(n_queries),
        event_time=float(event_ts),
        first_seen=float(first_seen),
        reasons=list(reasons),
        signals={str(k): float(v) for k, v in zip(signal_names, signal_values, strict=True)},
        source_ips=list(source_ips),
        summary=summary,
        notification=notification,
        seq=int(seq),
    )

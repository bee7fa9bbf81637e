"""The values the storage API takes and returns (besides SessionScore, Alert and QueryRecord)."""

from __future__ import annotations

import time
from typing import Literal

import msgspec

from alerting.alert import Alert
from detectors.scores import SessionScore
from ingest.records import QueryRecord

DeliveryStatus = Literal["pending", "delivered", "failed"]


class StorageError(RuntimeError):
    """A storage operation failed (the message carries the server's reason, without its stack trace)."""


class StorageUnavailable(StorageError):
    """The storage backend cannot be reached or opened."""


class BatchStats(msgspec.Struct, kw_only=True):
    """The `pipeline_batches` row of one micro-batch.

    ``batch_id`` defaults to the StoredBatch's; ``scored_sessions`` / ``alerts`` default to the number
    of scores / alerts in the StoredBatch, and ``store_latency_ms`` (when None or 0) to the time the
    store spent writing the batch's other rows.
    """

    worker: str
    batch_id: str = ""
    finished_at: float = msgspec.field(default_factory=time.time)  # epoch seconds
    records: int = 0
    dead_lettered: int = 0
    scored_sessions: int | None = None
    alerts: int | None = None
    batch_latency_ms: float = 0.0
    store_latency_ms: float | None = None
    lag: int = 0
    dlq_reasons: dict[str, int] = msgspec.field(default_factory=dict)


class StoredBatch(msgspec.Struct, kw_only=True):
    """Everything one micro-batch writes, in one call.

    ``events`` may be *all* records of the batch: the store keeps only the deterministic sample
    (``storage.raw_sample_rate``, by a hash of each record's source position; see
    :func:`storage.rows.sample_event`). Passing records already filtered with the same function is
    equivalent (the sample is idempotent), which saves holding the whole batch.
    """

    batch_id: str
    scores: list[SessionScore] = msgspec.field(default_factory=list)
    alerts: list[Alert] = msgspec.field(default_factory=list)
    events: list[QueryRecord] = msgspec.field(default_factory=list)
    stats: BatchStats | None = None


class Delivery(msgspec.Struct, kw_only=True):
    """The delivery state of one alert at one receiver; the latest ``updated_at`` wins."""

    alert_id: str
    receiver: str
    status: DeliveryStatus
    attempts: int = 1
    last_error: str = ""
    updated_at: float = msgspec.field(default_factory=time.time)  # epoch seconds


class TopSession(msgspec.Struct, kw_only=True):
    """The highest-scoring session of one (model, client), at its latest score."""

    model_id: str
    client_id: str
    session_id: str
    score: float
    top_kind: str
    kind_scores: dict[str, float]
    n_queries: int
    client_queries: int
    event_time: float  # epoch seconds of the newest record
    first_seen: float
    reasons: list[str]
    closed: bool
    warming_up: bool

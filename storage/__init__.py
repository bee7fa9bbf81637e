"""probewatch storage: ClickHouse behind one interface, two backends.

* ``chdb`` (default): embedded chDB, persisted to ``storage.chdb.path``;
* ``clickhouse``: a ClickHouse server (18.16 or newer) over the native protocol.

Both run the same schema (:mod:`storage.schema`), the same row conversion (:mod:`storage.rows`) and
the same SQL (:mod:`storage.base`); they differ only in how statements and rows are shipped.

Usage::

    store = open_store(config.storage)
    store.migrate()
    store.write_batch(StoredBatch(batch_id=..., scores=..., alerts=..., events=..., stats=...))
    # ... commit Kafka offsets: the batch is durable once write_batch returns.

Idempotency: every table is a ReplacingMergeTree keyed so that writing the same batch (or the same
state checkpoint, delivery, ...) again collapses onto the existing rows; the readers here read
through ``FINAL`` / ``argMax``. Raw SQL through :meth:`Store.query` should do the same (``FINAL``)
when exact counts matter, because merges happen in the background.

Query parameters use ClickHouse's ``{name:Type}`` syntax on both backends (bound client-side by
:func:`storage.sql.bind`; 18.16 has no server-side parameters).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

from alerting.alert import Alert
from probewatch.config import StorageConfig
from storage.models import (
    BatchStats,
    Delivery,
    DeliveryStatus,
    StorageError,
    StorageUnavailable,
    StoredBatch,
    TopSession,
)
from storage.rows import sample_event
from storage.schema import SCHEMA_VERSION
from storage.sql import BindError

__all__ = [
    "SCHEMA_VERSION",
    "BatchStats",
    "BindError",
    "Delivery",
    "DeliveryStatus",
    "StorageError",
    "StorageUnavailable",
    "Store",
    "StoredBatch",
    "TopSession",
    "open_store",
    "sample_event",
]


@runtime_checkable
class Store(Protocol):
    """What the pipeline, alerting, CLI and dashboards use. See :class:`storage.base.BaseStore`."""

    config: StorageConfig
    database: str

    @property
    def backend(self) -> str:
        """'chdb' or 'clickhouse'."""
        ...

    def migrate(self) -> None: ...

    def write_batch(self, batch: StoredBatch) -> None: ...

    def save_state(self, partition: int, entries: Mapping[str, bytes | None], position: int, version: int) -> None: ...

    def load_state(self, partitions: list[int]) -> tuple[dict[int, dict[str, bytes]], dict[int, int]]: ...

    def purge_deleted_state(self, older_than_s: int = 3600) -> None: ...

    def record_deliveries(self, rows: list[Delivery]) -> None: ...

    def undelivered(
        self, receivers: list[str], limit: int, *, since: float | None = None
    ) -> list[tuple[Alert, str]]: ...

    def query(self, sql: str, params: Mapping[str, Any] | None = None) -> list[tuple[Any, ...]]: ...

    def query_with_columns(
        self, sql: str, params: Mapping[str, Any] | None = None
    ) -> tuple[list[str], list[tuple[Any, ...]]]: ...

    def top_sessions(self, limit: int = 20) -> list[TopSession]: ...

    def counts(self) -> dict[str, int]: ...

    def server_version(self) -> tuple[int, ...]: ...

    def stored_ip(self, ip: str) -> str: ...

    def close(self) -> None: ...


def open_store(config: StorageConfig, *, ip_hash_key: bytes | None = None) -> Store:
    """Open the configured backend (does not migrate; call ``migrate()`` once at start-up).

    ``ip_hash_key`` keys the source-IP hash when ``storage.hash_source_ips`` is on; default
    ``$PROBEWATCH_IP_HASH_KEY``. Raises StorageUnavailable if the backend cannot be opened/reached.
    """
    if ip_hash_key is None and config.ip_hash_key:
        ip_hash_key = config.ip_hash_key.encode()
    if config.backend == "chdb":
        from storage.chdb_store import ChdbStore

        return ChdbStore(config, ip_hash_key=ip_hash_key)
    if config.backend == "clickhouse":
        from storage.clickhouse_store import ClickHouseServerStore

        return ClickHouseServerStore(config, ip_hash_key=ip_hash_key)
    raise StorageError(f"unknown storage backend {config.backend!r}")

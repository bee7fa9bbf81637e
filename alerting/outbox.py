"""The ClickHouse outbox: the dispatcher's view of ``storage.Store`` (the ``alerts`` table, written by
``write_batch`` before offsets are committed, and ``alert_deliveries``), and the read-back of the
latest notification of each incident from which the policy is rebuilt at start."""

from __future__ import annotations

import time
from typing import Any

from alerting.alert import Alert
from alerting.dispatch import DeliveryRecord

# The dispatcher's delivery states as stored (storage keeps pending | delivered | failed; the store's
# `undelivered` returns every pair whose latest state is not 'delivered').
_STORED_STATUS = {
    "delivered": "delivered",
    "skipped": "delivered",
    "superseded": "delivered",
    "retrying": "pending",
    "failed": "failed",
}


class StoreOutbox:
    """Adapts a ``storage.Store``. ``redeliver_max_age_s`` bounds the outbox sweep to alerts whose
    event time is at most that old (wall clock), so a new receiver does not get the whole history;
    0 = no bound."""

    def __init__(self, store: Any, *, redeliver_max_age_s: float = 0.0, clock: Any = time.time) -> None:
        self.store = store
        self.redeliver_max_age_s = redeliver_max_age_s
        self.clock = clock

    def record_deliveries(self, rows: list[DeliveryRecord]) -> None:
        from storage.models import Delivery

        self.store.record_deliveries(
            [
                Delivery(
                    alert_id=row.alert_id,
                    receiver=row.receiver,
                    status=_STORED_STATUS.get(row.status, "pending"),  # type: ignore[arg-type]
                    attempts=row.attempts,
                    last_error=row.error or (row.status if row.status in ("skipped", "superseded") else ""),
                    updated_at=row.at or self.clock(),
                )
                for row in rows
            ]
        )

    def undelivered(self, receivers: list[str], limit: int) -> list[tuple[Alert, str]]:
        since = self.clock() - self.redeliver_max_age_s if self.redeliver_max_age_s > 0 else None
        result: list[tuple[Alert, str]] = self.store.undelivered(receivers, limit, since=since)
        return result

    def latest_alerts(self, horizon_s: float) -> list[Alert]:
        """The newest stored notification of every incident that notified within ``horizon_s``
        (event time) of the newest alert in the outbox — enough to rebuild every open incident, since
        an open incident is notified at least every max(cooldown, renotify) or resolves."""
        from storage.rows import ALERT_SELECT_COLUMNS, alert_from_row

        columns = ", ".join(ALERT_SELECT_COLUMNS)
        table = f"{self.store.database}.alerts"
        rows = self.store.query(
            f"""
            SELECT {columns}
            FROM {{alerts:Identifier}} FINAL
            WHERE event_ts >= (SELECT max(event_ts) FROM {{alerts:Identifier}}) - {{horizon:Float64}}
            ORDER BY dedup_key, event_ts DESC, status DESC
            LIMIT 1 BY dedup_key
            """,
            {"alerts": table, "horizon": float(horizon_s)},
        )
        return [alert_from_row(row) for row in rows]

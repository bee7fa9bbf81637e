"""The alert record: what the alert policy emits, the outbox stores and receivers deliver."""

from __future__ import annotations

from typing import Literal

import msgspec

Severity = Literal["info", "warning", "high", "critical"]
SEVERITIES: tuple[Severity, ...] = ("info", "warning", "high", "critical")
AlertStatus = Literal["firing", "resolved"]
# Why this notification was sent: a new incident, an update of an open one (coalesced by the
# cooldown), a severity escalation, a periodic reminder, the resolve, or `probewatch alerts test`.
Notification = Literal["new", "update", "escalation", "reminder", "resolve", "test"]
ROLLUP_KIND = "alert_storm"


def severity_rank(severity: str) -> int:
    return SEVERITIES.index(severity) if severity in SEVERITIES else -1


class Alert(msgspec.Struct, gc=False):
    """One notification about one incident. ``dedup_key`` names the incident (model, client, kind);
    ``alert_id`` names this notification and is deterministic, so a replayed batch produces the same
    id and storage and receivers can drop the duplicate."""

    alert_id: str
    dedup_key: str
    status: AlertStatus
    kind: str
    model_id: str
    client_id: str
    session_id: str
    severity: Severity
    score: float
    n_queries: int  # this client's queries to this model when the alert fired
    event_time: float  # event time (epoch s) at which the alert fired / resolved
    first_seen: float  # event time the incident started
    reasons: list[str]
    signals: dict[str, float] = msgspec.field(default_factory=dict)
    source_ips: list[str] = msgspec.field(default_factory=list)
    summary: str = ""
    # Added by the incident policy (defaults keep older rows and the stateless policy valid).
    notification: str = "new"  # one of Notification
    seq: int = 0  # notifications of this incident before this one (0 for the page that opened it)

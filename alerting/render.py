"""Alert text an on-call engineer reads: who, what (signals vs the population), since when, how many
queries, where to look (Grafana) and what to do. Shared by every receiver so they all say the same."""

from __future__ import annotations

from datetime import UTC, datetime
from urllib.parse import urlencode

import msgspec

from alerting.alert import ROLLUP_KIND, Alert

ACTIONS: dict[str, str] = {
    "extraction": (
        "rate-limit client {client} on model {model}; return the top label only (no probability vector) "
        "to this key; revoke the API key if it is not a known integration"
    ),
    "boundary_probing": (
        "rate-limit client {client}; stop returning confidences/margins to this key; revoke the API key "
        "if the probing is confirmed"
    ),
    "adversarial_input": (
        "review the flagged inputs on the dashboard; block source IPs {ips}; revoke the API key of "
        "client {client} if confirmed"
    ),
    "volume": ("rate-limit client {client} (per-key quota); check with its owner whether a batch job runs under it"),
    ROLLUP_KIND: (
        "many clients at once — likely Sybil keys or a distributed attack: apply a per-model rate limit, "
        "block the source IP ranges, review the listed clients on the dashboard and revoke their keys"
    ),
}
_NOTIFICATION_WORDS = {
    "new": "new incident",
    "update": "update",
    "escalation": "severity raised",
    "reminder": "still ongoing",
    "resolve": "resolved",
    "test": "TEST — not a real incident",
}


def when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


class Rendered(msgspec.Struct, frozen=True):
    title: str  # one line: severity, what, who
    text: str  # the full plain-text body (title first)
    dashboard_url: str  # "" without a Grafana base URL
    action: str
    runbook_url: str


class AlertFormatter:
    """Renders alerts; ``grafana_base_url`` like ``https://grafana.example.com`` (no trailing /d/...)."""

    def __init__(self, grafana_base_url: str = "", runbook_url: str = "", threshold: float | None = None) -> None:
        self.grafana_base_url = grafana_base_url.rstrip("/")
        self.runbook_url = runbook_url
        self.threshold = threshold

    def dashboard_url(self, alert: Alert) -> str:
        if not self.grafana_base_url:
            return ""
        start_ms = int((alert.first_seen - 900) * 1000)
        end = f"{int((alert.event_time + 900) * 1000)}" if alert.status == "resolved" else "now"
        if alert.kind == ROLLUP_KIND or alert.client_id == "*":
            query = urlencode({"from": start_ms, "to": end})
            return f"{self.grafana_base_url}/d/probewatch-overview?{query}"
        query = urlencode({"var-model": alert.model_id, "var-client": alert.client_id, "from": start_ms, "to": end})
        return f"{self.grafana_base_url}/d/probewatch-client?{query}"

    def action(self, alert: Alert) -> str:
        template = ACTIONS.get(alert.kind, "rate-limit client {client}; revoke its API key if confirmed")
        ips = ", ".join(alert.source_ips[:5]) or "(none recorded)"
        return template.format(client=alert.client_id, model=alert.model_id, ips=ips)

    def title(self, alert: Alert) -> str:
        what = "alert storm" if alert.kind == ROLLUP_KIND else f"{alert.kind.replace('_', ' ')} suspected"
        who = (
            f"{int(alert.signals.get('open_incidents', 0))} clients"
            if alert.kind == ROLLUP_KIND
            else f"client {alert.client_id} on model {alert.model_id}"
        )
        state = "RESOLVED" if alert.status == "resolved" else alert.severity.upper()
        test = "[TEST] " if alert.notification == "test" else ""
        return f"{test}[{state}] {what} — {who}"

    def render(self, alert: Alert) -> Rendered:
        lines = [self.title(alert)]
        threshold = f" (alert threshold {self.threshold:.2f})" if self.threshold is not None else ""
        state = "RESOLVED" if alert.status == "resolved" else "FIRING"
        note = _NOTIFICATION_WORDS.get(alert.notification, alert.notification)
        lines.append(f"Status:    {state} ({note}), severity {alert.severity}, score {alert.score:.2f}{threshold}")
        span = alert.event_time - alert.first_seen
        ended = "ended" if alert.status == "resolved" else "latest evidence"
        last = when(alert.event_time)
        lines.append(f"Since:     {when(alert.first_seen)} ({ended} {last}, {_duration(span)}; event time)")
        if alert.kind == ROLLUP_KIND:
            n = {k: int(v) for k, v in alert.signals.items()}
            lines.append(
                f"Who:       {n.get('open_incidents', 0)} open incidents "
                f"({n.get('incidents_total', 0)} in this "
                f"storm) from {n.get('clients', 0)} clients on {n.get('models', 0)} model(s); "
                "individual pages are capped"
            )
            lines.append(f"Queries:   {alert.n_queries:,} from these clients")
        else:
            lines.append(f"Who:       client {alert.client_id}, model {alert.model_id}, session {alert.session_id}")
            lines.append(f"Queries:   {alert.n_queries:,} from this client to this model")
        if alert.source_ips:
            more = f" (+{len(alert.source_ips) - 8} more)" if len(alert.source_ips) > 8 else ""
            lines.append(f"From IPs:  {', '.join(alert.source_ips[:8])}{more}")
        if alert.reasons:
            lines.append("Evidence (vs the model's population of clients):")
            lines.extend(f"  - {reason}" for reason in alert.reasons[:12])
        elif alert.signals:
            lines.append("Signals:   " + ", ".join(f"{k}={v:g}" for k, v in sorted(alert.signals.items())))
        url = self.dashboard_url(alert)
        if url:
            lines.append(f"Dashboard: {url}")
        action = self.action(alert)
        if alert.status == "firing":
            lines.append(f"Action:    {action}")
        if self.runbook_url:
            lines.append(f"Runbook:   {self.runbook_url}")
        lines.append(f"Incident:  {alert.dedup_key} (notification #{alert.seq + 1}, id {alert.alert_id})")
        return Rendered(
            title=lines[0],
            text="\n".join(lines),
            dashboard_url=url,
            action=action,
            runbook_url=self.runbook_url,
        )

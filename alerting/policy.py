"""The alert policy: from session scores to alerts, one incident per (model, client, kind)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from alerting.alert import Alert, AlertStatus, Severity
from detectors.scores import SessionScore


def severity_for(score: float, threshold: float) -> Severity:
    """Severity follows the calibrated score: the threshold is a warning, near-certainty critical."""
    if score >= 0.97:
        return "critical"
    if score >= max(threshold, 0.9):
        return "high"
    if score >= threshold:
        return "warning"
    return "info"


def alert_id_for(dedup_key: str, status: str, event_time: float, n_queries: int) -> str:
    """Deterministic: a replayed micro-batch yields the same id, so duplicates can be dropped."""
    raw = f"{dedup_key}|{status}|{event_time:.3f}|{n_queries}".encode()
    return hashlib.sha256(raw).hexdigest()[:24]


def dedup_key_for(model_id: str, client_id: str, kind: str) -> str:
    return f"{model_id}|{client_id}|{kind}"


def build_alert(score: SessionScore, kind: str, status: AlertStatus, threshold: float) -> Alert:
    value = score.peak_kind_scores.get(kind, score.kind_scores.get(kind, 0.0))
    key = dedup_key_for(score.model_id, score.client_id, kind)
    return Alert(
        alert_id=alert_id_for(key, status, score.event_time, score.client_queries),
        dedup_key=key,
        status=status,
        kind=kind,
        model_id=score.model_id,
        client_id=score.client_id,
        session_id=score.session_id,
        severity=severity_for(value, threshold),
        score=value,
        n_queries=score.client_queries,
        event_time=score.event_time,
        first_seen=score.first_seen,
        reasons=[r for r in score.reasons if r.startswith(f"{kind}:")] or list(score.reasons),
        signals=dict(score.signals),
        source_ips=list(score.source_ips),
        summary=f"{kind.replace('_', ' ')} suspected from client {score.client_id} on model "
        f"{score.model_id} (score {value:.2f}, {score.client_queries} queries)",
    )


class ThresholdPolicy:
    """Fires when a kind's score first reaches the threshold in a session, resolves when that session
    ends. Stateless: the crossing and the peak come with the score from checkpointed session state."""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold

    def evaluate(self, scores: Sequence[SessionScore]) -> list[Alert]:
        alerts: list[Alert] = []
        for score in scores:
            alerts.extend(build_alert(score, kind, "firing", self.threshold) for kind in score.crossed_kinds)
            if score.closed:
                alerts.extend(
                    build_alert(score, kind, "resolved", self.threshold)
                    for kind, peak in score.peak_kind_scores.items()
                    if peak >= self.threshold
                )
        return alerts

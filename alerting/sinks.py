"""Alert sinks that need no network: the console and a JSON-lines file."""

from __future__ import annotations

import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Protocol

import msgspec

from alerting.alert import Alert, severity_rank
from alerting.render import AlertFormatter

_encoder = msgspec.json.Encoder()


class AlertSink(Protocol):
    name: str

    def send(self, alerts: list[Alert]) -> None:
        """Deliver the alerts or raise; the caller records the delivery state."""
        ...

    def close(self) -> None: ...


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def format_alert(alert: Alert) -> str:
    """The alert as an on-call engineer reads it in a terminal."""
    head = (
        f"[{alert.severity.upper()}] {alert.status} {alert.kind} — client {alert.client_id} "
        f"on model {alert.model_id}, score {alert.score:.2f}, {alert.n_queries} queries, "
        f"at {_when(alert.event_time)} (since {_when(alert.first_seen)})"
    )
    return "\n".join([head, *(f"    - {reason}" for reason in alert.reasons)])


class ConsoleSink:
    name = "console"

    def __init__(
        self,
        stream: IO[str] | None = None,
        min_severity: str = "info",
        formatter: AlertFormatter | None = None,
    ) -> None:
        self.stream = stream or sys.stderr
        self.min_severity = min_severity
        self.min_rank = severity_rank(min_severity)
        self.formatter = formatter

    def send(self, alerts: list[Alert]) -> None:
        for alert in alerts:
            if severity_rank(alert.severity) >= self.min_rank:
                text = self.formatter.render(alert).text + "\n" if self.formatter else format_alert(alert)
                print(text, file=self.stream)
        self.stream.flush()

    def close(self) -> None:
        self.stream.flush()


class JsonLinesSink:
    """Appends each alert as one JSON object per line (fsync'd per batch)."""

    name = "jsonl"
    min_severity = "info"

    def __init__(self, path: str) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file = open(path, "ab")  # noqa: SIM115 - closed in close()

    def send(self, alerts: list[Alert]) -> None:
        if not alerts:
            return
        self._file.write(b"".join(_encoder.encode(alert) + b"\n" for alert in alerts))
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()

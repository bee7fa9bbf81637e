"""Network receivers: Prometheus Alertmanager, PagerDuty Events API v2, Slack-compatible and generic
JSON webhooks, and a Kafka topic. Each ``send`` delivers a list of alerts or raises DeliveryError
(retryable or not, with the receiver's Retry-After when it gave one); the dispatcher owns retries,
ordering and the delivery records. Receivers never log secrets (routing keys, HMAC secrets)."""

from __future__ import annotations

import hashlib
import hmac
import logging
import threading
import time
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit

import msgspec
import requests

from alerting.alert import Alert
from alerting.render import AlertFormatter

log = logging.getLogger(__name__)
_json = msgspec.json.Encoder()
USER_AGENT = "probewatch-alerting/0.1"


class DeliveryError(Exception):
    """A receiver did not take the alerts. ``retryable``: try again later (outage, 429, 5xx);
    otherwise the request itself is wrong (4xx) and retrying cannot help. ``delivered``: how many of
    the alerts at the head of the list were taken before the failure."""

    def __init__(
        self, message: str, *, retryable: bool = True, retry_after: float | None = None, delivered: int = 0
    ) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.retry_after = retry_after
        self.delivered = delivered


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


def post_json(
    session: requests.Session, url: str, body: bytes, *, timeout: float, headers: dict[str, str] | None = None
) -> requests.Response:
    """POST JSON; 2xx returns the response, anything else raises a classified DeliveryError. Error
    messages carry the status and a short body, never the request (it may hold a routing key) nor the
    URL's path and query (a Slack or Discord webhook's path is its token)."""
    all_headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT, **(headers or {})}
    try:
        response = session.post(url, data=body, headers=all_headers, timeout=timeout)
    except requests.RequestException as exc:
        raise DeliveryError(f"{type(exc).__name__}: {_short(_without_path(str(exc), url))}") from None
    if 200 <= response.status_code < 300:
        return response
    detail = f"HTTP {response.status_code}: {_short(response.text)}"
    if response.status_code == 429:
        raise DeliveryError(detail, retry_after=_retry_after(response.headers.get("Retry-After")))
    if response.status_code >= 500 or response.status_code in (408, 409, 425):
        raise DeliveryError(detail, retry_after=_retry_after(response.headers.get("Retry-After")))
    raise DeliveryError(detail, retryable=False)


def _without_path(text: str, url: str) -> str:
    """``text`` (a requests error, which names the URL it failed on) with ``url``'s path and query
    hidden; its scheme, host and port stay, they say where delivery failed."""
    parts = urlsplit(url)
    port = f":{parts.port}" if parts.port else ""
    text = text.replace(url, f"{parts.scheme}://{parts.hostname}{port}/…")
    hidden = [parts.path + ("?" + parts.query if parts.query else ""), parts.path, parts.query]
    for secret in sorted({h for h in hidden if h not in ("", "/")}, key=len, reverse=True):
        text = text.replace(secret, "/…" if secret.startswith("/") else "…")
    return text


def _short(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "…"


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _camel(kind: str) -> str:
    return "".join(part.capitalize() for part in kind.split("_"))


# ----------------------------------------------------------------------------------- Alertmanager
class AlertmanagerReceiver:
    """POST /api/v2/alerts. Alertmanager forgets an alert whose endsAt has passed and expects active
    alerts to be re-sent (Prometheus re-sends every evaluation): a firing alert is sent with
    ``endsAt = now + ttl_s`` and every active one is re-sent every ``refresh_s`` (and at once after a
    failed send succeeds again, since Alertmanager may have restarted and lost them); a resolve is sent
    with ``endsAt = now``. Labels are stable per incident except ``severity``: when it rises the old
    labels are resolved in the same request, so the group (grouped without severity) stays one.

    A resolve is held until the incident has been firing at Alertmanager for ``min_firing_s``: when a
    backlog delivers the firing and the resolve of an incident together, Alertmanager would otherwise
    see only a resolved alert at group_wait and notify nobody."""

    max_batch = 64

    def __init__(
        self,
        name: str,
        url: str,
        formatter: AlertFormatter,
        *,
        min_severity: str = "info",
        timeout_s: float = 5.0,
        refresh_s: float = 60.0,
        ttl_s: float = 300.0,
        min_firing_s: float = 45.0,
        extra_labels: dict[str, str] | None = None,
        clock: Any = time.time,
    ) -> None:
        self.name = name
        self.url = url.rstrip("/") + "/api/v2/alerts" if not url.rstrip("/").endswith("/api/v2/alerts") else url
        self.formatter = formatter
        self.min_severity = min_severity
        self.timeout_s = timeout_s
        self.refresh_s = refresh_s
        self.ttl_s = ttl_s
        self.min_firing_s = min_firing_s
        self.extra_labels = dict(extra_labels or {})
        self.clock = clock
        self.session = requests.Session()
        # dedup_key -> (latest firing alert, labels sent, wall time it first fired here)
        self.active: dict[str, tuple[Alert, dict[str, str], float]] = {}
        self.held: dict[str, Alert] = {}  # resolves waiting for min_firing_s
        self._last_refresh = self.clock()
        self._failing = False
        self._lock = threading.Lock()

    def labels(self, alert: Alert) -> dict[str, str]:
        return {
            **self.extra_labels,
            "alertname": f"Probewatch{_camel(alert.kind)}",
            "severity": alert.severity,
            "model_id": alert.model_id,
            "client_id": alert.client_id,
            "kind": alert.kind,
            "service": "probewatch",
            **({"test": "true"} if alert.notification == "test" else {}),
        }

    def _postable(self, alert: Alert, labels: dict[str, str], ends_at: float) -> dict[str, Any]:
        rendered = self.formatter.render(alert)
        now = self.clock()
        starts = min(alert.first_seen, now)
        annotations = {
            "summary": rendered.title,
            "description": rendered.text,
            "action": rendered.action,
            "incident": alert.dedup_key,
            "notification": alert.notification,
            "score": f"{alert.score:.3f}",
            "queries": str(alert.n_queries),
            "source_ips": ", ".join(alert.source_ips[:8]),
        }
        if rendered.dashboard_url:
            annotations["dashboard"] = rendered.dashboard_url
        if rendered.runbook_url:
            annotations["runbook_url"] = rendered.runbook_url
        body: dict[str, Any] = {
            "labels": labels,
            "annotations": annotations,
            "startsAt": _iso(starts),
            "endsAt": _iso(max(ends_at, starts + 0.001)),
        }
        if rendered.dashboard_url:
            body["generatorURL"] = rendered.dashboard_url
        return body

    def _post(self, postable: list[dict[str, Any]]) -> None:
        if not postable:
            return
        try:
            post_json(self.session, self.url, _json.encode(postable), timeout=self.timeout_s)
        except DeliveryError:
            self._failing = True
            raise
        if self._failing:  # back after a failure: Alertmanager may have restarted and lost its alerts
            self._failing = False
            self._last_refresh = float("-inf")

    def send(self, alerts: list[Alert]) -> None:
        with self._lock:
            now = self.clock()
            postable: list[dict[str, Any]] = []
            active = dict(self.active)
            held = dict(self.held)
            for alert in alerts:
                key = alert.dedup_key
                previous = active.get(key)
                if alert.status == "firing":
                    held.pop(key, None)  # firing again before the held resolve went out: still one alert
                    labels = self.labels(alert)
                    if previous is not None and previous[1] != labels:
                        postable.append(self._postable(previous[0], previous[1], now))
                    since = previous[2] if previous is not None else now
                    active[key] = (alert, labels, since)
                    postable.append(self._postable(alert, labels, now + self.ttl_s))
                elif previous is not None and now - previous[2] < self.min_firing_s:
                    held[key] = alert
                else:
                    active.pop(key, None)
                    labels = previous[1] if previous is not None else self.labels(alert)
                    postable.append(self._postable(alert, labels, now))
            self._post(postable)  # raises: nothing above is kept, the dispatcher retries the batch
            self.active, self.held = active, held

    def tick(self) -> None:
        """Send held resolves that are due and re-send the active alerts every refresh_s."""
        with self._lock:
            now = self.clock()
            due = [a for k, a in self.held.items() if now - self.active.get(k, (a, {}, 0.0))[2] >= self.min_firing_s]
            postable = []
            for alert in due:
                _, labels, _ = self.active.get(alert.dedup_key, (alert, self.labels(alert), 0.0))
                postable.append(self._postable(alert, labels, now))
            refresh = now - self._last_refresh >= self.refresh_s
            if refresh:
                done = {a.dedup_key for a in due}
                postable.extend(
                    self._postable(alert, labels, now + self.ttl_s)
                    for key, (alert, labels, _) in self.active.items()
                    if key not in done
                )
            if not postable:
                return
            self._post(postable)
            for alert in due:
                self.held.pop(alert.dedup_key, None)
                self.active.pop(alert.dedup_key, None)
            if refresh:
                self._last_refresh = now

    def seed(self, alerts: list[Alert]) -> None:
        """Adopt open incidents (restored by the policy after a restart) so they are refreshed."""
        with self._lock:
            now = self.clock()
            for alert in alerts:
                if alert.status == "firing" and alert.dedup_key not in self.active:
                    self.active[alert.dedup_key] = (alert, self.labels(alert), now - self.min_firing_s)
            self._last_refresh = float("-inf")

    def forget(self, dedup_keys: list[str]) -> None:
        with self._lock:
            for key in dedup_keys:
                self.active.pop(key, None)
                self.held.pop(key, None)

    def pending(self) -> int:
        return len(self.held)

    def close(self) -> None:
        self.session.close()


# ------------------------------------------------------------------------------------- PagerDuty
PD_SEVERITY = {"info": "info", "warning": "warning", "high": "error", "critical": "critical"}


class PagerDutyReceiver:
    """PagerDuty Events API v2: ``trigger`` (a new incident, or an update PagerDuty folds into the open
    one with the same ``dedup_key`` — no new page) and ``resolve``. Paced client-side to
    ``rate_per_minute`` (PagerDuty allows about 120 events/min per integration key); 429 and 5xx are
    retried with the dispatcher's backoff (Retry-After honoured)."""

    max_batch = 1

    def __init__(
        self,
        name: str,
        routing_key: str,
        formatter: AlertFormatter,
        *,
        url: str = "https://events.pagerduty.com/v2/enqueue",
        source: str = "probewatch",
        min_severity: str = "info",
        timeout_s: float = 10.0,
        rate_per_minute: float = 100.0,
        sleep: Any = time.sleep,
    ) -> None:
        if not routing_key:
            raise ValueError(f"receiver {name}: PagerDuty needs a routing_key (or routing_key_file)")
        self.name = name
        self._routing_key = routing_key
        self.formatter = formatter
        self.url = url
        self.source = source
        self.min_severity = min_severity
        self.timeout_s = timeout_s
        self.interval = 60.0 / rate_per_minute if rate_per_minute > 0 else 0.0
        self.sleep = sleep
        self.session = requests.Session()
        self._next_slot = 0.0

    def __repr__(self) -> str:  # never show the routing key
        return f"PagerDutyReceiver(name={self.name!r}, url={self.url!r})"

    def event(self, alert: Alert) -> dict[str, Any]:
        dedup_key = (
            alert.dedup_key if len(alert.dedup_key) <= 255 else hashlib.sha256(alert.dedup_key.encode()).hexdigest()
        )
        if alert.status == "resolved":
            return {"routing_key": self._routing_key, "event_action": "resolve", "dedup_key": dedup_key}
        rendered = self.formatter.render(alert)
        event: dict[str, Any] = {
            "routing_key": self._routing_key,
            "event_action": "trigger",
            "dedup_key": dedup_key,
            "payload": {
                "summary": rendered.title[:1024],
                "source": self.source,
                "severity": PD_SEVERITY.get(alert.severity, "warning"),
                "timestamp": _iso(alert.event_time),
                "component": alert.model_id,
                "group": alert.client_id,
                "class": alert.kind,
                "custom_details": {
                    "description": rendered.text,
                    "score": round(alert.score, 4),
                    "queries": alert.n_queries,
                    "since": _iso(alert.first_seen),
                    "source_ips": alert.source_ips,
                    "reasons": alert.reasons,
                    "signals": alert.signals,
                    "suggested_action": rendered.action,
                    "notification": alert.notification,
                    "alert_id": alert.alert_id,
                },
            },
            "client": "probewatch",
        }
        if rendered.dashboard_url:
            event["client_url"] = rendered.dashboard_url
            event["links"] = [{"href": rendered.dashboard_url, "text": "Grafana: client dashboard"}]
        return event

    def send(self, alerts: list[Alert]) -> None:
        for i, alert in enumerate(alerts):
            wait = self._next_slot - time.monotonic()
            if wait > 0:
                self.sleep(wait)
            self._next_slot = max(self._next_slot, time.monotonic()) + self.interval
            try:
                post_json(self.session, self.url, _json.encode(self.event(alert)), timeout=self.timeout_s)
            except DeliveryError as exc:
                exc.delivered = i
                raise

    def close(self) -> None:
        self.session.close()


# -------------------------------------------------------------------------------------- webhooks
class WebhookReceiver:
    """POSTs each alert as JSON. ``format="json"``: ``{"version": 1, "alert": {...}, "title", "text",
    "dashboard_url", "action"}``; ``format="slack"``: a Slack/Mattermost-compatible incoming-webhook
    body (``text`` plus blocks). With an HMAC secret, ``X-Probewatch-Signature: sha256=<hex>`` is the
    HMAC-SHA256 of ``<X-Probewatch-Timestamp>.<body>``; ``Idempotency-Key`` is the alert id so a
    consumer can drop a redelivery."""

    max_batch = 1

    def __init__(
        self,
        name: str,
        url: str,
        formatter: AlertFormatter,
        *,
        format: str = "json",
        hmac_secret: str = "",
        headers: dict[str, str] | None = None,
        min_severity: str = "info",
        timeout_s: float = 5.0,
    ) -> None:
        if format not in ("json", "slack"):
            raise ValueError(f"receiver {name}: webhook format must be 'json' or 'slack', got {format!r}")
        self.name = name
        self.url = url
        self.formatter = formatter
        self.format = format
        self._secret = hmac_secret.encode()
        self.headers = dict(headers or {})
        self.min_severity = min_severity
        self.timeout_s = timeout_s
        self.session = requests.Session()

    def __repr__(self) -> str:
        return f"WebhookReceiver(name={self.name!r}, url={self.url!r}, format={self.format!r})"

    def body(self, alert: Alert) -> bytes:
        rendered = self.formatter.render(alert)
        if self.format == "slack":
            link = f"\n<{rendered.dashboard_url}|Open the client dashboard>" if rendered.dashboard_url else ""
            detail = "\n".join(rendered.text.splitlines()[1:])
            return _json.encode(
                {
                    "text": f"{rendered.title}\n{detail}{link}",
                    "blocks": [
                        {"type": "header", "text": {"type": "plain_text", "text": rendered.title[:150]}},
                        {
                            "type": "section",
                            "text": {"type": "mrkdwn", "text": f"```{detail[:2900]}```{link}"},
                        },
                    ],
                }
            )
        return _json.encode(
            {
                "version": 1,
                "alert": alert,
                "title": rendered.title,
                "text": rendered.text,
                "dashboard_url": rendered.dashboard_url,
                "action": rendered.action,
            }
        )

    def signature(self, timestamp: str, body: bytes) -> str:
        return "sha256=" + hmac.new(self._secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()

    def send(self, alerts: list[Alert]) -> None:
        for i, alert in enumerate(alerts):
            body = self.body(alert)
            headers = {
                **self.headers,
                "Idempotency-Key": alert.alert_id,
                "X-Probewatch-Alert-Id": alert.alert_id,
            }
            if self._secret:
                timestamp = str(int(time.time()))
                headers["X-Probewatch-Timestamp"] = timestamp
                headers["X-Probewatch-Signature"] = self.signature(timestamp, body)
            try:
                post_json(self.session, self.url, body, timeout=self.timeout_s, headers=headers)
            except DeliveryError as exc:
                exc.delivered = i
                raise

    def close(self) -> None:
        self.session.close()


# ----------------------------------------------------------------------------------------- Kafka
class KafkaReceiver:
    """Publishes each alert as JSON to a Kafka topic (key = the incident's dedup key, so one incident
    stays in one partition, in order) for SIEMs. ``producer`` is a kafka-python KafkaProducer (or
    anything with ``send``/``flush``/``close``); acks=all is the caller's choice."""

    max_batch = 256

    def __init__(
        self,
        name: str,
        producer: Any,
        topic: str,
        formatter: AlertFormatter,
        *,
        min_severity: str = "info",
        timeout_s: float = 10.0,
    ) -> None:
        """``producer``: a producer, or a zero-argument callable that makes one (called at the first
        send, so a Kafka that is down at start-up is an outage to retry, not a start-up failure)."""
        self.name = name
        self._producer = None if callable(producer) and not hasattr(producer, "send") else producer
        self._factory = producer if self._producer is None else None
        self.topic = topic
        self.formatter = formatter
        self.min_severity = min_severity
        self.timeout_s = timeout_s

    @property
    def producer(self) -> Any:
        if self._producer is None:
            assert self._factory is not None
            try:
                self._producer = self._factory()
            except Exception as exc:
                raise DeliveryError(f"kafka: cannot create the producer: {type(exc).__name__}: {exc}") from None
        return self._producer

    def send(self, alerts: list[Alert]) -> None:
        futures = []
        try:
            for alert in alerts:
                rendered = self.formatter.render(alert)
                value = _json.encode(
                    {
                        "alert": alert,
                        "title": rendered.title,
                        "text": rendered.text,
                        "dashboard_url": rendered.dashboard_url,
                    }
                )
                headers = [("alert_id", alert.alert_id.encode())]
                futures.append(
                    self.producer.send(self.topic, key=alert.dedup_key.encode(), value=value, headers=headers)
                )
            self.producer.flush(timeout=self.timeout_s)
            for i, future in enumerate(futures):
                try:
                    future.get(timeout=self.timeout_s)
                except Exception as exc:
                    raise DeliveryError(f"kafka: {type(exc).__name__}: {_short(str(exc))}", delivered=i) from None
        except DeliveryError:
            raise
        except Exception as exc:
            raise DeliveryError(f"kafka: {type(exc).__name__}: {_short(str(exc))}") from None

    def close(self) -> None:
        if self._producer is None:
            return
        try:
            self._producer.close(timeout=self.timeout_s)
        except Exception as exc:  # closing must not fail shutdown
            log.warning("kafka alert producer close: %s", exc)

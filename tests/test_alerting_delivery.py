"""Delivery: background lanes, retries with backoff, outages, restart recovery from the outbox, and the
receivers' wire contracts (PagerDuty Events API v2, JSON/Slack webhooks with HMAC, Kafka), against
local HTTP servers. The outbox here is in memory (the same two methods as the ClickHouse store)."""

from __future__ import annotations

import hashlib
import hmac
import logging
import threading
import time
from typing import Any

import pytest

from alerting.alert import Alert
from alerting.dispatch import FINAL_STATES, DeliveryRecord, DeliverySettings, Dispatcher
from alerting.receivers import KafkaReceiver, PagerDutyReceiver, WebhookReceiver
from alerting.render import AlertFormatter
from alerting.testing import RecordingServer

T0 = 1_800_000_000.0
FAST = DeliverySettings(backoff_initial_s=0.05, backoff_max_s=0.4, sweep_s=0.2, tick_s=0.1, shutdown_timeout_s=2.0)
FORMATTER = AlertFormatter("http://grafana.local:3000", runbook_url="https://runbooks.local/probewatch", threshold=0.8)


class MemoryOutbox:
    """The outbox contract of storage.Store, in memory: every alert is stored before delivery."""

    def __init__(self) -> None:
        self.alerts: dict[str, Alert] = {}
        self.rows: list[DeliveryRecord] = []
        self.lock = threading.Lock()

    def write(self, alerts: list[Alert]) -> None:
        with self.lock:
            for alert in alerts:
                self.alerts.setdefault(alert.alert_id, alert)

    def record_deliveries(self, rows: list[DeliveryRecord]) -> None:
        with self.lock:
            self.rows.extend(rows)

    def undelivered(self, receivers: list[str], limit: int) -> list[tuple[Alert, str]]:
        with self.lock:
            done = {(r.alert_id, r.receiver) for r in self.rows if r.status in FINAL_STATES}
            out = [(a, r) for a in self.alerts.values() for r in receivers if (a.alert_id, r) not in done]
        return sorted(out, key=lambda x: (x[0].event_time, x[0].seq))[:limit]

    def states(self, receiver: str) -> dict[str, str]:
        final: dict[str, str] = {}
        for row in self.rows:
            if row.receiver == receiver and (row.status in FINAL_STATES or row.alert_id not in final):
                final[row.alert_id] = row.status
        return final


def alert(i: int, status: str = "firing", notification: str = "new", seq: int = 0, severity: str = "high") -> Alert:
    key = f"fraud-v3|acct-{i:03d}|extraction"
    return Alert(
        alert_id=hashlib.sha256(f"{key}|{notification}|{seq}".encode()).hexdigest()[:24],
        dedup_key=key,
        status=status,  # type: ignore[arg-type]
        kind="extraction",
        model_id="fraud-v3",
        client_id=f"acct-{i:03d}",
        session_id="2026-11-01T00:15:46.935Z",
        severity=severity,  # type: ignore[arg-type]
        score=0.94,
        n_queries=1234,
        event_time=T0 + i + seq,
        first_seen=T0 - 600,
        reasons=["extraction: 312 distinct cells in 400 queries; 97th percentile of clients is 40"],
        signals={"distinct_cells": 312.0},
        source_ips=["203.0.113.7", "203.0.113.9"],
        notification=notification,
        seq=seq,
    )


@pytest.fixture
def server() -> Any:
    srv = RecordingServer().start()
    yield srv
    srv.stop()


def pd(srv: RecordingServer, **kw: Any) -> PagerDutyReceiver:
    kw.setdefault("rate_per_minute", 0)
    return PagerDutyReceiver("pagerduty", "R0UT1NGKEY", FORMATTER, url=f"{srv.url}/v2/enqueue", **kw)


def test_pagerduty_contract_trigger_update_resolve(server: RecordingServer) -> None:
    outbox = MemoryOutbox()
    alerts = [alert(1), alert(1, notification="update", seq=1), alert(1, "resolved", "resolve", seq=2)]
    outbox.write(alerts)
    dispatcher = Dispatcher([pd(server)], outbox, FAST).start()
    dispatcher.submit(alerts)
    assert dispatcher.flush(10)
    dispatcher.close()
    events = [r.json() for r in server.requests]
    assert [e["event_action"] for e in events] == ["trigger", "trigger", "resolve"]
    assert {e["dedup_key"] for e in events} == {"fraud-v3|acct-001|extraction"}  # one PD incident
    trigger = events[0]
    assert trigger["routing_key"] == "R0UT1NGKEY"
    payload = trigger["payload"]
    assert payload["severity"] == "error" and payload["source"] == "probewatch"
    assert payload["summary"] == "[HIGH] extraction suspected — client acct-001 on model fraud-v3"
    assert payload["custom_details"]["queries"] == 1234
    assert "var-client=acct-001" in trigger["links"][0]["href"]
    assert set(outbox.states("pagerduty").values()) == {"delivered"}


def test_pagerduty_429_and_5xx_are_retried_with_backoff(server: RecordingServer) -> None:
    server.script = [429, 503, 500]
    server.retry_after = "1"
    outbox = MemoryOutbox()
    alerts = [alert(i) for i in range(3)]
    outbox.write(alerts)
    dispatcher = Dispatcher([pd(server)], outbox, FAST).start()
    dispatcher.submit(alerts)
    assert dispatcher.flush(15)
    dispatcher.close()
    assert [r.json()["dedup_key"] for r in server.requests] == [a.dedup_key for a in alerts]  # in order, once
    assert server.attempts[1].at - server.attempts[0].at >= 0.95  # Retry-After: 1 honoured
    retrying = [r for r in outbox.rows if r.status == "retrying"]
    assert [r.attempts for r in retrying] == [1, 2, 3] and "HTTP 429" in retrying[0].error
    assert dispatcher.stats()["pagerduty"].retries == 3


def test_pagerduty_is_paced_under_its_rate_limit(server: RecordingServer) -> None:
    receiver = pd(server, rate_per_minute=600)  # one event per 0.1 s
    started = time.monotonic()
    receiver.send([alert(i) for i in range(6)])
    assert time.monotonic() - started >= 0.45
    assert len(server.requests) == 6


def test_a_4xx_is_recorded_failed_and_does_not_block_the_lane(server: RecordingServer) -> None:
    server.script = [400]
    outbox = MemoryOutbox()
    alerts = [alert(1), alert(2)]
    outbox.write(alerts)
    dispatcher = Dispatcher([pd(server)], outbox, FAST).start()
    dispatcher.submit(alerts)
    assert dispatcher.flush(10)
    dispatcher.close()
    assert outbox.states("pagerduty") == {alerts[0].alert_id: "failed", alerts[1].alert_id: "delivered"}


def test_outage_then_recovery_delivers_everything_once_in_order() -> None:
    srv = RecordingServer().start()
    port = srv.port
    srv.stop()  # the receiver is down
    outbox = MemoryOutbox()
    hook = WebhookReceiver("siem-webhook", f"http://127.0.0.1:{port}/hook", FORMATTER, hmac_secret="s3cret")
    dispatcher = Dispatcher([hook], outbox, FAST).start()
    alerts = [alert(i) for i in range(5)] + [alert(i, "resolved", "resolve", seq=1) for i in range(5)]
    outbox.write(alerts)
    started = time.monotonic()
    dispatcher.submit(alerts)
    assert time.monotonic() - started < 0.1  # the pipeline never waits for a receiver
    time.sleep(1.0)
    assert dispatcher.stats()["siem-webhook"].retries >= 2
    back = RecordingServer(port=port).start()
    try:
        assert back.wait_for(lambda reqs: len(reqs) >= 10, 10)
        assert dispatcher.flush(5)
        dispatcher.close()
        ids = [r.headers["idempotency-key"] for r in back.requests]
        assert ids == [a.alert_id for a in alerts]  # all, once, in order
        assert set(outbox.states("siem-webhook").values()) == {"delivered"}
    finally:
        back.stop()


def test_restart_delivers_what_a_crash_left_in_the_outbox() -> None:
    srv = RecordingServer().start()
    port = srv.port
    srv.stop()
    outbox = MemoryOutbox()
    alerts = [alert(i) for i in range(4)]
    outbox.write(alerts)
    first = Dispatcher([pd(srv)], outbox, FAST).start()
    first.submit(alerts)
    time.sleep(0.3)
    first.close(timeout=0.2)  # "crash": nothing was delivered
    assert not any(r.status == "delivered" for r in outbox.rows)
    back = RecordingServer(port=port).start()
    try:
        second = Dispatcher([pd(back)], outbox, FAST).start()  # restart: the outbox sweep finds them
        assert back.wait_for(lambda reqs: len(reqs) >= 4, 10)
        assert second.flush(5)
        time.sleep(0.5)  # more sweeps must not deliver anything twice
        second.close()
        assert sorted(r.json()["dedup_key"] for r in back.requests) == sorted(a.dedup_key for a in alerts)
        assert second.stats()["pagerduty"].recovered == 4
    finally:
        back.stop()


def test_webhook_json_and_hmac_signature(server: RecordingServer) -> None:
    hook = WebhookReceiver("hook", f"{server.url}/hook", FORMATTER, hmac_secret="s3cret", headers={"X-Team": "sec"})
    hook.send([alert(7)])
    request = server.requests[0]
    expected = hmac.new(b"s3cret", request.headers["x-probewatch-timestamp"].encode() + b"." + request.body, "sha256")
    assert request.headers["x-probewatch-signature"] == "sha256=" + expected.hexdigest()
    assert request.headers["x-team"] == "sec"
    body = request.json()
    assert body["alert"]["client_id"] == "acct-007" and body["alert"]["dedup_key"] == "fraud-v3|acct-007|extraction"
    assert "var-model=fraud-v3&var-client=acct-007" in body["dashboard_url"]
    assert "s3cret" not in repr(hook) and "s3cret" not in request.body.decode()


def test_slack_webhook_body(server: RecordingServer) -> None:
    WebhookReceiver("slack", f"{server.url}/slack", FORMATTER, format="slack").send([alert(3)])
    body = server.requests[0].json()
    assert body["text"].startswith("[HIGH] extraction suspected — client acct-003 on model fraud-v3")
    assert "Action:" in body["text"] and body["blocks"][0]["type"] == "header"


def test_min_severity_per_receiver(server: RecordingServer) -> None:
    outbox = MemoryOutbox()
    alerts = [alert(1, severity="warning"), alert(2, severity="critical")]
    outbox.write(alerts)
    dispatcher = Dispatcher([pd(server, min_severity="high")], outbox, FAST).start()
    dispatcher.submit(alerts)
    assert dispatcher.flush(10)
    dispatcher.close()
    assert [r.json()["payload"]["severity"] for r in server.requests] == ["critical"]
    assert outbox.states("pagerduty")[alerts[0].alert_id] == "skipped"


def test_stale_notifications_are_superseded_not_sent(server: RecordingServer) -> None:
    hook = WebhookReceiver("hook", f"{server.url}/hook", FORMATTER)
    dispatcher = Dispatcher([hook], None, FAST).start()
    dispatcher.submit([alert(1, "resolved", "resolve", seq=2)])
    assert dispatcher.flush(5)
    dispatcher.submit([alert(1, notification="update", seq=1)])  # found late (e.g. by a sweep)
    assert dispatcher.flush(5)
    dispatcher.close()
    assert [r.json()["alert"]["notification"] for r in server.requests] == ["resolve"]
    assert dispatcher.stats()["hook"].superseded == 1


class FakeFuture:
    def __init__(self, error: Exception | None = None) -> None:
        self.error = error

    def get(self, timeout: float) -> None:
        if self.error:
            raise self.error


class FakeProducer:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, bytes]] = []
        self.fail_next = 0

    def send(self, topic: str, key: bytes, value: bytes, headers: Any = None) -> FakeFuture:
        if self.fail_next:
            self.fail_next -= 1
            return FakeFuture(TimeoutError("KafkaTimeoutError: batch expired"))
        self.sent.append((topic, key, value))
        return FakeFuture()

    def flush(self, timeout: float) -> None:
        pass

    def close(self, timeout: float) -> None:
        pass


def test_kafka_receiver_retries_and_keys_by_incident() -> None:
    producer = FakeProducer()
    producer.fail_next = 1
    outbox = MemoryOutbox()
    alerts = [alert(1), alert(2)]
    outbox.write(alerts)
    dispatcher = Dispatcher([KafkaReceiver("siem", producer, "probewatch.alerts", FORMATTER)], outbox, FAST).start()
    dispatcher.submit(alerts)
    assert dispatcher.flush(10)
    dispatcher.close()
    keys = [key for _, key, _ in producer.sent]
    assert keys[-2:] == [b"fraud-v3|acct-001|extraction", b"fraud-v3|acct-002|extraction"]
    assert set(outbox.states("siem").values()) == {"delivered"}


def test_a_hanging_receiver_never_blocks_submit_and_shutdown_is_bounded() -> None:
    class Hanging:
        name = "hanging"

        def send(self, alerts: list[Alert]) -> None:
            time.sleep(3)

        def close(self) -> None:
            pass

    dispatcher = Dispatcher([Hanging()], None, FAST).start()
    started = time.monotonic()
    for i in range(50):
        dispatcher.submit([alert(i)])
    assert time.monotonic() - started < 0.2
    dispatcher.close(timeout=0.5)
    assert time.monotonic() - started < 5.0


def test_alert_text_for_the_on_call_engineer() -> None:
    text = FORMATTER.render(alert(8)).text
    assert text.splitlines()[0] == "[HIGH] extraction suspected — client acct-008 on model fraud-v3"
    for needle in (
        "client acct-008, model fraud-v3",
        "Queries:   1,234 from this client to this model",
        "203.0.113.7, 203.0.113.9",
        "97th percentile of clients is 40",
        "Since:     2027-01-15",
        "10 min",
        "http://grafana.local:3000/d/probewatch-client?var-model=fraud-v3&var-client=acct-008",
        "Action:    rate-limit client acct-008",
        "revoke the API key",
        "Runbook:   https://runbooks.local/probewatch",
    ):
        assert needle in text, needle


@pytest.fixture
def keep_logging() -> Any:
    """The CLI configures the root logger onto the (captured) stderr; put it back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_cli_alerts_test_reports_each_receiver(
    server: RecordingServer, tmp_path: Any, capsys: pytest.CaptureFixture[str], keep_logging: None
) -> None:
    from probewatch.cli import main

    secret = tmp_path / "routing_key"
    secret.write_text("PDKEY-FROM-FILE\n")
    config = tmp_path / "pw.toml"
    config.write_text(
        f"""
[alerting]
console = false
[alerting.receivers.siem]
type = "webhook"
url = "{server.url}/hook"
hmac_secret = "s3cret"
[alerting.receivers.oncall]
type = "pagerduty"
url = "{server.url}/v2/enqueue"
routing_key_file = "{secret}"
min_severity = "high"
"""
    )
    assert main(["alerts", "test", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "ok    oncall" in out and "ok    siem" in out and "2 of 2 receivers" in out
    by_path = {r.path: r.json() for r in server.requests}
    assert by_path["/v2/enqueue"]["routing_key"] == "PDKEY-FROM-FILE"
    assert by_path["/v2/enqueue"]["payload"]["severity"] == "error"  # raised to the receiver's min (high)
    assert by_path["/hook"]["alert"]["notification"] == "test"
    server.script = [400]
    assert main(["alerts", "test", "--config", str(config), "--receiver", "oncall"]) == 1
    out = capsys.readouterr().out
    assert "FAIL  oncall" in out and "HTTP 400" in out and "PDKEY" not in out
    assert main(["config", "--config", str(config)]) == 0
    shown = capsys.readouterr().out
    assert "PDKEY" not in shown and "s3cret" not in shown and '"routing_key": "***"' in shown

"""The local services of deploy/local/ are the real thing: Kafka, ClickHouse and Alertmanager
answer their own protocols, with the configuration the rest of the suite relies on."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import requests
from clickhouse_driver import Client
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from pipeline_helpers import WebhookReceiver

pytestmark = pytest.mark.integration


def test_kafka_produce_and_consume(kafka_bootstrap: str, kafka_topic: Callable[..., str]) -> None:
    topic = kafka_topic(partitions=1)
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    try:
        metadata = producer.send(topic, key=b"client-1", value=b'{"hello": "kafka"}').get(timeout=15)
        assert metadata.topic == topic and metadata.offset == 0
    finally:
        producer.close()

    consumer = KafkaConsumer(bootstrap_servers=kafka_bootstrap, enable_auto_commit=False)
    try:
        partition = TopicPartition(topic, 0)
        consumer.assign([partition])
        consumer.seek_to_beginning(partition)
        received: list[Any] = []
        deadline = time.monotonic() + 20
        while not received and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=500).values():
                received.extend(records)
        assert [(r.key, r.value) for r in received] == [(b"client-1", b'{"hello": "kafka"}')]
    finally:
        consumer.close()


def test_kafka_does_not_auto_create_topics(kafka_bootstrap: str, kafka_topic: Callable[..., str]) -> None:
    """Topics exist only when created: the pipeline must create (or be given) its topics."""
    topic = kafka_topic(partitions=3)
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    try:
        (described,) = admin.describe_topics([topic])
        assert len(described["partitions"]) == 3
        consumer = KafkaConsumer(bootstrap_servers=kafka_bootstrap)
        try:
            missing = f"{topic}_never_created"
            assert consumer.partitions_for_topic(missing) in (None, set())
            assert missing not in admin.list_topics()
        finally:
            consumer.close()
    finally:
        admin.close()


def test_clickhouse_create_insert_select(clickhouse_server: tuple[str, int], unique_name: Callable[[str], str]) -> None:
    host, port = clickhouse_server
    database = unique_name("selftest")
    client = Client(host, port=port)
    try:
        client.execute(f"CREATE DATABASE {database}")
        client.execute(
            f"CREATE TABLE {database}.scores (ts DateTime, client_id String, score Float64)"
            " ENGINE = MergeTree ORDER BY (client_id, ts)"
        )
        t0 = datetime(2026, 11, 1, 12, 0, 0)
        rows = [(t0 + timedelta(seconds=i), f"client-{i % 3}", i / 10) for i in range(30)]
        client.execute(f"INSERT INTO {database}.scores (ts, client_id, score) VALUES", rows)
        result = client.execute(
            f"SELECT client_id, count(), round(sum(score), 3), min(ts) FROM {database}.scores"
            " GROUP BY client_id ORDER BY client_id"
        )
        assert result == [
            ("client-0", 10, 13.5, t0),
            ("client-1", 10, 14.5, t0 + timedelta(seconds=1)),
            ("client-2", 10, 15.5, t0 + timedelta(seconds=2)),
        ]
        ((timezone,),) = client.execute("SELECT timezone()")
        assert timezone in ("UTC", "Etc/UTC")
    finally:
        client.execute(f"DROP DATABASE IF EXISTS {database}")
        client.disconnect()

    # The HTTP interface answers too (Grafana's ClickHouse data source and curl use it).
    http = requests.get(f"http://{host}:18123/", params={"query": "SELECT 1"}, timeout=5)
    assert http.status_code == 200 and http.text.strip() == "1"


def _alert(client_id: str, **labels: str) -> dict[str, Any]:
    now = datetime.now(UTC)
    return {
        "labels": {
            "alertname": "ProbewatchSelfTest",
            "model_id": "selftest-model",
            "client_id": client_id,
            "kind": "selftest",
            **labels,
        },
        "annotations": {"summary": "deploy/local self test"},
        "startsAt": now.isoformat(),
        "endsAt": (now + timedelta(minutes=10)).isoformat(),
    }


def _alerts_for(alertmanager_url: str, client_id: str) -> list[dict[str, Any]]:
    response = requests.get(
        f"{alertmanager_url}/api/v2/alerts", params={"filter": f'client_id="{client_id}"'}, timeout=5
    )
    response.raise_for_status()
    alerts: list[dict[str, Any]] = response.json()
    return alerts


def test_alertmanager_accepts_and_lists_alerts(alertmanager_url: str, unique_name: Callable[[str], str]) -> None:
    client_id = unique_name("client")
    response = requests.post(f"{alertmanager_url}/api/v2/alerts", json=[_alert(client_id)], timeout=5)
    assert response.status_code == 200, response.text

    deadline = time.monotonic() + 10
    alerts = _alerts_for(alertmanager_url, client_id)
    while not alerts and time.monotonic() < deadline:
        time.sleep(0.2)
        alerts = _alerts_for(alertmanager_url, client_id)
    assert len(alerts) == 1
    assert alerts[0]["labels"]["alertname"] == "ProbewatchSelfTest"
    assert alerts[0]["labels"]["kind"] == "selftest"
    assert alerts[0]["status"]["state"] == "active"
    assert [r["name"] for r in alerts[0]["receivers"]] == ["probewatch-webhook"]


@pytest.fixture
def webhook(webhook_port: int) -> Iterator[WebhookReceiver]:
    try:
        receiver = WebhookReceiver(webhook_port)
    except OSError as error:
        pytest.fail(f"cannot listen on 127.0.0.1:{webhook_port} for Alertmanager's webhook: {error}")
    yield receiver
    receiver.close()


def test_alertmanager_routes_to_the_webhook_and_sends_resolved(
    alertmanager_url: str, webhook: WebhookReceiver, unique_name: Callable[[str], str]
) -> None:
    client_id = unique_name("client")

    def ours(status: str) -> Callable[[dict[str, Any]], bool]:
        return lambda p: p.get("status") == status and p.get("groupLabels", {}).get("client_id") == client_id

    alert = _alert(client_id)
    requests.post(f"{alertmanager_url}/api/v2/alerts", json=[alert], timeout=5).raise_for_status()
    firing = webhook.wait_for(ours("firing"), timeout=20)  # group_wait is 1s
    assert firing["path"] == "/alertmanager"
    assert firing["receiver"] == "probewatch-webhook"
    assert set(firing["groupLabels"]) == {"alertname", "model_id", "client_id", "kind"}
    assert firing["alerts"][0]["labels"]["client_id"] == client_id

    # Resolve it (endsAt now): send_resolved is on, group_interval is 2s.
    resolve = {**alert, "endsAt": datetime.now(UTC).isoformat()}
    requests.post(f"{alertmanager_url}/api/v2/alerts", json=[resolve], timeout=5).raise_for_status()
    resolved = webhook.wait_for(ours("resolved"), timeout=20)
    assert resolved["alerts"][0]["status"] == "resolved"


def test_alertmanager_restart_keeps_silences(
    alertmanager_url: str, services_ctl: Callable[..., Any], unique_name: Callable[[str], str]
) -> None:
    client_id = unique_name("client")
    now = datetime.now(UTC)
    silence = {
        "matchers": [{"name": "client_id", "value": client_id, "isRegex": False, "isEqual": True}],
        "startsAt": now.isoformat(),
        "endsAt": (now + timedelta(hours=1)).isoformat(),
        "createdBy": "tests/test_local_services.py",
        "comment": "survives a restart",
    }
    response = requests.post(f"{alertmanager_url}/api/v2/silences", json=silence, timeout=5)
    assert response.status_code == 200, response.text
    silence_id = response.json()["silenceID"]

    started = time.monotonic()
    services_ctl("alertmanager", "restart")
    assert time.monotonic() - started < 30
    assert requests.get(f"{alertmanager_url}/-/ready", timeout=5).status_code == 200

    try:
        after = requests.get(f"{alertmanager_url}/api/v2/silence/{silence_id}", timeout=5)
        assert after.status_code == 200, "the silence was lost: stop must keep the storage path"
        assert after.json()["status"]["state"] == "active"
    finally:
        requests.delete(f"{alertmanager_url}/api/v2/silence/{silence_id}", timeout=5)

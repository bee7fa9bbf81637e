"""The Kafka alerts topic (for SIEMs) against the REAL local Kafka: every alert once, in order per
incident, keyed by its dedup key, as JSON with the rendered text. FAILS if Kafka is down."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import pytest
from kafka import KafkaConsumer, KafkaProducer

from alerting.alert import Alert
from alerting.dispatch import DeliverySettings, Dispatcher
from alerting.receivers import KafkaReceiver
from alerting.render import AlertFormatter

pytestmark = pytest.mark.integration


def make_alert(client: str, status: str, seq: int) -> Alert:
    now = time.time()
    return Alert(
        alert_id=f"{client}-{seq}",
        dedup_key=f"fraud-v3|{client}|extraction",
        status=status,  # type: ignore[arg-type]
        kind="extraction",
        model_id="fraud-v3",
        client_id=client,
        session_id="s1",
        severity="high",
        score=0.93,
        n_queries=400,
        event_time=now + seq,
        first_seen=now - 600,
        reasons=["extraction: 312 distinct cells in 400 queries; 97th percentile of clients is 40"],
        notification="new" if seq == 0 else "resolve",
        seq=seq,
    )


def test_alerts_topic_on_real_kafka(kafka_bootstrap: str, kafka_topic: Callable[..., str]) -> None:
    topic = kafka_topic(partitions=2)

    def producer() -> KafkaProducer:
        return KafkaProducer(bootstrap_servers=kafka_bootstrap.split(","), acks="all", linger_ms=5)

    receiver = KafkaReceiver("siem-kafka", producer, topic, AlertFormatter("http://grafana.local:3000"))
    dispatcher = Dispatcher([receiver], None, DeliverySettings(backoff_initial_s=0.2, tick_s=0.2)).start()
    alerts = [make_alert(f"acct-{i}", "firing", 0) for i in range(3)] + [make_alert("acct-0", "resolved", 1)]
    dispatcher.submit(alerts)
    assert dispatcher.flush(30)
    dispatcher.close()
    assert dispatcher.stats()["siem-kafka"].delivered == 4
    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=kafka_bootstrap.split(","),
        auto_offset_reset="earliest",
        consumer_timeout_ms=5000,
    )
    try:
        messages = [m for _, m in zip(range(4), consumer, strict=False)]
    finally:
        consumer.close()
    assert sorted(m.value and json.loads(m.value)["alert"]["alert_id"] for m in messages) == sorted(
        a.alert_id for a in alerts
    )
    acct0 = [json.loads(m.value)["alert"]["status"] for m in messages if m.key == b"fraud-v3|acct-0|extraction"]
    assert acct0 == ["firing", "resolved"]  # one incident, one partition, in order
    body = json.loads(messages[0].value)
    assert body["title"].startswith("[HIGH] extraction suspected") and "var-model=fraud-v3" in body["dashboard_url"]

"""The Prometheus exposition of probewatch/metrics.py: alert delivery per receiver and outcome, and
where a run's time goes."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from alerting.alert import Alert
from alerting.dispatch import DeliverySettings, Dispatcher
from alerting.dispatch import test_alert as make_test_alert  # aliased: pytest would collect test_alert
from alerting.receivers import DeliveryError
from ingest.deadletter import FileDeadLetterSink
from probewatch.app import Pipeline
from probewatch.cli import print_summary
from probewatch.config import load_config
from probewatch.metrics import PipelineMetrics
from probewatch.simulate import SimulationPlan, write_simulation
from probewatch.wiring import build_job
from storage import open_store

T0 = 1_800_000_000.0
FAST = DeliverySettings(backoff_initial_s=0.05, backoff_max_s=0.4, sweep_s=0.2, tick_s=0.1, shutdown_timeout_s=2.0)
OUTCOMES = ("delivered", "retried", "failed", "skipped", "superseded", "dropped", "recovered")


class Accepting:
    """Takes every alert."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.sent: list[Alert] = []

    def send(self, alerts: list[Alert]) -> None:
        self.sent.extend(alerts)

    def close(self) -> None:
        return None


class Refusing:
    """Refuses every alert as a 4xx would: not retryable, so each one ends ``failed``."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.attempts = 0

    def send(self, alerts: list[Alert]) -> None:
        self.attempts += 1
        raise DeliveryError("HTTP 400: invalid routing key", retryable=False)

    def close(self) -> None:
        return None


def scrape(metrics: PipelineMetrics) -> tuple[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
    """The /metrics text, and its samples by (sample name, sorted labels)."""
    text = generate_latest(metrics.registry).decode()
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    return text, samples


def deliveries(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], receiver: str) -> dict[str, float]:
    """The receiver's count per outcome; NaN where the exposition has no sample (so it cannot equal 0)."""
    return {
        outcome: samples.get(
            ("probewatch_alert_deliveries_total", (("outcome", outcome), ("receiver", receiver))), float("nan")
        )
        for outcome in OUTCOMES
    }


def test_alert_deliveries_per_receiver_and_outcome() -> None:
    ok, refusing = Accepting("ops-webhook"), Refusing("pagerduty")
    dispatcher = Dispatcher([ok, refusing], None, FAST)
    metrics = PipelineMetrics()
    metrics.watch_alert_delivery(dispatcher.stats)

    # Registered before anything was delivered: every receiver shows, every outcome at zero.
    _, before = scrape(metrics)
    for receiver in ("ops-webhook", "pagerduty"):
        assert deliveries(before, receiver) == dict.fromkeys(OUTCOMES, 0.0)
        assert before[("probewatch_alert_queue", (("receiver", receiver),))] == 0.0

    # Distinct times give distinct alert ids (the lane drops an id it has already seen).
    alerts = [make_test_alert(now=T0 + i) for i in range(3)]
    try:
        dispatcher.submit(alerts)
        assert dispatcher.flush(5.0)
        text, after = scrape(metrics)
    finally:
        dispatcher.close(1.0)

    assert len(ok.sent) == 3 and refusing.attempts == 3  # the receivers saw what the metrics claim
    assert deliveries(after, "ops-webhook") == {**dict.fromkeys(OUTCOMES, 0.0), "delivered": 3.0}
    assert deliveries(after, "pagerduty") == {**dict.fromkeys(OUTCOMES, 0.0), "failed": 3.0}
    for receiver in ("ops-webhook", "pagerduty"):
        assert after[("probewatch_alert_queue", (("receiver", receiver),))] == 0.0
    # The exposition is a counter and a gauge under these exact names (what dashboards and rules use).
    assert "# TYPE probewatch_alert_deliveries_total counter" in text
    assert 'probewatch_alert_deliveries_total{outcome="failed",receiver="pagerduty"} 3.0' in text
    assert "# TYPE probewatch_alert_queue gauge" in text
    # Read at scrape time, not copied: a second scrape with no new alerts shows the same counts.
    assert scrape(metrics)[1] == after


def test_pipeline_metrics_expose_its_dispatchers_receivers(tmp_path: Path) -> None:
    config = load_config(
        environ={},
        overrides={
            "storage": {"backend": "chdb", "database": "metrics", "chdb": {"path": str(tmp_path / "chdb")}},
            "alerting": {"console": False},
        },
    )
    store = open_store(config.storage)
    pipeline = Pipeline(config, store, FileDeadLetterSink(str(tmp_path / "dlq.jsonl")), [Accepting("siem")], state=None)
    try:
        _, samples = scrape(pipeline.metrics)
    finally:
        pipeline.close()
        store.close()
    assert deliveries(samples, "siem") == dict.fromkeys(OUTCOMES, 0.0)
    assert samples[("probewatch_alert_queue", (("receiver", "siem"),))] == 0.0


def test_a_run_says_where_its_time_went(tmp_path: Path) -> None:
    """Each batch's time is split into its stages (decode, detect, store, commit): in the run's summary,
    in the closing lines `probewatch run` prints and in /metrics, the same figures."""
    path = tmp_path / "logs.jsonl"
    write_simulation(SimulationPlan(benign_clients=12, attackers_per_kind=1, queries_per_client=60), str(path))
    config = load_config(
        environ={},
        overrides={"storage": {"chdb": {"path": str(tmp_path / "chdb")}}, "alerting": {"console": False}},
    )
    job = build_job(config, input_path=str(path), dlq_path=str(tmp_path / "dlq.jsonl"))
    summary = job.run()
    stages = summary.stage_seconds
    assert list(stages) == ["decode", "detect", "store", "commit"]
    assert stages["decode"] > 0 and stages["detect"] > 0 and stages["store"] > 0 and stages["commit"] >= 0
    assert sum(stages.values()) <= summary.elapsed_s
    _, samples = scrape(job.pipeline.metrics)
    assert {stage: samples[("probewatch_stage_seconds_total", (("stage", stage),))] for stage in stages} == stages
    printed: list[str] = []
    print_summary(summary, out=printed.append)
    assert any(
        line.startswith("  time in       : decode ") and f"detect {stages['detect']:.2f} s" in line for line in printed
    ), printed

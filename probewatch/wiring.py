"""Builds the pipeline's parts from the configuration and runs it."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

from kafka import KafkaAdminClient

from alerting.receivers import AlertmanagerReceiver, KafkaReceiver, PagerDutyReceiver, WebhookReceiver
from alerting.render import AlertFormatter
from alerting.sinks import AlertSink, ConsoleSink, JsonLinesSink
from ingest.deadletter import DeadLetterSink, FileDeadLetterSink, KafkaDeadLetterSink
from ingest.sources import FileSource, KafkaSource, Source, check_kafka, kafka_security_options
from ingest.transactions import KafkaTransactions
from probewatch.app import Pipeline, RunSummary, new_worker_id
from probewatch.changelog import KafkaChangelog, StateBackend, StoreStateBackend, retry_kafka
from probewatch.compute import blas_thread_limit
from probewatch.config import AlertReceiverConfig, Config, ConfigError
from probewatch.metrics import MetricsServer
from probewatch.population_log import KafkaPopulationLog
from storage import open_store

log = logging.getLogger("probewatch")


def alert_formatter(config: Config) -> AlertFormatter:
    threshold = config.alerting.threshold or config.detection.alert_threshold
    return AlertFormatter(config.alerting.grafana_base_url, config.alerting.runbook_url, threshold)


def _build_receiver(name: str, r: AlertReceiverConfig, config: Config, formatter: AlertFormatter) -> Any:
    if r.type == "alertmanager":
        return AlertmanagerReceiver(
            name,
            r.url,
            formatter,
            min_severity=r.min_severity,
            timeout_s=r.timeout_s,
            refresh_s=r.refresh_s,
            ttl_s=r.ttl_s,
            min_firing_s=r.min_firing_s,
            extra_labels=r.labels,
        )
    if r.type == "pagerduty":
        return PagerDutyReceiver(
            name,
            r.routing_key,
            formatter,
            url=r.url or "https://events.pagerduty.com/v2/enqueue",
            source=r.source,
            min_severity=r.min_severity,
            timeout_s=r.timeout_s,
            rate_per_minute=r.rate_per_minute,
        )
    if r.type in ("webhook", "slack"):
        return WebhookReceiver(
            name,
            r.url,
            formatter,
            format="slack" if r.type == "slack" else "json",
            hmac_secret=r.hmac_secret,
            headers=r.headers,
            min_severity=r.min_severity,
            timeout_s=r.timeout_s,
        )
    if r.type == "kafka":

        def producer() -> Any:  # made at the first send: a Kafka down at start-up is an outage
            from kafka import KafkaProducer

            return KafkaProducer(
                bootstrap_servers=(r.bootstrap_servers or config.kafka.bootstrap_servers).split(","),
                client_id=f"{config.kafka.client_id}-alerts",
                acks="all",
                linger_ms=5,
                **kafka_security_options(config.kafka),
            )

        return KafkaReceiver(name, producer, r.topic, formatter, min_severity=r.min_severity, timeout_s=r.timeout_s)
    if r.type == "jsonl":
        sink = JsonLinesSink(r.path)
        sink.name, sink.min_severity = name, r.min_severity
        return sink
    console = ConsoleSink(min_severity=r.min_severity, formatter=formatter)
    console.name = name
    return console


def build_alert_sinks(config: Config) -> list[AlertSink]:
    """Every configured receiver: ``[alerting] console / jsonl_path`` and each enabled
    ``[alerting.receivers.<name>]``. A receiver's name keys its delivery state in the outbox, so
    renaming one makes it a new receiver."""
    formatter = alert_formatter(config)
    sinks: list[AlertSink] = []
    if config.alerting.console:
        sinks.append(ConsoleSink(formatter=formatter))
    if config.alerting.jsonl_path:
        sinks.append(JsonLinesSink(config.alerting.jsonl_path))
    for name, receiver in sorted(config.alerting.receivers.items()):
        if receiver.enabled:
            sinks.append(_build_receiver(name, receiver, config, formatter))
    names = [sink.name for sink in sinks]
    if len(set(names)) != len(names):
        raise ConfigError(f"alert receiver names must be distinct (console and jsonl are taken): {names}")
    return sinks


def _progress_printer() -> Any:
    def show(summary: RunSummary, source: Source) -> None:
        done = ""
        if isinstance(source, FileSource) and source.total_bytes:
            done = f"{100.0 * source.bytes_read / source.total_bytes:5.1f}%  "
        line = (
            f"\r{done}{summary.records_read:>10,} records  {summary.events_per_s:>9,.0f}/s  "
            f"dlq {summary.dead_lettered:,}  scores {summary.sessions_scored:,}  alerts {summary.alerts:,}"
        )
        sys.stderr.write(line)
        sys.stderr.flush()

    return show


def _kafka_options(config: Config, role: str) -> dict[str, Any]:
    return {
        "bootstrap_servers": config.kafka.bootstrap_servers.split(","),
        "client_id": f"{config.kafka.client_id}-{role}",
        **kafka_security_options(config.kafka),
    }


def build_state_backend(
    config: Config, store: Any, transactions: KafkaTransactions | None = None
) -> StateBackend | None:
    """Kafka workers checkpoint session state; a file run is a replay and keeps none. Under
    exactly-once the changelog is written by the transactional producer of ``transactions``."""
    if config.source != "kafka":
        return None
    if config.state.backend == "clickhouse":
        return StoreStateBackend(store)
    return KafkaChangelog(
        changelog_topic(config),
        config.kafka.topic,
        _kafka_options(config, "state"),
        replication_factor=config.state.changelog_replication_factor,
        transactional_producer=transactions.producer if transactions is not None else None,
        producer_batch_bytes=config.kafka.producer_batch_bytes,
    )


def group_topic(config: Config, role: str) -> str:
    """The topic "<topic>.<group_id>.<role>", this consumer group's own: state it must not share with
    another application reading the same input topic."""
    return f"{config.kafka.topic}.{config.kafka.group_id}.{role}"


def changelog_topic(config: Config) -> str:
    """``state.changelog_topic``, or by default the group's own, "<topic>.<group_id>.changelog" (two
    applications reading one topic, say a canary beside production, must not restore each other's
    sessions). A deployment whose state is in the topic-only name of earlier versions,
    "<topic>.changelog", keeps it, with a warning: a new name would start every session from zero."""
    if config.state.changelog_topic:
        return config.state.changelog_topic
    topic = group_topic(config, "changelog")
    legacy = f"{config.kafka.topic}.changelog"

    def list_topics() -> set[str]:
        admin = KafkaAdminClient(**_kafka_options(config, "state"))
        try:
            return set(admin.list_topics())
        finally:
            admin.close()

    existing = retry_kafka(list_topics, "listing topics")
    if legacy in existing and topic not in existing:
        log.warning(
            "using changelog topic %s, named by an earlier version for the input topic only (every consumer "
            "group on it would share it); set state.changelog_topic = %r to keep it and silence this",
            legacy,
            legacy,
        )
        return legacy
    return topic


def build_population_log(config: Config, transactions: KafkaTransactions | None = None) -> KafkaPopulationLog | None:
    """Kafka workers share their population baselines unless configured not to; a file run is one
    worker. Under exactly-once the contributions are written by the transactional producer."""
    if config.source != "kafka" or not config.state.shared_baselines:
        return None
    return KafkaPopulationLog(
        config.state.population_topic or group_topic(config, "population"),
        _kafka_options(config, "population"),
        replication_factor=config.state.changelog_replication_factor,
        transactional_producer=transactions.producer if transactions is not None else None,
    )


def transactional_id(config: Config, worker_id: str) -> str:
    """The group names the application, the worker id (unique per process) the producer: two live
    workers never share an id, so neither fences the other (KIP-447 fences zombies by the consumer
    group's generation instead, as Kafka Streams' exactly_once_v2 does)."""
    return f"{config.kafka.group_id}-{worker_id}"


class Job:
    """A built run: the pipeline, its source, and what they hold open until the run ends."""

    def __init__(
        self,
        pipeline: Pipeline,
        source: Source,
        closers: list[Callable[[], None]],
        progress: bool,
        blas_threads: int = 1,
    ) -> None:
        self.pipeline = pipeline
        self.source = source
        self._closers = closers
        self._progress = progress
        self._blas_threads = blas_threads

    def run(self) -> RunSummary:
        """Run until the source ends or is stopped (SIGTERM, ``source.stop()``), then close everything."""
        try:
            with blas_thread_limit(self._blas_threads):
                summary = self.pipeline.run(self.source)
        finally:
            self.source.close()
            self.pipeline.close()
            for close in self._closers:
                close()
        if self._progress:
            sys.stderr.write("\n")
        return summary


def build_and_run(
    config: Config, *, input_path: str | None, dlq_path: str | None = None, progress: bool = False
) -> RunSummary:
    return build_job(config, input_path=input_path, dlq_path=dlq_path, progress=progress).run()


def build_job(config: Config, *, input_path: str | None, dlq_path: str | None = None, progress: bool = False) -> Job:
    """Everything `probewatch run` starts, from the configuration, not yet running."""
    store = open_store(config.storage)
    store.migrate()
    worker_id = new_worker_id(config)
    dead_letters: DeadLetterSink
    producer = None
    transactions = None
    if config.source == "kafka":
        check_kafka(config.kafka)  # before any client below retries a refusal until it times out
    if config.source == "kafka" and config.kafka.processing_guarantee == "exactly_once":
        transactions = KafkaTransactions(
            transactional_id(config, worker_id),
            batch_size=config.kafka.producer_batch_bytes,
            **_kafka_options(config, "txn"),
        )
        producer = transactions.producer
        dead_letters = KafkaDeadLetterSink(producer, config.kafka.effective_dlq_topic)
    elif config.source == "kafka":
        from kafka import KafkaProducer

        producer = KafkaProducer(
            acks="all", linger_ms=5, batch_size=config.kafka.producer_batch_bytes, **_kafka_options(config, "dlq")
        )
        dead_letters = KafkaDeadLetterSink(producer, config.kafka.effective_dlq_topic)
    else:
        default_dlq = "probewatch-dlq.jsonl" if input_path in (None, "-") else f"{input_path}.dlq.jsonl"
        dead_letters = FileDeadLetterSink(dlq_path or config.file.dlq_path or default_dlq)
    pipeline = Pipeline(
        config,
        store,
        dead_letters,
        build_alert_sinks(config),
        state=build_state_backend(config, store, transactions),
        progress=_progress_printer() if progress else None,
        worker_id=worker_id,
        transactions=transactions,
        population_log=build_population_log(config, transactions),
    )
    source: Source
    if config.source == "kafka":
        source = KafkaSource(
            config.kafka,
            on_assigned=pipeline.on_partitions_assigned,
            on_revoked=pipeline.on_partitions_revoked,
            transactions=transactions,
        )
        log.info(
            "consuming %s from %s as group %s (storage: %s, processing guarantee: %s%s)",
            config.kafka.topic,
            config.kafka.bootstrap_servers,
            config.kafka.group_id,
            config.storage.backend,
            config.kafka.processing_guarantee,
            f", transactional id {transactions.transactional_id}" if transactions is not None else "",
        )
    else:
        source = FileSource(
            input_path or "-",
            config.file.batch_max_records,
            config.limits.max_record_bytes,
            linger_s=config.file.linger_ms / 1000.0,
            batch_max_bytes=config.file.batch_max_bytes,
        )
        log.info("reading %s (storage: %s)", source.name, config.storage.backend)
    closers: list[Callable[[], None]] = []
    if config.metrics.port:
        closers.append(MetricsServer(pipeline.metrics, config.metrics.host, config.metrics.port).start().close)
    if producer is not None:
        closers.append(producer.close)
    return Job(pipeline, source, closers, progress, config.detection.blas_threads)

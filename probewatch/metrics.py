"""Operational metrics in Prometheus format, and health endpoints, on one small HTTP server.

``/metrics``  Prometheus text format (consumed, scored, dead-lettered, lag, batch latency, state size,
              alerts raised, alert deliveries per receiver and outcome, alert queues, storage errors,
              aborted transactions)
``/healthz``  200 while the processing loop has made progress recently (liveness)
``/readyz``   200 once the store is migrated and the source is consuming, and while storage is reachable
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from alerting.dispatch import LaneStats

log = logging.getLogger(__name__)


class PipelineMetrics:
    """The pipeline's metrics, in their own registry (several pipelines in one process stay apart)."""

    def __init__(self, stall_after_s: float = 120.0) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.consumed = Counter("probewatch_records_consumed", "Records read from the source", registry=r)
        self.dead_lettered = Counter(
            "probewatch_records_dead_lettered", "Records sent to the dead-letter sink", ["reason"], registry=r
        )
        self.scores = Counter("probewatch_session_scores", "Session scores written to storage", registry=r)
        self.alerts = Counter("probewatch_alerts", "Alerts raised by the policy", ["kind", "status"], registry=r)
        self.batches = Counter("probewatch_batches", "Micro-batches processed", registry=r)
        self.storage_errors = Counter("probewatch_storage_errors", "Failed writes to storage (retried)", registry=r)
        self.transactions_aborted = Counter(
            "probewatch_transactions_aborted",
            "Batches whose Kafka transaction aborted and that were processed again (exactly-once only)",
            registry=r,
        )
        self.assignment_lost = Counter(
            "probewatch_assignment_lost",
            "Batches not committed because the worker was no longer the group member that polled them "
            "(thrown out or rebalanced meanwhile) and that were processed again",
            registry=r,
        )
        self.population_contributions = Counter(
            "probewatch_population_contributions",
            "Population baseline contributions sent to the population log by this worker, and folded from "
            "it (every worker's)",
            ["direction"],
            registry=r,
        )
        self.batch_latency = Histogram(
            "probewatch_batch_latency_seconds",
            "Time from a batch's arrival to its offsets being committed",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.stage_seconds = Counter(
            "probewatch_stage_seconds",
            "Time spent in each stage of the batches: decode, detect, store, commit (its rate is the share "
            "of the worker's time)",
            ["stage"],
            registry=r,
        )
        self.lag = Gauge("probewatch_consumer_lag", "Messages behind the log end", ["partition"], registry=r)
        self.open_sessions = Gauge("probewatch_open_sessions", "Sessions held in memory", registry=r)
        self.state_bytes = Gauge("probewatch_state_bytes", "Approximate bytes of detector state", registry=r)
        self.storage_up = Gauge("probewatch_storage_up", "1 while the last storage write succeeded", registry=r)
        self.stall_after_s = stall_after_s
        self.last_progress = time.monotonic()
        self.ready = False
        self.storage_ok = True

    def watch_alert_delivery(self, stats: Callable[[], Mapping[str, LaneStats]]) -> None:
        """Expose the alert dispatcher's per-receiver counts (``Dispatcher.stats``), read at scrape time."""
        self.registry.register(AlertDeliveryCollector(stats))

    def storage_result(self, ok: bool) -> None:
        self.storage_ok = ok
        self.storage_up.set(1 if ok else 0)
        if not ok:
            self.storage_errors.inc()

    def progressed(self) -> None:
        self.last_progress = time.monotonic()

    @property
    def healthy(self) -> bool:
        return time.monotonic() - self.last_progress < self.stall_after_s

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


# Outcome label -> LaneStats field. "retried" counts failed attempts to be retried (one alert may
# retry many times); "dropped" (queue full, left in the outbox) and "recovered" (found again by an
# outbox sweep) count queue events of alerts that are also counted under their final outcome once
# one is reached. So the outcomes do not sum to a number of alerts; alert on failed, retried, dropped.
DELIVERY_OUTCOMES: dict[str, str] = {
    "delivered": "delivered",
    "retried": "retries",
    "failed": "failed",
    "skipped": "skipped",
    "superseded": "superseded",
    "dropped": "dropped",
    "recovered": "recovered",
}


class AlertDeliveryCollector(Collector):
    """Alert delivery per receiver, from the dispatcher's own counts at scrape time.

    The lanes already count every outcome (``LaneStats``); reading those counts when Prometheus
    scrapes, rather than mirroring them into Counters as they happen, keeps prometheus out of
    ``alerting`` and off the lanes' hot path, and cannot drift from or double-count what the
    dispatcher itself counted."""

    def __init__(self, stats: Callable[[], Mapping[str, LaneStats]]) -> None:
        self.stats = stats

    def describe(self) -> Iterable[Metric]:
        # Lets the registry reject a clash with another metric's name at register time, without
        # calling the dispatcher then.
        return list(self._families())

    def collect(self) -> Iterable[Metric]:
        deliveries, queue = self._families()
        for receiver, lane in self.stats().items():
            for outcome, field in DELIVERY_OUTCOMES.items():
                deliveries.add_metric([receiver, outcome], getattr(lane, field))
            queue.add_metric([receiver], lane.queued)
        return [deliveries, queue]

    @staticmethod
    def _families() -> tuple[CounterMetricFamily, GaugeMetricFamily]:
        # Fresh families each call: a family accumulates its samples.
        return (
            CounterMetricFamily(
                "probewatch_alert_deliveries",
                "Alert notifications per receiver and delivery outcome (retried: failed attempts to be retried)",
                labels=["receiver", "outcome"],
            ),
            GaugeMetricFamily(
                "probewatch_alert_queue",
                "Alerts waiting in a receiver's delivery queue",
                labels=["receiver"],
            ),
        )


class MetricsServer:
    """Serves PipelineMetrics on ``host:port`` from a daemon thread."""

    def __init__(self, metrics: PipelineMetrics, host: str, port: int) -> None:
        self.metrics = metrics
        handler = _handler_for(metrics)
        self.server = ThreadingHTTPServer((host, port), handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, name="metrics", daemon=True)

    def start(self) -> MetricsServer:
        self.thread.start()
        log.info("metrics on http://%s:%d/metrics (health: /healthz, /readyz)", *self.server.server_address[:2])
        return self

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _handler_for(metrics: PipelineMetrics) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/metrics":
                self._reply(200, metrics.exposition(), CONTENT_TYPE_LATEST)
            elif self.path == "/healthz":
                ok = metrics.healthy
                self._reply(200 if ok else 503, b"ok\n" if ok else b"stalled\n")
            elif self.path == "/readyz":
                ok = metrics.ready and metrics.storage_ok
                self._reply(200 if ok else 503, b"ready\n" if ok else b"not ready\n")
            else:
                self._reply(404, b"not found\n")

        def _reply(self, code: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            return  # scrapes every few seconds would drown the pipeline's own log

    return Handler

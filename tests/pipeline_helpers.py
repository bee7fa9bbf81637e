"""Shared pieces of the end-to-end tests: a simulated scenario, real worker processes, result checks."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
import requests
from clickhouse_driver import Client
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition

from ingest.deadletter import KafkaDeadLetterSink
from ingest.sources import KafkaSource, RawMessage
from ingest.transactions import KafkaTransactions
from probewatch.app import Pipeline, new_worker_id
from probewatch.config import Config
from probewatch.simulate import SimulationPlan, write_simulation
from probewatch.wiring import build_state_backend, transactional_id
from storage import open_store

ROOT = Path(__file__).resolve().parents[1]
PARTITIONS = 3  # of every test topic the pipeline tests create


class Scenario:
    def __init__(self, path: Path, truth: Path) -> None:
        self.lines = [line for line in path.read_bytes().splitlines() if line.strip()]
        labels = [json.loads(line) for line in truth.read_text().splitlines()]
        self.attackers = {str(x["client_id"]) for x in labels if x["label"] != "benign"}
        self.valid: list[dict[str, object]] = []
        self.malformed: list[bytes] = []
        for line in self.lines:
            try:
                doc = json.loads(line)
                if isinstance(doc, dict) and "client_id" in doc and len(doc["input"]["vector"]) == 8:
                    self.valid.append(doc)
                    continue
            except (ValueError, KeyError, TypeError):
                pass
            self.malformed.append(line)


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> Scenario:
    folder = tmp_path_factory.mktemp("kafka")
    # 60 benign clients of 200 queries: enough for the model's population baselines to form and for
    # every attacker to be clear, whatever order the partitions are consumed in. A backlog is read
    # partition by partition, so the first partition's clients are judged by a third of the
    # population: with a dozen clients of 150 queries, whether a random-query attacker crossed the
    # threshold depended on which partition came first, and with 40 of 300 queries (13 or 14 per
    # partition) a drifting benign client was flagged in about one kill-and-restart run in eight.
    write_simulation(
        SimulationPlan(benign_clients=60, attackers_per_kind=2, queries_per_client=200, malformed=15),
        str(folder / "logs.jsonl"),
        str(folder / "truth.jsonl"),
    )
    return Scenario(folder / "logs.jsonl", folder / "truth.jsonl")


def produce(bootstrap: str, topic: str, scenario: Scenario, part: slice = slice(None)) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20)
    for line in scenario.lines[part]:
        try:
            key = str(json.loads(line).get("client_id", "")).encode()
        except (ValueError, AttributeError):
            key = b"malformed"
        producer.send(topic, key=key, value=line)
    producer.flush()
    producer.close()


def committed_total(bootstrap: str, group: str, topic: str, partitions: int) -> int:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        total = 0
        for p in range(partitions):
            offset = consumer.committed(TopicPartition(topic, p))
            total += offset or 0
        return total
    finally:
        consumer.close()


class Worker:
    """A real `probewatch run --source kafka` process, configured through the environment."""

    # Every worker started by a test; a failing test's survivors are killed at its teardown, so
    # they cannot eat the CPU of the tests that follow.
    started: ClassVar[list[Worker]] = []

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.log = open(log_path, "ab")  # noqa: SIM115
        with socket.socket() as probe:  # a free port for this worker's /metrics, /readyz
            probe.bind(("127.0.0.1", 0))
            self.metrics_port = probe.getsockname()[1]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "probewatch", "run", "--source", "kafka", "--quiet"],
            env={**env, "PROBEWATCH__METRICS__PORT": str(self.metrics_port)},
            stdout=self.log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        Worker.started.append(self)

    def wait_ready(self, timeout: float = 120) -> None:
        """Until the worker's /readyz answers 200 (store migrated, consuming), as an orchestrator would."""

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited with {self.proc.returncode} before it was ready")
            try:
                return requests.get(f"http://127.0.0.1:{self.metrics_port}/readyz", timeout=2).status_code == 200
            except requests.RequestException:
                return False

        wait_until(ready, timeout, "a worker's /readyz")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout=timeout)
        self.log.close()
        return code


@pytest.fixture(autouse=True)
def reap_workers() -> Iterator[None]:
    yield
    while Worker.started:
        worker = Worker.started.pop()
        if worker.proc.poll() is None:
            worker.proc.kill()
            worker.proc.wait(timeout=30)
        worker.log.close()


@pytest.fixture
def pipeline_env(
    kafka_bootstrap: str,
    clickhouse_server: tuple[str, int],
    kafka_topic: Callable[..., str],
    unique_name: Callable[[str], str],
    tmp_path: Path,
) -> Iterator[dict[str, str]]:
    topic = kafka_topic(unique_name("logs"), partitions=3)
    kafka_topic(f"{topic}.dlq", partitions=1)
    database = unique_name("pw")
    host, port = clickhouse_server
    env = {
        **os.environ,
        "PROBEWATCH__KAFKA__BOOTSTRAP_SERVERS": kafka_bootstrap,
        "PROBEWATCH__KAFKA__TOPIC": topic,
        "PROBEWATCH__KAFKA__GROUP_ID": unique_name("group"),
        "PROBEWATCH__KAFKA__BATCH_MAX_RECORDS": "300",
        "PROBEWATCH__STORAGE__BACKEND": "clickhouse",
        "PROBEWATCH__STORAGE__DATABASE": database,
        "PROBEWATCH__STORAGE__RAW_SAMPLE_RATE": "1.0",
        "PROBEWATCH__STORAGE__CLICKHOUSE__HOST": host,
        "PROBEWATCH__STORAGE__CLICKHOUSE__PORT": str(port),
        "PROBEWATCH__ALERTING__JSONL_PATH": str(tmp_path / "alerts.jsonl"),
    }
    yield env
    Client(host=host, port=port).execute(f"DROP DATABASE IF EXISTS {database}")


def log_tail(path: Path, chars: int = 4000) -> str:
    """The end of a worker log without kafka-python's connection chatter (a restarting broker is loud)."""
    noise = ("kafka.conn", "kafka.net", "kafka.cluster", "kafka.coordinator", "kafka.client")
    lines = [line for line in path.read_text().splitlines() if not any(n in line for n in noise)]
    return "\n".join(lines)[-chars:]


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def dlq_documents(bootstrap: str, topic: str, isolation_level: str = "read_uncommitted") -> list[dict[str, Any]]:
    consumer = KafkaConsumer(
        f"{topic}.dlq",
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        consumer_timeout_ms=3000,
        isolation_level=isolation_level,
    )
    docs = [json.loads(m.value) for m in consumer]
    consumer.close()
    return docs


def check_dead_letters(bootstrap: str, topic: str, scenario: Scenario) -> None:
    """Every malformed record of the scenario is in the DLQ topic, with its reason and source."""
    docs = dlq_documents(bootstrap, topic)
    assert sorted(str(d["payload"]).encode() for d in docs) == sorted(scenario.malformed)
    assert all(d["reason"] and "offset" in d["source"] for d in docs)


def population_shared(worker: Worker) -> Callable[[], bool]:
    """A condition for :func:`wait_until`: the worker sent population contributions to the population
    log and folded them all back (its /metrics)."""

    def shared() -> bool:
        metrics = requests.get(f"http://127.0.0.1:{worker.metrics_port}/metrics", timeout=5).text
        count = {}
        for direction in ("sent", "folded"):
            found = re.search(rf'probewatch_population_contributions_total{{direction="{direction}"}} (\S+)', metrics)
            count[direction] = float(found.group(1)) if found else 0.0
        return count["sent"] > 0 and count["folded"] >= count["sent"]

    return shared


def committed_dead_letters(bootstrap: str, topic: str) -> list[bytes]:
    """The payloads of the dead letters a read_committed reader sees, sorted (compare with
    ``sorted(scenario.malformed)``: each dead letter committed exactly once)."""
    return sorted(str(d["payload"]).encode() for d in dlq_documents(bootstrap, topic, "read_committed"))


def check_results(env: dict[str, str], scenario: Scenario) -> Client:
    client = clickhouse_client(env)
    db = env["PROBEWATCH__STORAGE__DATABASE"]
    # Every valid record is stored exactly once (as readers see it), under its own source offset.
    events = client.execute(f"SELECT source_partition, source_offset FROM {db}.events FINAL")
    assert len(events) == len(set(events)) == len(scenario.valid)
    # No session restarted from zero: each session's final query count covers all its records.
    expected = Counter(str(doc["client_id"]) for doc in scenario.valid)
    stored = dict(
        client.execute(f"SELECT client_id, max(client_queries) FROM {db}.session_scores FINAL GROUP BY client_id")
    )
    assert stored == dict(expected)
    # Alerts: no duplicates as readers see them; every attacker alerted, no benign client.
    alert_rows = client.execute(f"SELECT alert_id, client_id, status FROM {db}.alerts FINAL")
    assert len(alert_rows) == len({row[0] for row in alert_rows})
    firing = firing_clients(client, db)
    benign_alerts = client.execute(
        f"SELECT client_id, kind, n_queries, score, reasons FROM {db}.alerts FINAL"
        f" WHERE status = 'firing' AND client_id NOT IN %(attackers)s",
        {"attackers": tuple(sorted(scenario.attackers))},
    )
    # The alerts' own evidence in the message: a false positive in CI is diagnosed from this alone.
    assert not benign_alerts, f"benign clients alerted: {benign_alerts}"
    assert scenario.attackers and firing == scenario.attackers
    return client


def clickhouse_client(env: dict[str, str]) -> Client:
    return Client(
        host=env["PROBEWATCH__STORAGE__CLICKHOUSE__HOST"], port=int(env["PROBEWATCH__STORAGE__CLICKHOUSE__PORT"])
    )


def firing_clients(client: Client, db: str) -> set[str]:
    return {row[0] for row in client.execute(f"SELECT client_id FROM {db}.alerts FINAL WHERE status = 'firing'")}


def progress(kafka_bootstrap: str, env: dict[str, str]) -> Callable[[], int]:
    topic, group = env["PROBEWATCH__KAFKA__TOPIC"], env["PROBEWATCH__KAFKA__GROUP_ID"]
    return lambda: committed_total(kafka_bootstrap, group, topic, PARTITIONS)


def finish(
    workers: list[Worker], done: Callable[[], int], total: int, log: Path, alerted: Callable[[], bool] | None = None
) -> None:
    try:
        wait_until(lambda: done() == total, 240, "all offsets committed")
        if alerted is not None:
            wait_until(alerted, 120, "every attacker alerted")
    finally:
        codes = [w.stop() for w in workers if w.proc.poll() is None]
    assert all(code == 0 for code in codes), f"exit codes {codes}:\n{log_tail(log, 8000)}"


def group_formed(bootstrap: str, group: str, members: int) -> Callable[[], bool]:
    """A condition for :func:`wait_until`: the group is stable with ``members`` members and every one
    holds partitions (a cooperative rebalance gives a newcomer its partitions in its second round)."""

    def formed() -> bool:
        admin = KafkaAdminClient(bootstrap_servers=bootstrap)
        try:
            info = admin.describe_groups([group]).get(group, {})
        finally:
            admin.close()
        joined = info.get("members", [])
        return (
            info.get("group_state") == "Stable"
            and len(joined) == members
            and all(m["member_assignment"]["assigned_partitions"] for m in joined)
        )

    return formed


def kill_one_worker_mid_stream(
    env: dict[str, str], scenario: Scenario, kafka_bootstrap: str, log: Path, workers: int
) -> None:
    """Start ``workers`` workers, wait until each holds partitions, produce the scenario, SIGKILL one
    of them once a quarter of the records is committed, and let the others finish the topic.

    The log is produced only once the group has formed: with a backlog waiting, the first worker to
    join read a quarter of it alone before the others had partitions, the worker killed could be one
    that never held any (nothing to hand over), and the group then waited a session timeout for it."""
    running = [Worker(env, log) for _ in range(workers)]
    group = env["PROBEWATCH__KAFKA__GROUP_ID"]
    wait_until(group_formed(kafka_bootstrap, group, workers), 120, f"{workers} workers each holding partitions")
    produce(kafka_bootstrap, env["PROBEWATCH__KAFKA__TOPIC"], scenario)
    done = progress(kafka_bootstrap, env)
    wait_until(lambda: done() > len(scenario.lines) // 4, 180, "a quarter of the records committed")
    running[0].stop(signal.SIGKILL)
    assert done() < len(scenario.lines), "the workers finished before one could be killed"
    # The survivors run on until every attacker has alerted, as workers in service would: the killed
    # worker may have read its partitions to the end with scores still waiting for a warm population,
    # which the worker adopting them gives only after the rebalance (about a session timeout later).
    client, db = clickhouse_client(env), env["PROBEWATCH__STORAGE__DATABASE"]
    finish(running[1:], done, len(scenario.lines), log, lambda: firing_clients(client, db) >= scenario.attackers)


def topic_values(bootstrap: str, topic: str, isolation_level: str = "read_uncommitted") -> list[bytes]:
    """Every value of the topic that a reader with ``isolation_level`` sees (up to the end it sees)."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, isolation_level=isolation_level, enable_auto_commit=False)
    try:
        partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        ends = consumer.end_offsets(partitions)
        values: list[bytes] = []
        deadline = time.monotonic() + 30
        while any(consumer.position(tp) < ends[tp] for tp in partitions):
            assert time.monotonic() < deadline, f"could not read {topic} to {ends}"
            for records in consumer.poll(timeout_ms=500).values():
                values += [r.value for r in records]
        return values
    finally:
        consumer.close()


class WebhookReceiver:
    """A tiny HTTP receiver on 127.0.0.1:<port> (0: any free one, see ``url``) collecting the JSON
    documents POSTed to it (Alertmanager's notifications, probewatch's alerts) with their paths."""

    def __init__(self, port: int = 0) -> None:
        self.received: queue.Queue[dict[str, Any]] = queue.Queue()
        received = self.received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                received.put({"path": self.path, **json.loads(body)})
                self.send_response(200)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        ThreadingHTTPServer.allow_reuse_address = True
        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def wait_for(self, predicate: Callable[[dict[str, Any]], bool], timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                payload = self.received.get(timeout=left)
            except queue.Empty:
                break
            if predicate(payload):
                return payload
        raise AssertionError(f"no matching webhook notification within {timeout}s")

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class InProcessWorker:
    """A pipeline and its KafkaSource in the test's own process, wired as ``probewatch run`` wires
    them, so a test can step in between their calls (through a :class:`SourceWrapper`)."""

    def __init__(self, config: Config, bootstrap: str) -> None:
        store = open_store(config.storage)
        store.migrate()
        worker_id = new_worker_id(config)
        exactly_once = config.kafka.processing_guarantee == "exactly_once"
        self.transactions = (
            KafkaTransactions(transactional_id(config, worker_id), bootstrap_servers=bootstrap)
            if exactly_once
            else None
        )
        self.producer = self.transactions.producer if self.transactions else KafkaProducer(bootstrap_servers=bootstrap)
        self.pipeline = Pipeline(
            config,
            store,
            KafkaDeadLetterSink(self.producer, config.kafka.effective_dlq_topic),
            [],
            state=build_state_backend(config, store, self.transactions),
            worker_id=worker_id,
            transactions=self.transactions,
        )
        self.source = KafkaSource(
            config.kafka,
            on_assigned=self.pipeline.on_partitions_assigned,
            on_revoked=self.pipeline.on_partitions_revoked,
            transactions=self.transactions,
        )

    def run(
        self,
        source: SourceWrapper,
        records: int,
        timeout: float,
        after_batch: Callable[[list[RawMessage]], None] | None = None,
    ) -> None:
        """Process batches from ``source`` (wrapping this worker's) until ``records`` are read, or
        ``timeout`` seconds have passed (a replay that never completes fails the test, not hangs it);
        then close everything."""
        deadline = time.monotonic() + timeout
        try:
            for batch in source.batches():
                self.pipeline.process_batch(batch, source)
                if after_batch is not None:
                    after_batch(batch)
                if self.pipeline.summary.records_read >= records or time.monotonic() > deadline:
                    break
        finally:
            source.close()
            self.pipeline.close()
            self.producer.close()


class HandedBatches:
    """A Source whose batches the test hands to ``Pipeline.process_batch`` itself: nothing to poll; it
    counts the records committed, and stands for a topic of ``partitions`` partitions."""

    name = "handed"

    def __init__(self, partitions: int = 1) -> None:
        self.partitions = partitions
        self.committed = 0

    def batches(self) -> Iterator[list[RawMessage]]:
        return iter(())

    def commit(self, batch: list[RawMessage]) -> None:
        self.committed += len(batch)

    def confirm_assignment(self) -> None:
        return None

    def rewind(self) -> None:
        return None

    def partition_count(self) -> int:
        return self.partitions

    def stop(self) -> None:
        return None

    @property
    def stopped(self) -> bool:
        return False

    def close(self) -> None:
        return None


class SourceWrapper:
    """A KafkaSource with a fault injected by a subclass: every call goes to the real source unless
    the subclass overrides it."""

    def __init__(self, inner: KafkaSource) -> None:
        self.inner = inner
        self.name = inner.name

    def batches(self) -> Iterator[list[RawMessage]]:
        return self.inner.batches()

    def commit(self, batch: list[RawMessage]) -> None:
        self.inner.commit(batch)

    def confirm_assignment(self) -> None:
        self.inner.confirm_assignment()

    def rewind(self) -> None:
        self.inner.rewind()

    def partition_count(self) -> int:
        return self.inner.partition_count()

    def stop(self) -> None:
        self.inner.stop()

    @property
    def stopped(self) -> bool:
        return self.inner.stopped

    def close(self) -> None:
        self.inner.close()

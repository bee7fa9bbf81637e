"""End-to-end throughput of probewatch beside its baselines, in one run, on the same data.

Rows printed (events/s, one process each):
  file → chDB            probewatch run --input on a simulated log, embedded ClickHouse
  bare consumer          kafka-python reading the same topic, values only (the ceiling for this design)
  kafka → ClickHouse     probewatch's pipeline: Kafka consumer group → detectors → clickhouse-server
  naive per-event River  json.loads + a River model learn_one/score_one per event + batched inserts
                         (the pipeline a user would write first)

Needs the local services (`make services-up`). Usage:
  python benchmarks/bench_pipeline.py [--records 60000] [--kafka 127.0.0.1:19092] [--clickhouse 127.0.0.1:19000]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from clickhouse_driver import Client
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import NewTopic

from ingest.deadletter import FileDeadLetterSink
from ingest.sources import KafkaSource
from probewatch.app import Pipeline
from probewatch.config import Config, load_config
from probewatch.simulate import SimulationPlan, write_simulation
from probewatch.wiring import build_alert_sinks, build_and_run, build_state_backend
from storage import open_store


def make_log(directory: Path, records: int) -> Path:
    path = directory / "bench.jsonl"
    clients = max(8, records // 400)
    write_simulation(
        SimulationPlan(
            benign_clients=clients,
            attackers_per_kind=max(1, clients // 20),
            queries_per_client=400,
            malformed=50,
        ),
        str(path),
    )
    return path


def bench_file(path: Path, directory: Path) -> tuple[float, int]:
    config = load_config(
        environ={},
        overrides={"storage": {"chdb": {"path": str(directory / "chdb")}}, "alerting": {"console": False}},
    )
    summary = build_and_run(config, input_path=str(path), dlq_path=str(directory / "dlq.jsonl"))
    return summary.events_per_s, summary.records_read


def produce(bootstrap: str, topic: str, path: Path) -> int:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    admin.create_topics([NewTopic(topic, 3, 1), NewTopic(f"{topic}.dlq", 1, 1)])
    admin.close()
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=50, batch_size=256 * 1024, acks=1)
    count = 0
    for line in path.read_bytes().splitlines():
        try:
            key = str(json.loads(line).get("client_id", "")).encode()
        except (ValueError, AttributeError):
            key = b""
        producer.send(topic, key=key, value=line)
        count += 1
    producer.flush()
    producer.close()
    return count


def bench_bare_consumer(bootstrap: str, topic: str, total: int) -> float:
    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=f"bare-{uuid.uuid4().hex[:6]}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        max_poll_records=5000,
    )
    seen = 0
    started = None
    nbytes = 0
    while seen < total:
        for messages in consumer.poll(timeout_ms=500, max_records=5000).values():
            if started is None:
                started = time.perf_counter()
            seen += len(messages)
            nbytes += sum(len(m.value) for m in messages)
    elapsed = time.perf_counter() - (started or time.perf_counter())
    consumer.close()
    return seen / elapsed


def bench_probewatch_kafka(bootstrap: str, topic: str, total: int, host: str, port: int, directory: Path) -> float:
    config: Config = load_config(
        environ={},
        overrides={
            "source": "kafka",
            "kafka": {
                "bootstrap_servers": bootstrap,
                "topic": topic,
                "group_id": f"pw-{uuid.uuid4().hex[:6]}",
            },
            "storage": {
                "backend": "clickhouse",
                "database": f"bench_{uuid.uuid4().hex[:6]}",
                "clickhouse": {"host": host, "port": port},
            },
            "alerting": {"console": False},
        },
    )
    store = open_store(config.storage)
    store.migrate()
    pipeline = Pipeline(
        config,
        store,
        FileDeadLetterSink(str(directory / "kafka-dlq.jsonl")),
        build_alert_sinks(config),
        state=build_state_backend(config, store),
    )
    source = KafkaSource(
        config.kafka, on_assigned=pipeline.on_partitions_assigned, on_revoked=pipeline.on_partitions_revoked
    )
    started: list[float] = []
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.05):
            if pipeline.summary.records_read and not started:
                started.append(time.perf_counter())
            if pipeline.summary.records_read >= total:
                source.stop()
                return

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    pipeline.run(source)
    elapsed = time.perf_counter() - started[0]
    done.set()
    source.close()
    pipeline.close()
    Client(host=host, port=port).execute(f"DROP DATABASE IF EXISTS {config.storage.database}")
    return total / elapsed


def bench_naive_river(bootstrap: str, topic: str, total: int, host: str, port: int) -> float:
    from river import anomaly, compose, preprocessing

    client = Client(host=host, port=port)
    client.execute("CREATE DATABASE IF NOT EXISTS bench_naive")
    client.execute(
        "CREATE TABLE IF NOT EXISTS bench_naive.scores (ts Float64, client_id String, model_id String, score Float64) "
        "ENGINE = MergeTree() ORDER BY (model_id, client_id)"
    )
    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=f"naive-{uuid.uuid4().hex[:6]}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    models: dict[str, Any] = {}
    rows: list[tuple[float, str, str, float]] = []
    seen = 0
    started = None
    while seen < total:
        for messages in consumer.poll(timeout_ms=500).values():
            if started is None:
                started = time.perf_counter()
            for message in messages:
                seen += 1
                try:
                    doc = json.loads(message.value)
                    features = {f"x{i}": v for i, v in enumerate(doc["input"]["vector"])}
                except (ValueError, KeyError, TypeError):
                    continue
                model = models.setdefault(
                    doc["client_id"],
                    compose.Pipeline(preprocessing.MinMaxScaler(), anomaly.HalfSpaceTrees(seed=1)),
                )
                score = model.score_one(features)
                model.learn_one(features)
                rows.append(
                    (
                        float(doc["ts"]) if not isinstance(doc["ts"], str) else 0.0,
                        doc["client_id"],
                        doc["model_id"],
                        score,
                    )
                )
                if len(rows) >= 1000:
                    client.execute("INSERT INTO bench_naive.scores VALUES", rows)
                    rows = []
            consumer.commit()
    if rows:
        client.execute("INSERT INTO bench_naive.scores VALUES", rows)
    elapsed = time.perf_counter() - (started or time.perf_counter())
    consumer.close()
    client.execute("DROP DATABASE IF EXISTS bench_naive")
    return seen / elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=60_000)
    parser.add_argument("--kafka", default="127.0.0.1:19092")
    parser.add_argument("--clickhouse", default="127.0.0.1:19000")
    parser.add_argument("--skip-naive", action="store_true", help="skip the (slow) naive River baseline")
    args = parser.parse_args()
    host, port = args.clickhouse.split(":")
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        path = make_log(directory, args.records)
        results: list[tuple[str, float]] = []
        file_rate, n = bench_file(path, directory)
        print(f"log: {n} records ({path.stat().st_size / 1e6:.1f} MB)", file=sys.stderr)
        results.append(("probewatch file → chDB", file_rate))
        topic = f"bench-{uuid.uuid4().hex[:8]}"
        total = produce(args.kafka, topic, path)
        bare = bench_bare_consumer(args.kafka, topic, total)
        results.append(("bare kafka-python consumer (ceiling)", bare))
        pw = bench_probewatch_kafka(args.kafka, topic, total, host, int(port), directory)
        results.append(("probewatch kafka → ClickHouse server", pw))
        if not args.skip_naive:
            results.append(
                (
                    "naive per-event River pipeline",
                    bench_naive_river(args.kafka, topic, total, host, int(port)),
                )
            )
    print(f"\n{'pipeline':<40} {'events/s':>12} {'vs bare consumer':>18}")
    for name, rate in results:
        print(f"{name:<40} {rate:>12,.0f} {rate / bare:>17.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""End-to-end throughput of probewatch beside its baselines, in one run, on the same data.

Two traffic shapes (simulated logs of one model, benign clients and a few attackers of each kind):
  long sessions   clients of ~400 queries each: most blocks of a client's queries are long
  short sessions  many clients of ~25 queries each: per-client work dominates (scored every 5 queries)

Rows printed per shape (events/s, one at a time, all reading the same topic; the median of --repeat
rounds, with the range, the rows taking turns within a round):
  bare consumer            kafka-python reading values only (the ceiling for this design)
  consume + decode         the same consumer and probewatch's record decoder, nothing else: what is
                           left of the ceiling before detection starts
  kafka → ClickHouse       probewatch's pipeline: consumer group → detectors → clickhouse-server
                           (at least once, then with kafka.processing_guarantee = "exactly_once",
                           then with state.shared_baselines = false: no population log)
  naive per-event River    json.loads + a River model learn_one/score_one per event + batched inserts
                           (the pipeline a user would write first)
  file → chDB              probewatch run --input on the log file, embedded ClickHouse

Needs the local services (`make services-up`). Usage:
  python benchmarks/bench_pipeline.py [--records 60000] [--shapes long,short] [--skip-naive]
                                      [--repeat 3] [--batch-max-records N] [--fetch-bytes N]
                                      [--kafka 127.0.0.1:19092] [--clickhouse 127.0.0.1:19000]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from clickhouse_driver import Client
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import NewTopic

from ingest.records import RecordDecoder, SourcePosition
from probewatch.app import streaming_gc
from probewatch.config import Config, KafkaConfig, load_config
from probewatch.simulate import SimulationPlan, write_simulation
from probewatch.wiring import build_and_run, build_job

SHAPES = {"long": 400, "short": 25}  # queries per client


def make_log(directory: Path, records: int, queries_per_client: int = 400) -> Path:
    path = directory / f"bench-{queries_per_client}.jsonl"
    clients = max(8, records // queries_per_client)
    write_simulation(
        SimulationPlan(
            benign_clients=clients,
            attackers_per_kind=max(1, min(clients // 20, 4)),
            queries_per_client=queries_per_client,
            malformed=50,
        ),
        str(path),
    )
    return path


def bench_file(path: Path, directory: Path, batch_max_records: int) -> float:
    config = load_config(
        environ={},
        overrides={
            "file": {"batch_max_records": batch_max_records},
            "storage": {"chdb": {"path": str(directory / f"chdb-{uuid.uuid4().hex[:6]}")}},  # a fresh one each run
            "alerting": {"console": False},
        },
    )
    summary = build_and_run(config, input_path=str(path), dlq_path=str(directory / "dlq.jsonl"))
    return summary.events_per_s


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


def bench_consumer(
    bootstrap: str, topic: str, total: int, fetch: KafkaConfig, handle: Callable[[list[Any]], object]
) -> float:
    """Events/s of a kafka-python consumer reading the whole topic and passing each poll to ``handle``.

    Under the garbage-collector settings probewatch runs under (``streaming_gc``), as the naive
    pipeline is: the collector otherwise scans, many times a second, everything earlier rows left alive
    (River, chDB, probewatch's runs), and a baseline's rate fell from 130k to 85k events/s from one
    round to the next (measured)."""
    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=f"bench-{uuid.uuid4().hex[:6]}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        max_poll_records=fetch.batch_max_records,
        max_partition_fetch_bytes=fetch.max_partition_fetch_bytes,
    )
    seen = 0
    started = None
    with streaming_gc():
        while seen < total:
            for messages in consumer.poll(timeout_ms=500, max_records=fetch.batch_max_records).values():
                if started is None:
                    started = time.perf_counter()
                seen += len(messages)
                handle(messages)
    elapsed = time.perf_counter() - (started or time.perf_counter())
    consumer.close()
    return seen / elapsed


def bench_bare_consumer(bootstrap: str, topic: str, total: int, fetch: KafkaConfig) -> float:
    # Touches every value, as any pipeline must, and does nothing else.
    return bench_consumer(bootstrap, topic, total, fetch, lambda messages: sum(len(m.value) for m in messages))


def bench_consume_decode(bootstrap: str, topic: str, total: int, fetch: KafkaConfig) -> float:
    decoder = RecordDecoder()
    return bench_consumer(
        bootstrap,
        topic,
        total,
        fetch,
        lambda messages: decoder.decode_batch(
            [(m.value, SourcePosition(m.topic, m.partition, m.offset), m.key) for m in messages]
        ),
    )


def bench_probewatch_kafka(
    bootstrap: str,
    topic: str,
    total: int,
    host: str,
    port: int,
    fetch: KafkaConfig,
    guarantee: str = "at_least_once",
    shared_baselines: bool = True,
    stages: dict[str, list[float]] | None = None,
) -> float:
    """`probewatch run --source kafka`, built from its configuration as the CLI builds it. ``stages``:
    where to add the run's µs per record in each stage of its batches (RunSummary.stage_seconds)."""
    config: Config = load_config(
        environ={},
        overrides={
            "source": "kafka",
            "kafka": {
                "bootstrap_servers": bootstrap,
                "topic": topic,
                "group_id": f"pw-{uuid.uuid4().hex[:6]}",
                "processing_guarantee": guarantee,
                "batch_max_records": fetch.batch_max_records,
                "max_partition_fetch_bytes": fetch.max_partition_fetch_bytes,
            },
            "storage": {
                "backend": "clickhouse",
                "database": f"bench_{uuid.uuid4().hex[:6]}",
                "clickhouse": {"host": host, "port": port},
            },
            # A changelog of its own: a run must not restore (and skip) what another run applied.
            "state": {
                "changelog_topic": f"{topic}.changelog-{uuid.uuid4().hex[:6]}",
                "shared_baselines": shared_baselines,
            },
            "alerting": {"console": False},
        },
    )
    job = build_job(config, input_path=None)
    started: list[float] = []
    finished: list[float] = []
    done = threading.Event()
    # The clock starts when the first records are handed to the pipeline, as the bare consumer's starts
    # at its first poll that returns records: the first batch's processing is part of the rate. It stops
    # when the batch that holds the last record returns, its scores stored and its offsets committed;
    # the poll that then waits for more and the shutdown are not (the bare consumer's close is not either).
    process_batch = job.pipeline.process_batch

    def timed_process_batch(batch: list[Any], source: Any) -> Any:
        if batch and not started:
            started.append(time.perf_counter())
        result = process_batch(batch, source)
        if not finished and job.pipeline.summary.records_read >= total:
            finished.append(time.perf_counter())
        return result

    job.pipeline.process_batch = timed_process_batch  # type: ignore[method-assign]

    def watch() -> None:
        while not done.wait(0.05):
            if job.pipeline.summary.records_read >= total:
                job.source.stop()
                return

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    summary = job.run()
    elapsed = finished[0] - started[0]
    done.set()
    for stage, seconds in summary.stage_seconds.items():
        if stages is not None:
            stages.setdefault(stage, []).append(seconds / total * 1e6)
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
    with streaming_gc():
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


def bench_shape(
    args: argparse.Namespace, shape: str, directory: Path
) -> tuple[list[tuple[str, list[float]]], dict[str, list[float]]]:
    """Every row's rates (events/s), one per round, and, per round, the µs per record that the
    at-least-once probewatch row spent in each stage of its batches. The rows take turns within a round, so a slow spell
    of the machine (the broker's, ClickHouse's and this process's share of two cores moves by 20-30%
    from run to run) touches every row alike instead of one; the naive pipeline runs once (it is many
    times slower whatever the spell)."""
    host, port = args.clickhouse.split(":")
    # The batch limits of probewatch's rows; the consumers of the baseline rows fetch and poll alike.
    fetch = KafkaConfig(batch_max_records=args.batch_max_records, max_partition_fetch_bytes=args.fetch_bytes)
    path = make_log(directory, args.records, SHAPES[shape])
    topic = f"bench-{uuid.uuid4().hex[:8]}"
    total = produce(args.kafka, topic, path)
    stages: dict[str, list[float]] = {}
    print(f"{shape} sessions: {total} records ({path.stat().st_size / 1e6:.1f} MB)", file=sys.stderr)
    rows: list[tuple[str, Callable[[], float]]] = [
        ("bare kafka-python consumer (ceiling)", lambda: bench_bare_consumer(args.kafka, topic, total, fetch)),
        ("consume + decode, no detection", lambda: bench_consume_decode(args.kafka, topic, total, fetch)),
        (
            "probewatch kafka → ClickHouse server",
            lambda: bench_probewatch_kafka(args.kafka, topic, total, host, int(port), fetch, stages=stages),
        ),
        (
            "  the same, exactly_once",
            lambda: bench_probewatch_kafka(args.kafka, topic, total, host, int(port), fetch, "exactly_once"),
        ),
        (
            "  the same, baselines per worker",
            lambda: bench_probewatch_kafka(args.kafka, topic, total, host, int(port), fetch, shared_baselines=False),
        ),
        ("probewatch file → chDB", lambda: bench_file(path, directory, args.batch_max_records)),
    ]
    rates: dict[str, list[float]] = {name: [] for name, _ in rows}
    for round_number in range(1, args.repeat + 1):
        for name, measure in rows:
            rates[name].append(measure())
            print(f"  round {round_number}/{args.repeat}: {name.strip()}: {rates[name][-1]:,.0f}/s", file=sys.stderr)
    results = [(name, rates[name]) for name, _ in rows]
    if not args.skip_naive:
        naive = bench_naive_river(args.kafka, topic, total, host, int(port))
        print(f"  naive per-event River pipeline: {naive:,.0f}/s", file=sys.stderr)
        results.insert(-1, ("naive per-event River pipeline", [naive]))
    return results, stages


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=60_000)
    parser.add_argument("--shapes", default="long,short", help="traffic shapes to run: long, short")
    parser.add_argument("--kafka", default="127.0.0.1:19092")
    parser.add_argument("--clickhouse", default="127.0.0.1:19000")
    parser.add_argument("--skip-naive", action="store_true", help="skip the (slow) naive River baseline")
    parser.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="rounds of every row but the naive one; the median is printed, with the range (default %(default)s)",
    )
    defaults = KafkaConfig()
    parser.add_argument(
        "--batch-max-records",
        type=int,
        default=defaults.batch_max_records,
        help="records per batch at most (kafka.batch_max_records, file.batch_max_records; default %(default)s)",
    )
    parser.add_argument(
        "--fetch-bytes",
        type=int,
        default=defaults.max_partition_fetch_bytes,
        help="bytes per partition and fetch at most (kafka.max_partition_fetch_bytes; default %(default)s)",
    )
    args = parser.parse_args()
    shapes = [shape.strip() for shape in args.shapes.split(",") if shape.strip()]
    unknown = [shape for shape in shapes if shape not in SHAPES]
    if unknown:
        parser.error(f"unknown shape(s) {unknown}; choose from {sorted(SHAPES)}")
    if args.repeat < 1:
        parser.error("--repeat must be 1 or more")
    with tempfile.TemporaryDirectory() as tmp:
        tables = [(shape, bench_shape(args, shape, Path(tmp))) for shape in shapes]
    for shape, (results, stages) in tables:
        bare = statistics.median(results[0][1])
        title = f"{shape} sessions ({SHAPES[shape]} queries/client)"
        print(f"\n{title:<40} {'events/s':>12} {'range':>20} {'vs bare consumer':>18}")
        for name, rates in results:
            spread = f"{min(rates):,.0f}–{max(rates):,.0f}" if len(rates) > 1 else ""
            median = statistics.median(rates)
            print(f"{name:<40} {median:>12,.0f} {spread:>20} {median / bare:>17.0%}")
        per_stage = ", ".join(f"{stage} {statistics.median(us):.1f}" for stage, us in stages.items())
        ceiling = f"the bare consumer's whole record: {1e6 / bare:.1f}"
        print(f"probewatch's batches, µs per record: {per_stage} (the rest reading Kafka; {ceiling})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

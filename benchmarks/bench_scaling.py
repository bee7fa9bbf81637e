"""Scaling and latency: 1, 2, 3 workers on one topic, and arrival → queryable latency.

1. Scaling: 1, 2 and 3 `probewatch run --source kafka` processes in one consumer group (a fresh
   topic of 3 partitions, group and database each time) consume the same log. The log is produced
   once the group has formed (every worker a member with partitions), so that the figure is the
   group's throughput, not its start-up: workers started on a full topic rebalanced while the first
   one was already consuming, and a short log measured mostly that. events/s is measured from the
   first committed offset to the last.
2. Latency: one in-process worker consumes while a producer (a process of its own) sends at a fixed
   rate with each record's `ts` set to its send time; latency is the time from send to the end of
   the ClickHouse write that makes its session's score queryable (p50 / p99), at a light rate and
   at a busier one (a busier worker's batches grow, and each record waits for more of its batch).

Needs the local services (`make services-up`). This machine has 2 cores, so 3 workers share them.
  python benchmarks/bench_scaling.py [--records 60000] [--rates 800,4000] [--seconds 20]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from clickhouse_driver import Client
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic

from ingest.deadletter import FileDeadLetterSink
from ingest.sources import KafkaSource
from probewatch.app import Pipeline
from probewatch.config import load_config
from probewatch.simulate import SimulationPlan, write_simulation
from probewatch.wiring import build_alert_sinks, build_state_backend
from storage import StoredBatch, open_store

ROOT = Path(__file__).resolve().parents[1]
PARTITIONS = 3


def make_topic(bootstrap: str) -> str:
    topic = f"scale-{uuid.uuid4().hex[:8]}"
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    admin.create_topics([NewTopic(topic, PARTITIONS, 1), NewTopic(f"{topic}.dlq", 1, 1)])
    admin.close()
    return topic


def produce_lines(bootstrap: str, topic: str, lines: list[bytes]) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=50, batch_size=256 * 1024)
    for line in lines:
        try:
            key = str(json.loads(line).get("client_id", "")).encode()
        except (ValueError, AttributeError):
            key = b""
        producer.send(topic, key=key, value=line)
    producer.flush()
    producer.close()


def committed(bootstrap: str, group: str, topic: str) -> int:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        return sum(consumer.committed(TopicPartition(topic, p)) or 0 for p in range(PARTITIONS))
    finally:
        consumer.close()


def wait_for_group(bootstrap: str, group: str, members: int, timeout_s: float = 120.0) -> None:
    """Until the group is stable with ``members`` members, each assigned partitions (twice in a row,
    a second apart: a cooperative rebalance settles in two rounds)."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        deadline, settled = time.monotonic() + timeout_s, 0
        while time.monotonic() < deadline:
            info = admin.describe_groups([group]).get(group, {})
            formed = info.get("group_state") == "Stable" and len(info.get("members", [])) == members
            if formed and all(m["member_assignment"]["assigned_partitions"] for m in info["members"]):
                settled += 1
                if settled == 2:
                    return
            else:
                settled = 0
            time.sleep(1.0)
        raise RuntimeError(f"the group of {members} workers did not form within {timeout_s:.0f} s")
    finally:
        admin.close()


def run_workers(count: int, bootstrap: str, lines: list[bytes], ch: tuple[str, int]) -> float:
    topic = make_topic(bootstrap)
    total = len(lines)
    group, database = f"g-{uuid.uuid4().hex[:6]}", f"scale_{uuid.uuid4().hex[:6]}"
    env = {
        **os.environ,
        "PROBEWATCH__KAFKA__BOOTSTRAP_SERVERS": bootstrap,
        "PROBEWATCH__KAFKA__TOPIC": topic,
        "PROBEWATCH__KAFKA__GROUP_ID": group,
        "PROBEWATCH__STATE__CHANGELOG_TOPIC": f"{topic}.{group}.changelog",
        "PROBEWATCH__STORAGE__BACKEND": "clickhouse",
        "PROBEWATCH__STORAGE__DATABASE": database,
        "PROBEWATCH__STORAGE__CLICKHOUSE__HOST": ch[0],
        "PROBEWATCH__STORAGE__CLICKHOUSE__PORT": str(ch[1]),
    }
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "probewatch", "run", "--source", "kafka", "--quiet"],
            env=env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(count)
    ]
    try:
        wait_for_group(bootstrap, group, count)
        produce_lines(bootstrap, topic, lines)
        first = None
        deadline = time.monotonic() + 1800
        while time.monotonic() < deadline:
            done = committed(bootstrap, group, topic)
            if done and first is None:
                first = (time.monotonic(), done)
            if done >= total:
                break
            time.sleep(0.25)
        else:
            raise RuntimeError(f"{count} workers did not finish within 30 min")
        assert first is not None
        return (total - first[1]) / max(time.monotonic() - first[0], 1e-9)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=60)
        Client(host=ch[0], port=ch[1]).execute(f"DROP DATABASE IF EXISTS {database}")


def measure_latency(
    bootstrap: str, ch: tuple[str, int], lines: list[bytes], rate: float, seconds: float
) -> tuple[np.ndarray, float]:
    """Latencies of the records sent at ``rate`` for ``seconds``, and the rate actually sent."""
    docs: list[dict[str, Any]] = []
    for line in lines:
        try:
            doc = json.loads(line)
        except ValueError:
            continue  # the log's deliberately malformed records
        if isinstance(doc, dict) and "client_id" in doc:
            docs.append(doc)
    topic = make_topic(bootstrap)
    config = load_config(
        environ={},
        overrides={
            "source": "kafka",
            "kafka": {"bootstrap_servers": bootstrap, "topic": topic, "group_id": f"lat-{uuid.uuid4().hex[:6]}"},
            "storage": {
                "backend": "clickhouse",
                "database": f"lat_{uuid.uuid4().hex[:6]}",
                "clickhouse": {"host": ch[0], "port": ch[1]},
            },
            "alerting": {"console": False},
        },
    )
    store = open_store(config.storage)
    store.migrate()
    latencies: list[float] = []
    original_write = store.write_batch

    def timed_write(batch: StoredBatch) -> None:
        original_write(batch)
        done = time.time()
        latencies.extend(done - record.ts for record in batch.events)

    store.write_batch = timed_write  # type: ignore[method-assign]
    with tempfile.TemporaryDirectory() as tmp:
        pipeline = Pipeline(
            config,
            store,
            FileDeadLetterSink(str(Path(tmp) / "dlq.jsonl")),
            build_alert_sinks(config),
            state=build_state_backend(config, store),
        )
        source = KafkaSource(
            config.kafka, on_assigned=pipeline.on_partitions_assigned, on_revoked=pipeline.on_partitions_revoked
        )
        runner = threading.Thread(target=pipeline.run, args=(source,), daemon=True)
        runner.start()
        time.sleep(5)  # joined the group
        # The producer runs in a process of its own: in this one it would take the worker's GIL.
        spawn = multiprocessing.get_context("spawn")
        sent = spawn.Value("q", 0)
        producer = spawn.Process(target=produce_at_rate, args=(bootstrap, topic, docs, rate, seconds, sent))
        producer.start()
        producer.join()
        time.sleep(5)
        source.stop()
        runner.join(timeout=60)
        source.close()
        database = config.storage.database
        pipeline.close()
    Client(host=ch[0], port=ch[1]).execute(f"DROP DATABASE IF EXISTS {database}")
    return np.asarray(latencies), sent.value / seconds


def produce_at_rate(
    bootstrap: str, topic: str, docs: list[dict[str, Any]], rate: float, seconds: float, sent_out: Any
) -> None:
    """Send ``rate`` records/s for ``seconds`` (as many as it can, if fewer), each with its ``ts`` set
    to its send time; the count sent goes to ``sent_out``. The records are encoded beforehand, without
    their ``ts``, which is spliced in at sending: JSON encoding at sending held the rate down."""
    bodies = [
        (str(doc["client_id"]).encode(), json.dumps({k: v for k, v in doc.items() if k != "ts"}).encode()[1:])
        for doc in docs
    ]
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=1)
    started = time.time()
    sent = 0
    while time.time() - started < seconds:
        key, body = bodies[sent % len(bodies)]
        producer.send(topic, key=key, value=b'{"ts":%r,' % time.time() + body)
        sent += 1
        time.sleep(max(0.0, started + sent / rate - time.time()))
    producer.flush()
    producer.close()
    sent_out.value = sent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=60_000)
    parser.add_argument(
        "--rates", default="800,4000", help="records/s produced in the latency runs, one run each (comma-separated)"
    )
    parser.add_argument("--seconds", type=float, default=20.0, help="length of the latency run")
    parser.add_argument("--kafka", default="127.0.0.1:19092")
    parser.add_argument("--clickhouse", default="127.0.0.1:19000")
    args = parser.parse_args()
    host, port = args.clickhouse.split(":")
    ch = (host, int(port))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "log.jsonl"
        clients = max(8, args.records // 400)
        write_simulation(SimulationPlan(benign_clients=clients, queries_per_client=400, malformed=20), str(path))
        lines = path.read_bytes().splitlines()
    print(f"log: {len(lines)} records, on a {PARTITIONS}-partition topic per run", file=sys.stderr)
    rates = {n: run_workers(n, args.kafka, lines, ch) for n in (1, 2, 3)}
    print(f"\n{'workers':<10} {'events/s (all)':>16} {'per worker':>12} {'vs 1 worker':>12}")
    for n, rate in rates.items():
        print(f"{n:<10} {rate:>16,.0f} {rate / n:>12,.0f} {rate / rates[1]:>11.2f}x", flush=True)
    print(f"\n{'latency (send → score queryable in ClickHouse)':<48} {'p50':>8} {'p99':>8} {'max':>8}")
    for rate in [float(r) for r in args.rates.split(",") if r.strip()]:
        latencies, achieved = measure_latency(args.kafka, ch, lines, rate, args.seconds)
        if len(latencies):
            p50, p99 = np.percentile(latencies, [50, 99]) * 1000
            top = latencies.max() * 1000
            title = f"at {achieved:,.0f} records/s ({len(latencies)} records)"
            print(f"{title:<48} {p50:>6.0f}ms {p99:>6.0f}ms {top:>6.0f}ms", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

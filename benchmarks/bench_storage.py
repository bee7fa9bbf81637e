"""Micro-benchmark: ``write_batch`` of N session scores, per backend.

    python benchmarks/bench_storage.py --backend chdb --path /tmp/pw-bench            # embedded
    python benchmarks/bench_storage.py --backend clickhouse --port 19000              # server

Writes into a throw-away database (dropped afterwards) and prints rows/s per run and the median.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
import uuid

from detectors.scores import SessionScore
from probewatch.config import ChdbConfig, ClickHouseServerConfig, StorageConfig
from storage import StoredBatch, open_store


def synthetic_scores(n: int, batch: int, seed: int = 1) -> list[SessionScore]:
    rng = random.Random(seed)
    now = time.time()
    kinds = ("extraction", "boundary_probing", "adversarial_input", "volume")
    signals = ("distinct_cells", "entropy", "margin_p10", "near_boundary", "rate", "novelty")
    return [
        SessionScore(
            model_id=f"model-{i % 4}",
            client_id=f"client-{i % 700}",
            session_id=f"session-{i}",
            event_time=now + i * 0.01,
            first_seen=now - 600,
            n_queries=batch * 50 + i % 50,
            client_queries=10_000 + i,
            score=rng.random(),
            kind_scores={k: rng.random() for k in kinds},
            signals={s: rng.random() * 100 for s in signals},
            reasons=[f"extraction: {i % 400} distinct cells in 400 queries; 97th percentile of clients is 40"],
            source_ips=["203.0.113.7", "198.51.100.23"],
            state_bytes=4096,
        )
        for i in range(n)
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=("chdb", "clickhouse"), default="chdb")
    parser.add_argument("--path", default="", help="chDB data directory (default: a temporary one)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=19000)
    parser.add_argument("--rows", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args(argv)

    database = f"pw_bench_{uuid.uuid4().hex[:8]}"
    path = args.path or tempfile.mkdtemp(prefix="pw-bench-")
    config = StorageConfig(
        backend=args.backend,
        database=database,
        chdb=ChdbConfig(path=path),
        clickhouse=ClickHouseServerConfig(host=args.host, port=args.port),
    )
    store = open_store(config)
    try:
        store.migrate()
        rates = []
        cpu_ms = []
        for run in range(args.repeat):
            scores = synthetic_scores(args.rows, run)
            started, cpu_started = time.perf_counter(), time.process_time()
            store.write_batch(StoredBatch(batch_id=f"bench-{run}", scores=scores))
            elapsed = time.perf_counter() - started
            cpu_ms.append((time.process_time() - cpu_started) * 1000)
            rates.append(args.rows / elapsed)
            print(f"run {run}: {args.rows} rows in {elapsed * 1000:.1f} ms = {rates[-1]:,.0f} rows/s")
        version = ".".join(map(str, store.server_version()))
        print(
            f"{args.backend} {version}: median {statistics.median(rates):,.0f} rows/s, best {max(rates):,.0f} "
            f"rows/s ({args.rows} rows/batch); this process's CPU per batch: median "
            f"{statistics.median(cpu_ms):.0f} ms"
        )
    finally:
        store.query(f"DROP DATABASE IF EXISTS {database}")
        store.close()


if __name__ == "__main__":
    main()

"""Memory per active session: the detector's state at 10k, 100k and 1M sessions (issue: a flat line).

Each session is a distinct client sending a handful of queries (8-dim input vector, 4-class
probabilities) to one model, all inside the inactivity gap, so every session stays open. Each
configuration runs in its own subprocess so the RSS figures do not share an allocator:

* ``detector``  — ``detectors.SessionDetector`` as a Kafka worker drives it (``take_checkpoint()``
  after every micro-batch; the checkpoint bytes are summed, per session);
* ``detector-nockpt`` — the same without checkpoints, as in a file run (``--input``);
* ``naive``     — the baseline a user would write first: per session, every query's vector, probs and
  timestamp kept in Python lists.

Reported per session: the detector's own accounting (``state_bytes() / sessions``), the real growth
of the process RSS (``/proc/self/statm``) divided by sessions, and the checkpoint size.

    PYTHONPATH=. python benchmarks/bench_memory.py                 # 10k, 100k, 1M
    PYTHONPATH=. python benchmarks/bench_memory.py --sessions 10000 100000 --queries 5
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from ingest.records import QueryRecord, SourcePosition

PAGE = os.sysconf("SC_PAGE_SIZE")
DIM = 8
CLASSES = 4
BATCH = 5000
T0 = 1.8e9


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE


def records(sessions: int, queries: int, seed: int = 1) -> Iterator[list[QueryRecord]]:
    """Micro-batches of about BATCH records; each client's queries are consecutive."""
    rng = np.random.default_rng(seed)
    clients_per_batch = max(1, BATCH // queries)
    offset = 0
    for first in range(0, sessions, clients_per_batch):
        count = min(clients_per_batch, sessions - first)
        vectors = rng.normal(size=(count * queries, DIM)).astype(np.float32)
        logits = rng.normal(size=(count * queries, CLASSES)).astype(np.float32)
        probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        batch = []
        for c in range(count):
            client = f"client-{first + c:07d}"
            for q in range(queries):
                i = c * queries + q
                p = probs[i]
                top = np.sort(p)
                batch.append(
                    QueryRecord(
                        ts=T0 + (first + c) * 0.001 + q * 0.0001,
                        client_id=client,
                        model_id="model-a",
                        position=SourcePosition("bench", 0, offset),
                        source_ip=f"10.{(first + c) >> 16 & 255}.{(first + c) >> 8 & 255}.{(first + c) & 255}",
                        vector=vectors[i],
                        probs=p,
                        label=str(int(p.argmax())),
                        confidence=float(top[-1]),
                        margin=float(top[-1] - top[-2]),
                    )
                )
                offset += 1
        yield batch


def run_detector(sessions: int, queries: int, checkpoint: bool) -> dict[str, Any]:
    from detectors.engine import POPULATION_PARTITION, SessionDetector

    # Warm up first (lazy imports, caches, numpy buffers), so they do not count as per-session memory.
    warm = SessionDetector()
    for batch in records(200, queries, seed=2):
        warm.process(batch)
    del warm
    detector = SessionDetector(inactivity_gap_s=10 * 365 * 86400.0, max_open_sessions=sessions + 1, min_queries=queries)
    gc.collect()
    before = rss_bytes()
    ckpt_bytes = 0
    population_bytes = 0
    started = time.perf_counter()
    for batch in records(sessions, queries):
        detector.process(batch)
        del batch
        if checkpoint:
            for partition, entries in detector.take_checkpoint().items():
                size = sum(len(k) + len(v) for k, v in entries.items() if v is not None)
                if partition == POPULATION_PARTITION:
                    population_bytes = size  # model-wide, rewritten each batch: count the latest once
                else:
                    ckpt_bytes += size
    elapsed = time.perf_counter() - started
    gc.collect()
    after = rss_bytes()
    open_sessions = len(detector.sessions)
    return {
        "sessions": open_sessions,
        "clients": len(detector.clients),
        "state_bytes": detector.state_bytes(),
        "rss_delta": after - before,
        "rss_total": after,
        "checkpoint_bytes": ckpt_bytes + population_bytes if checkpoint else None,
        "population_checkpoint_bytes": population_bytes if checkpoint else None,
        "seconds": elapsed,
    }


def run_naive(sessions: int, queries: int) -> dict[str, Any]:
    """What one writes first: a dict of sessions, each keeping every query in Python lists."""
    state: dict[tuple[str, str, str], dict[str, Any]] = {}
    gc.collect()
    before = rss_bytes()
    started = time.perf_counter()
    for batch in records(sessions, queries):
        for r in batch:
            s = state.setdefault(
                (r.model_id, r.client_id, ""),
                {"first_seen": r.ts, "last_seen": r.ts, "vectors": [], "probs": [], "ts": [], "ips": set()},
            )
            s["vectors"].append(r.vector.tolist())  # type: ignore[union-attr]
            s["probs"].append(r.probs.tolist())  # type: ignore[union-attr]
            s["ts"].append(r.ts)
            s["last_seen"] = r.ts
            if r.source_ip:
                s["ips"].add(r.source_ip)
        del batch
    elapsed = time.perf_counter() - started
    gc.collect()
    after = rss_bytes()
    return {
        "sessions": len(state),
        "clients": len(state),
        "state_bytes": None,
        "rss_delta": after - before,
        "rss_total": after,
        "checkpoint_bytes": None,
        "population_checkpoint_bytes": None,
        "seconds": elapsed,
    }


def child(args: argparse.Namespace) -> None:
    if args.impl == "naive":
        result = run_naive(args.child_sessions, args.queries)
    else:
        result = run_detector(args.child_sessions, args.queries, checkpoint=args.impl == "detector")
    print(json.dumps(result))


def fmt(value: float | None, unit: str = "") -> str:
    return "-" if value is None else f"{value:,.0f}{unit}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--sessions",
        type=int,
        nargs="+",
        default=[10_000, 100_000],
        help="session counts (1,000,000 takes about 2 h here)",
    )
    parser.add_argument("--queries", type=int, default=5, help="queries per session")
    parser.add_argument("--impl", nargs="+", default=["detector", "detector-nockpt", "naive"])
    parser.add_argument("--child-sessions", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--timeout", type=float, default=3600.0, help="per configuration, seconds")
    args = parser.parse_args()
    if args.child_sessions is not None:
        args.impl = args.impl[0]
        child(args)
        return
    print(f"{args.queries} queries per session, {DIM}-dim vectors, {CLASSES}-class probs, one model\n")
    header = (
        f"{'impl':<16} {'sessions':>10} {'state_bytes/s':>14} {'RSS Δ/s':>10} {'ckpt B/s':>9} "
        f"{'RSS total':>11} {'time s':>8}"
    )
    print(header)
    print("-" * len(header))
    for n in args.sessions:
        for impl in args.impl:
            cmd = [sys.executable, __file__, "--impl", impl, "--child-sessions", str(n), "--queries", str(args.queries)]
            try:
                out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, check=True)
            except subprocess.TimeoutExpired:
                print(f"{impl:<16} {n:>10,} timed out after {args.timeout:.0f} s")
                continue
            except subprocess.CalledProcessError as exc:
                print(f"{impl:<16} {n:>10,} failed: {exc.stderr.strip().splitlines()[-1:]}")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            s = r["sessions"] or 1
            state = r["state_bytes"] / s if r["state_bytes"] is not None else None
            ckpt = r["checkpoint_bytes"] / s if r["checkpoint_bytes"] is not None else None
            print(
                f"{impl:<16} {r['sessions']:>10,} {fmt(state):>14} {fmt(r['rss_delta'] / s):>10} {fmt(ckpt):>9} "
                f"{r['rss_total'] / 2**20:>9,.0f}Mi {r['seconds']:>8.1f}",
                flush=True,
            )


if __name__ == "__main__":
    main()

"""The benchmark scripts run, on tiny inputs, against the real services where they need them, and
print every row of their tables. The figures are not checked (tests are not timing checks; `make bench`
makes the figures): what is checked is that a script nobody runs in CI has not quietly stopped working."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from conftest import ROOT

RATE = r"[\d,]+"


def run_benchmark(script: str, *args: str, timeout: float = 300) -> str:
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 0, f"{script} exited {result.returncode}:\n{result.stderr[-4000:]}"
    return result.stdout


@pytest.fixture
def service_options(kafka_bootstrap: str, clickhouse_server: tuple[str, int]) -> tuple[str, ...]:
    """The options that point a benchmark at the test services."""
    host, port = clickhouse_server
    return ("--kafka", kafka_bootstrap, "--clickhouse", f"{host}:{port}")


def assert_rows(output: str, rows: dict[str, str]) -> None:
    """Each row's name followed by what it must print (a regular expression)."""
    for name, figures in rows.items():
        assert re.search(rf"^{re.escape(name)}\s+{figures}\s*$", output, re.MULTILINE), (name, output)


@pytest.mark.integration
def test_bench_pipeline_prints_every_row_beside_the_bare_consumer(service_options: tuple[str, ...]) -> None:
    output = run_benchmark(
        "bench_pipeline.py", "--records", "1500", "--repeat", "2", "--shapes", "long", *service_options
    )
    repeated = rf"{RATE}\s+{RATE}–{RATE}\s+\d+%"  # median, range of the rounds, share of the bare consumer
    assert_rows(
        output,
        {
            "bare kafka-python consumer (ceiling)": rf"{RATE}\s+{RATE}–{RATE}\s+100%",
            "consume + decode, no detection": repeated,
            "probewatch kafka → ClickHouse server": repeated,
            "  the same, exactly_once": repeated,
            "  the same, baselines per worker": repeated,
            "naive per-event River pipeline": rf"{RATE}\s+\d+%",  # measured once
            "probewatch file → chDB": repeated,
        },
    )
    stage = r"\d+\.\d"
    assert re.search(
        rf"^probewatch's batches, µs per record: decode {stage}, detect {stage}, store {stage}, commit {stage} ",
        output,
        re.MULTILINE,
    ), output


@pytest.mark.integration
def test_bench_scaling_prints_each_group_size_and_the_latency(service_options: tuple[str, ...]) -> None:
    output = run_benchmark(
        "bench_scaling.py", "--records", "1500", "--rates", "100", "--seconds", "2", *service_options
    )
    assert_rows(output, {str(n): rf"{RATE}\s+{RATE}\s+\d+\.\d\dx" for n in (1, 2, 3)})
    assert_rows(output, {"at 100 records/s": r"\(\d+ records\)\s+\d+ms\s+\d+ms\s+\d+ms"})


def test_bench_memory_prints_the_detector_beside_the_naive_state() -> None:
    output = run_benchmark("bench_memory.py", "--sessions", "500", "--queries", "20")
    # sessions, state bytes per session (none for the naive dicts), RSS per session, checkpoint bytes
    # per session (none without checkpoints), RSS in all, seconds
    maybe = rf"(?:{RATE}|-)"
    row = rf"500\s+{maybe}\s+{RATE}\s+{maybe}\s+\S+\s+[\d.]+"
    assert_rows(output, {"detector": row, "detector-nockpt": row, "naive": row})


@pytest.mark.integration
@pytest.mark.parametrize("backend", ["chdb", "clickhouse"])
def test_bench_storage_prints_the_insert_rate(backend: str, clickhouse_server: tuple[str, int]) -> None:
    host, port = clickhouse_server
    output = run_benchmark(
        "bench_storage.py", "--backend", backend, "--host", host, "--port", str(port), "--rows", "500", "--repeat", "2"
    )
    assert re.search(rf"median {RATE} rows/s, best {RATE} rows/s \(500 rows/batch\)", output), output


def test_bench_detection_prints_a_trace_and_the_total() -> None:
    output = run_benchmark("bench_detection.py", "--only", "faults", "--workers", "1")
    row = r"1\s+\d+/\d+\s+\d+\s+\d+\s+\d+/\d+\s+" + RATE
    assert_rows(output, {"faults": row})
    assert re.search(r"^total\s+1\s+\d+/\d+\s+\d+/\d+\s*$", output, re.MULTILINE), output

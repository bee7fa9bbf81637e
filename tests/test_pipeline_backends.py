"""The same file run on the embedded chDB backend and on clickhouse-server stores the same results."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from clickhouse_driver import Client

from probewatch.app import RunSummary
from probewatch.config import load_config
from probewatch.simulate import SimulationPlan, write_simulation
from probewatch.wiring import build_and_run
from storage import open_store

SCORE_COLUMNS = (
    "model_id, client_id, session_id, n_queries, client_queries, round(score, 9), top_kind, closed, crossed_kinds"
)
ALERT_COLUMNS = "alert_id, dedup_key, status, kind, client_id, severity, n_queries, event_ts"


@pytest.fixture(scope="module")
def log_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("backends") / "logs.jsonl.gz"
    write_simulation(
        SimulationPlan(benign_clients=10, attackers_per_kind=2, queries_per_client=150, malformed=6),
        str(path),
    )
    return path


def run_file(
    log_file: Path, tmp_path: Path, storage: dict[str, Any]
) -> tuple[RunSummary, dict[str, list[tuple[Any, ...]]]]:
    config = load_config(environ={}, overrides={"storage": storage, "alerting": {"console": False}})
    summary = build_and_run(config, input_path=str(log_file), dlq_path=str(tmp_path / f"{config.storage.backend}.dlq"))
    store = open_store(config.storage)
    try:
        db = config.storage.database
        tables = {
            "scores": store.query(
                f"SELECT {SCORE_COLUMNS} FROM {db}.session_scores FINAL "
                "ORDER BY model_id, client_id, session_id, n_queries"
            ),
            "alerts": store.query(f"SELECT {ALERT_COLUMNS} FROM {db}.alerts FINAL ORDER BY alert_id"),
        }
    finally:
        store.close()
    return summary, tables


@pytest.fixture
def server_database(clickhouse_server: tuple[str, int], unique_name: Any) -> Iterator[str]:
    name = unique_name("pw_backend")
    yield name
    host, port = clickhouse_server
    Client(host=host, port=port).execute(f"DROP DATABASE IF EXISTS {name}")


@pytest.mark.integration
def test_chdb_and_clickhouse_server_store_the_same_results(
    log_file: Path, tmp_path: Path, clickhouse_server: tuple[str, int], server_database: str
) -> None:
    host, port = clickhouse_server
    embedded_summary, embedded = run_file(
        log_file, tmp_path, {"backend": "chdb", "chdb": {"path": str(tmp_path / "chdb")}}
    )
    server_summary, server = run_file(
        log_file,
        tmp_path,
        {"backend": "clickhouse", "database": server_database, "clickhouse": {"host": host, "port": port}},
    )
    assert embedded_summary.records_read == server_summary.records_read > 0
    assert embedded_summary.dead_lettered == server_summary.dead_lettered == 6
    assert embedded["scores"] and embedded["alerts"]
    assert embedded["scores"] == server["scores"]
    assert embedded["alerts"] == server["alerts"]


def test_file_run_is_repeatable_and_idempotent(log_file: Path, tmp_path: Path) -> None:
    """Running the same file twice into the same store adds no rows: replays collapse."""
    storage = {"backend": "chdb", "chdb": {"path": str(tmp_path / "chdb")}}
    first_summary, first = run_file(log_file, tmp_path, storage)
    _, second = run_file(log_file, tmp_path, storage)
    assert first == second
    assert first_summary.alerts > 0
    dlq_lines = (tmp_path / "chdb.dlq").read_text().splitlines()
    assert len(dlq_lines) == 2 * 6  # a file run dead-letters every bad line, every time it runs

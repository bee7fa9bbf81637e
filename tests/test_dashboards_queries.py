"""Every panel query of every dashboard, expanded the way the ClickHouse plugin expands it, runs on real
ClickHouse — embedded chDB and the clickhouse-server (18.16) of deploy/local — over the data of a real
pipeline run (`probewatch run --input <simulated log>`), and returns what its panel type draws.

Both the run and the check go through the CLI in a subprocess (`probewatch run`, `probewatch dashboards
check --json`), as a user would, which also keeps chDB's one-directory-per-process rule out of pytest.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from clickhouse_driver import Client

from dashboards.definitions import all_dashboards
from probewatch.simulate import SimulationPlan, write_simulation

ROOT = Path(__file__).resolve().parents[1]

# Panels whose data a file run does not produce: checkpoints are written by Kafka runs only, and
# delivery states only by the alert receivers (not by the console / JSON-lines sinks of a file run).
EMPTY_IN_FILE_RUN = {
    ("probewatch-pipeline", "Checkpointed position per partition"),
    ("probewatch-pipeline", "Alert deliveries"),
    ("probewatch-pipeline", "Failed alert deliveries"),
}


def _env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROBEWATCH__")}
    env.pop("PROBEWATCH_CONFIG", None)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    # Small micro-batches give the time series several points per session.
    env.update({"PROBEWATCH__FILE__BATCH_MAX_RECORDS": "250", "PROBEWATCH__STORAGE__RAW_SAMPLE_RATE": "0.1"})
    env.update(extra)
    return env


def _cli(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "probewatch", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


@pytest.fixture(scope="module")
def sim_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sim") / "sim.jsonl.gz"
    plan = SimulationPlan(benign_clients=12, attackers_per_kind=1, queries_per_client=200, malformed=20, seed=7)
    write_simulation(plan, str(out), None)
    return out


def run_and_check(sim_log: Path, workdir: Path, env_extra: dict[str, str]) -> list[dict[str, Any]]:
    env = _env(env_extra)
    run = _cli(["run", "--input", str(sim_log), "--quiet", "--log-level", "WARNING"], env, workdir)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "alerts        : 0\n" not in run.stdout, run.stdout  # the demo data raises alerts
    check = _cli(["dashboards", "check", "--json", "--log-level", "WARNING"], env, workdir)
    results = [json.loads(line) for line in check.stdout.splitlines() if line.startswith("{")]
    assert results, check.stderr[-3000:]
    failing = [r for r in results if r["error"] or r["problems"]]
    assert not failing, json.dumps(failing, indent=1)[:6000]
    assert check.returncode == 0, check.stderr[-3000:]
    return results


def assert_complete(results: list[dict[str, Any]]) -> dict[tuple[str, str, str], int]:
    expected = {(d.uid, p.title, q.ref_id) for d in all_dashboards() for p in d.panels for q in p.queries}
    counts = {(r["dashboard"], r["panel"], r["ref_id"]): r["rows"] for r in results}
    assert set(counts) == expected
    for (uid, panel, _), rows in counts.items():
        if (uid, panel) not in EMPTY_IN_FILE_RUN:
            assert rows > 0, f"{uid} / {panel} returned no rows on a pipeline run that produces its data"
    print("\n".join(f"{rows:6d}  {uid} / {panel} [{ref}]" for (uid, panel, ref), rows in sorted(counts.items())))
    return counts


def test_every_panel_query_runs_on_chdb(sim_log: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    results = run_and_check(
        sim_log, tmp_path, {"PROBEWATCH__STORAGE__BACKEND": "chdb", "PROBEWATCH__STORAGE__CHDB__PATH": str(data)}
    )
    counts = assert_complete(results)
    assert counts[("probewatch-overview", "Top suspicious clients", "A")] >= 2


@pytest.mark.integration
def test_every_panel_query_runs_on_clickhouse_server(
    sim_log: Path, tmp_path: Path, clickhouse_server: tuple[str, int], unique_name: Any
) -> None:
    host, port = clickhouse_server
    database = unique_name("dashq")
    try:
        results = run_and_check(
            sim_log,
            tmp_path,
            {
                "PROBEWATCH__STORAGE__BACKEND": "clickhouse",
                "PROBEWATCH__STORAGE__DATABASE": database,
                "PROBEWATCH__STORAGE__CLICKHOUSE__HOST": host,
                "PROBEWATCH__STORAGE__CLICKHOUSE__PORT": str(port),
            },
        )
        counts = assert_complete(results)
        assert counts[("probewatch-overview", "Top suspicious clients", "A")] >= 2
        # The SQL really was the 18.16 server's: it names the test database and the plugin's expansions.
        assert all(database in r["sql"] or "system.events" in r["sql"] for r in results)
    finally:
        client = Client(host, port=port)
        client.execute(f"DROP DATABASE IF EXISTS {database}")
        client.disconnect()


@pytest.mark.integration
def test_time_interval_macro_is_not_for_18_16(clickhouse_server: tuple[str, int]) -> None:
    """Why the panels bucket time with $__interval_s arithmetic instead of $__timeInterval: the plugin
    expands $__timeInterval to toStartOfInterval, which ClickHouse 18.16 does not have."""
    from datetime import UTC, datetime

    from dashboards.macros import QueryContext, render, time_bucket

    ctx = QueryContext(datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 1, 2, tzinfo=UTC), 300)
    client = Client(*clickhouse_server)
    try:
        version = client.execute("SELECT version()")[0][0]
        bucket = render(f"SELECT {time_bucket('toDateTime(1767225899)')}", ctx)
        assert client.execute(bucket)[0][0] == datetime(2026, 1, 1, 0, 0)  # 00:04:59 -> 00:00
        if version.startswith("18."):
            with pytest.raises(Exception, match="toStartOfInterval"):
                client.execute(render("SELECT $__timeInterval(now())", ctx))
    finally:
        client.disconnect()

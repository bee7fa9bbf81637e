"""Fault tests on real services: a worker killed among three, ClickHouse down for a while, a broker
restart, a rolling restart. In each, every record ends up scored exactly once and no session restarts."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import msgspec
import pytest
from pipeline_helpers import (
    Scenario,
    Worker,
    check_results,
    committed_dead_letters,
    finish,
    kill_one_worker_mid_stream,
    log_tail,
    produce,
    progress,
    topic_values,
    wait_until,
)

pytestmark = pytest.mark.integration


def test_kill_one_of_three_workers(
    pipeline_env: dict[str, str], scenario: Scenario, kafka_bootstrap: str, tmp_path: Path
) -> None:
    kill_one_worker_mid_stream(pipeline_env, scenario, kafka_bootstrap, tmp_path / "workers.log", workers=3)
    check_results(pipeline_env, scenario)  # includes: no session restarted from zero
    # The workers shared their population baselines: the population log holds each one's evidence.
    topic, group = pipeline_env["PROBEWATCH__KAFKA__TOPIC"], pipeline_env["PROBEWATCH__KAFKA__GROUP_ID"]
    contributions = topic_values(kafka_bootstrap, f"{topic}.{group}.population")
    contributors = Counter(msgspec.msgpack.decode(value)["contributor"] for value in contributions)
    assert len(contributors) >= 2, contributors  # at least the two survivors'


@pytest.mark.parametrize("guarantee", ["at_least_once", "exactly_once"])
def test_clickhouse_outage_pauses_and_resumes(
    pipeline_env: dict[str, str],
    scenario: Scenario,
    kafka_bootstrap: str,
    tmp_path: Path,
    services_ctl: Callable[..., object],
    guarantee: str,
) -> None:
    log = tmp_path / "worker.log"
    env = {**pipeline_env, "PROBEWATCH__KAFKA__PROCESSING_GUARANTEE": guarantee}
    produce(kafka_bootstrap, env["PROBEWATCH__KAFKA__TOPIC"], scenario)
    worker = Worker(env, log)
    done = progress(kafka_bootstrap, env)
    wait_until(lambda: done() > 0, 180, "a first commit")
    services_ctl("clickhouse", "stop")
    try:
        time.sleep(3)
        stalled = done()
        time.sleep(5)
        assert done() == stalled, "offsets were committed while ClickHouse was down"
        assert worker.proc.poll() is None, "the worker died instead of waiting for storage"
    finally:
        services_ctl("clickhouse", "start")
    finish([worker], done, len(scenario.lines), log)
    check_results(env, scenario)
    assert "storage write failed" in log.read_text()
    if guarantee == "exactly_once":
        # The write is retried before the batch's transaction begins: no transaction is left open
        # (or timed out) while storage is down, and each dead letter is committed once.
        assert committed_dead_letters(kafka_bootstrap, env["PROBEWATCH__KAFKA__TOPIC"]) == sorted(scenario.malformed)


@pytest.mark.parametrize("guarantee", ["at_least_once", "exactly_once"])
def test_broker_restart_then_rolling_restart(
    pipeline_env: dict[str, str],
    scenario: Scenario,
    kafka_bootstrap: str,
    tmp_path: Path,
    services_ctl: Callable[..., object],
    guarantee: str,
) -> None:
    log = tmp_path / "workers.log"
    env = {**pipeline_env, "PROBEWATCH__KAFKA__PROCESSING_GUARANTEE": guarantee}
    topic = env["PROBEWATCH__KAFKA__TOPIC"]
    half = len(scenario.lines) // 2
    produce(kafka_bootstrap, topic, scenario, slice(None, half))
    workers = [Worker(env, log) for _ in range(2)]
    done = progress(kafka_bootstrap, env)
    wait_until(lambda: done() > 0, 180, "a first commit")
    services_ctl("kafka", "restart")
    # Rolling restart under load: the second half arrives while each worker in turn is stopped
    # gracefully and replaced.
    feeder = threading.Thread(target=produce, args=(kafka_bootstrap, topic, scenario, slice(half, None)))
    feeder.start()
    for i in range(len(workers)):
        time.sleep(3)
        dead = [w.proc.returncode for w in workers if w.proc.poll() is not None]
        assert not dead, f"workers exited with {dead}:\n" + log_tail(log)
        assert workers[i].stop() == 0, log_tail(log)
        workers[i] = Worker(env, log)
        workers[i].wait_ready()  # a rolling restart waits for readiness before the next step
    feeder.join()
    finish(workers, done, len(scenario.lines), log)
    check_results(env, scenario)
    if guarantee == "exactly_once":
        # A transaction open across the broker restart is aborted under its producer; the worker
        # replaces the producer and processes the batch again: each dead letter is committed once.
        assert committed_dead_letters(kafka_bootstrap, topic) == sorted(scenario.malformed)

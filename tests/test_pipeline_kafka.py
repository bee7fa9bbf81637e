"""End to end on real services: Kafka topic → probewatch workers → ClickHouse server, DLQ topic, offsets."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
from conftest import SecuredKafka
from kafka.partitioner.default import murmur2
from pipeline_helpers import (
    PARTITIONS,
    Scenario,
    Worker,
    check_dead_letters,
    check_results,
    clickhouse_client,
    committed_total,
    dlq_documents,
    finish,
    firing_clients,
    group_formed,
    population_shared,
    produce,
    progress,
    topic_values,
    wait_until,
)

from probewatch.simulate import SimulationPlan, write_simulation

pytestmark = pytest.mark.integration


def test_kafka_to_clickhouse_with_dlq_and_offsets(
    pipeline_env: dict[str, str], scenario: Scenario, kafka_bootstrap: str, tmp_path: Path
) -> None:
    topic = pipeline_env["PROBEWATCH__KAFKA__TOPIC"]
    produce(kafka_bootstrap, topic, scenario)
    worker = Worker(pipeline_env, tmp_path / "worker.log")
    done = progress(kafka_bootstrap, pipeline_env)
    finish([worker], done, len(scenario.lines), tmp_path / "worker.log", population_shared(worker))
    client = check_results(pipeline_env, scenario)
    check_dead_letters(kafka_bootstrap, topic, scenario)
    alerts = [
        json.loads(line) for line in Path(pipeline_env["PROBEWATCH__ALERTING__JSONL_PATH"]).read_text().splitlines()
    ]
    assert {
        "client_id",
        "model_id",
        "kind",
        "score",
        "severity",
        "n_queries",
        "event_time",
        "reasons",
    } <= set(alerts[0])
    # Every stored alert reached the receiver before the worker exited (graceful shutdown drains).
    db = pipeline_env["PROBEWATCH__STORAGE__DATABASE"]
    stored = {row[0] for row in client.execute(f"SELECT alert_id FROM {db}.alerts FINAL")}
    assert {a["alert_id"] for a in alerts} == stored


@pytest.mark.parametrize(
    ("protocol", "mechanism"),
    [("SASL_PLAINTEXT", "PLAIN"), ("SASL_SSL", "SCRAM-SHA-512"), ("SSL", "")],
)
def test_a_worker_runs_through_an_authenticated_listener(
    protocol: str,
    mechanism: str,
    pipeline_env: dict[str, str],
    scenario: Scenario,
    kafka_bootstrap: str,
    secured_kafka: SecuredKafka,
    tmp_path: Path,
) -> None:
    """The worker knows only the listener that wants TLS and/or SASL: its consumer, dead-letter
    producer, changelog and population log all connect through it (the test reads and writes the
    topics through the plain listener)."""
    topic = pipeline_env["PROBEWATCH__KAFKA__TOPIC"]
    produce(kafka_bootstrap, topic, scenario)
    worker = Worker({**pipeline_env, **secured_kafka.env(protocol, mechanism)}, tmp_path / "worker.log")
    finish(
        [worker],
        progress(kafka_bootstrap, pipeline_env),
        len(scenario.lines),
        tmp_path / "worker.log",
        population_shared(worker),
    )
    check_results(pipeline_env, scenario)
    check_dead_letters(kafka_bootstrap, topic, scenario)
    changelog = f"{topic}.{pipeline_env['PROBEWATCH__KAFKA__GROUP_ID']}.changelog"
    assert topic_values(kafka_bootstrap, changelog)  # the checkpoints went through the listener too


def test_kill_and_restart_loses_nothing_and_stores_nothing_twice(
    pipeline_env: dict[str, str], scenario: Scenario, kafka_bootstrap: str, tmp_path: Path
) -> None:
    topic = pipeline_env["PROBEWATCH__KAFKA__TOPIC"]
    group = pipeline_env["PROBEWATCH__KAFKA__GROUP_ID"]
    produce(kafka_bootstrap, topic, scenario)
    first = Worker(pipeline_env, tmp_path / "worker.log")
    wait_until(lambda: committed_total(kafka_bootstrap, group, topic, 3) > 0, 120, "a first commit")
    first.stop(signal.SIGKILL)  # mid-stream, no chance to clean up
    done_before = committed_total(kafka_bootstrap, group, topic, 3)
    assert done_before < len(scenario.lines), "the worker finished before it could be killed; make the batches smaller"
    second = Worker(pipeline_env, tmp_path / "worker.log")
    finish([second], progress(kafka_bootstrap, pipeline_env), len(scenario.lines), tmp_path / "worker.log")
    check_results(pipeline_env, scenario)
    payloads = {str(d["payload"]).encode() for d in dlq_documents(kafka_bootstrap, topic)}
    assert payloads == set(scenario.malformed)  # at-least-once: a replay may repeat a dead letter, never lose one


def test_keys_of_one_network_on_three_workers_alert_once_as_their_group(
    pipeline_env: dict[str, str], kafka_bootstrap: str, tmp_path: Path
) -> None:
    """KnockoffNets split over 6 API keys of one /24, which Kafka's partitioner puts 2 to a partition:
    no worker of three sees the 3 suspicious keys a group needs. The workers share their groups
    through the population log, so the network is alerted: once, by one of them."""
    keys = [f"knoc-sybil-00-key{k}".encode() for k in range(6)]
    assert sorted((murmur2(key) & 0x7FFFFFFF) % PARTITIONS for key in keys) == [0, 0, 1, 1, 2, 2]
    plan = SimulationPlan(
        benign_clients=60, queries_per_client=150, attacks=("knockoff",), modes=("sybil",), sybil_keys=6, use_art="no"
    )
    write_simulation(plan, str(tmp_path / "logs.jsonl"), str(tmp_path / "truth.jsonl"))
    scenario = Scenario(tmp_path / "logs.jsonl", tmp_path / "truth.jsonl")
    (network,) = {
        f"net:{str(doc['source_ip']).rsplit('.', 1)[0]}.0/24"
        for doc in scenario.valid
        if str(doc["client_id"]).encode() in keys
    }
    log = tmp_path / "workers.log"
    workers = [Worker(pipeline_env, log) for _ in range(3)]
    group = pipeline_env["PROBEWATCH__KAFKA__GROUP_ID"]
    wait_until(group_formed(kafka_bootstrap, group, 3), 120, "3 workers each holding a partition")
    produce(kafka_bootstrap, pipeline_env["PROBEWATCH__KAFKA__TOPIC"], scenario)
    client, db = clickhouse_client(pipeline_env), pipeline_env["PROBEWATCH__STORAGE__DATABASE"]
    finish(
        workers,
        progress(kafka_bootstrap, pipeline_env),
        len(scenario.lines),
        log,
        lambda: network in firing_clients(client, db),
    )
    sent = [
        json.loads(line) for line in Path(pipeline_env["PROBEWATCH__ALERTING__JSONL_PATH"]).read_text().splitlines()
    ]
    opened = [
        (a["client_id"], a["kind"]) for a in sent if a["client_id"].startswith("net:") and a["notification"] == "new"
    ]
    assert opened == [(network, "extraction")], opened
    # Each worker placed its epochs by its partition of the topic's three (see ModelPopulation.count).
    assert log.read_text().count("this worker reads 1 of the topic's 3 partitions") >= 3


def test_an_open_group_incident_moves_to_the_worker_that_takes_its_home_partition(
    pipeline_env: dict[str, str], kafka_bootstrap: str, tmp_path: Path
) -> None:
    """A worker pages a network of KnockoffNets keys and stops; another takes its partitions over.
    When a sixth key of the network joins, the group is judged again, above the threshold, by the
    new owner of its home partition: the incident it restored from the outbox goes on, and the
    network is not paged a second time."""
    late = "knoc-sybil-00-key5"
    plan = SimulationPlan(
        benign_clients=60, queries_per_client=150, attacks=("knockoff",), modes=("sybil",), sybil_keys=6, use_art="no"
    )
    write_simulation(plan, str(tmp_path / "logs.jsonl"), str(tmp_path / "truth.jsonl"))
    phases: tuple[list[bytes], list[bytes]] = ([], [])
    for line in (tmp_path / "logs.jsonl").read_bytes().splitlines():
        phases[f'"client_id":"{late}"'.encode() in line.replace(b" ", b"")].append(line)
    assert phases[1], "the simulation has no records of the late key"
    for i, lines in enumerate(phases):
        (tmp_path / f"phase{i}.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    first, second = (Scenario(tmp_path / f"phase{i}.jsonl", tmp_path / "truth.jsonl") for i in range(2))
    (network,) = {
        f"net:{str(doc['source_ip']).rsplit('.', 1)[0]}.0/24"
        for doc in first.valid
        if str(doc["client_id"]).startswith("knoc-sybil")
    }
    client, db = clickhouse_client(pipeline_env), pipeline_env["PROBEWATCH__STORAGE__DATABASE"]
    topic, log = pipeline_env["PROBEWATCH__KAFKA__TOPIC"], tmp_path / "workers.log"

    def group_queries() -> tuple[int, float]:
        """The network's largest query count scored, and the best score at it."""
        rows = client.execute(
            f"SELECT n_queries, max(score) FROM {db}.session_scores WHERE client_id = %(net)s"
            " GROUP BY n_queries ORDER BY n_queries DESC LIMIT 1",
            {"net": network},
        )
        return (int(rows[0][0]), float(rows[0][1])) if rows else (0, 0.0)

    produce(kafka_bootstrap, topic, first)
    done = progress(kafka_bootstrap, pipeline_env)
    finish([Worker(pipeline_env, log)], done, len(first.lines), log, lambda: network in firing_clients(client, db))
    paged_at = group_queries()[0]
    produce(kafka_bootstrap, topic, second)

    def judged_again() -> bool:
        return group_queries()[0] > paged_at

    finish([Worker(pipeline_env, log)], done, len(first.lines) + len(second.lines), log, judged_again)
    assert group_queries()[1] >= 0.8, "the group was judged again below the threshold: nothing to page"
    sent = [
        json.loads(line) for line in Path(pipeline_env["PROBEWATCH__ALERTING__JSONL_PATH"]).read_text().splitlines()
    ]
    assert [a["notification"] for a in sent if a["client_id"] == network][:1] == ["new"]
    assert [a["notification"] for a in sent if a["client_id"] == network].count("new") == 1, sent

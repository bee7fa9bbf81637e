"""Shared fixtures for the integration tests: the real local services of deploy/local/.

Kafka, ClickHouse and Alertmanager are started by ``make services-up`` (``make test`` does it
itself). Tests that need a service that does not answer FAIL with the command to start it;
they never skip.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from clickhouse_driver import Client
from kafka import KafkaAdminClient
from kafka.admin import NewTopic

from ingest.sources import kafka_security_options
from probewatch.config import KafkaConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
LOCAL = ROOT / "deploy" / "local"
START_HINT = "start the local services with `make services-up` (or `deploy/local/services.sh up`)"

KAFKA = os.environ.get("PROBEWATCH_TEST_KAFKA", "127.0.0.1:19092")
CLICKHOUSE = os.environ.get("PROBEWATCH_TEST_CLICKHOUSE", "127.0.0.1:19000")
ALERTMANAGER = os.environ.get("PROBEWATCH_TEST_ALERTMANAGER", "http://127.0.0.1:19093").rstrip("/")
WEBHOOK_PORT = int(os.environ.get("PROBEWATCH_TEST_WEBHOOK_PORT", "19080"))

SERVICES = ("kafka", "clickhouse", "alertmanager")

# The broker's authenticated listeners and their test credentials (deploy/local/kafka.sh).
KAFKA_LISTENERS = {
    "SASL_PLAINTEXT": os.environ.get("PROBEWATCH_TEST_KAFKA_SASL", "127.0.0.1:19095"),
    "SASL_SSL": os.environ.get("PROBEWATCH_TEST_KAFKA_SASL_SSL", "127.0.0.1:19096"),
    "SSL": os.environ.get("PROBEWATCH_TEST_KAFKA_SSL", "127.0.0.1:19097"),
}
# The local CA and certificates of the services' TLS listeners (deploy/local/lib.sh: ensure_test_certs).
LOCAL_TLS = Path(
    os.environ.get(
        "PROBEWATCH_TEST_TLS",
        Path(os.environ.get("PROBEWATCH_RUN_DIR", Path.home() / ".cache" / "probewatch" / "run")) / "tls",
    )
)
# The test user of the broker's SASL listeners and of ClickHouse (deploy/local/kafka.sh, clickhouse/users.xml).
TEST_USER, TEST_PASSWORD = "probewatch", "probewatch-local-secret"
CLICKHOUSE_SECURE = os.environ.get("PROBEWATCH_TEST_CLICKHOUSE_SECURE", "127.0.0.1:19440")

# Fixtures of the end-to-end pipeline tests (scenario, pipeline_env), shared by several test files.
pytest_plugins = ("pipeline_helpers",)


def unique_name(prefix: str) -> str:
    """A name that no other test (or test run) uses, valid as a Kafka topic and a ClickHouse
    database/table name: ``<prefix>_<pid>_<8 hex>``, lower case, ``[a-z0-9_]`` only."""
    clean = re.sub(r"[^a-z0-9_]", "_", prefix.lower()) or "t"
    return f"{clean}_{os.getpid()}_{uuid.uuid4().hex[:8]}"


@pytest.fixture(name="unique_name")
def unique_name_fixture() -> Callable[[str], str]:
    return unique_name


def _require(service: str, address: str, probe: Callable[[], object]) -> None:
    """Run ``probe``; when it raises, FAIL the test (never skip) saying how to start the service."""
    try:
        probe()
    except Exception as error:
        problem = f"{type(error).__name__}: {error}"
    else:
        return
    # Outside the except block, so the report is this message and not a chain of tracebacks.
    pytest.fail(
        f"{service} is not answering at {address} ({problem}). "
        f"The integration tests need the real local {service}: {START_HINT}.",
        pytrace=False,
    )


def kafka_admin(bootstrap: str, timeout_ms: int = 10_000, **options: Any) -> KafkaAdminClient:
    """A kafka-python KafkaAdminClient with short timeouts (works with kafka-python 2.x and 3.x)."""
    config: dict[str, Any] = {
        "bootstrap_servers": bootstrap,
        "request_timeout_ms": timeout_ms,
        "client_id": "probewatch-tests",
        **options,
    }
    if "bootstrap_timeout_ms" in KafkaAdminClient.DEFAULT_CONFIG:  # kafka-python >= 3
        config["bootstrap_timeout_ms"] = timeout_ms
    else:
        config["api_version_auto_timeout_ms"] = timeout_ms
    return KafkaAdminClient(**config)


@pytest.fixture(scope="session")
def kafka_bootstrap() -> str:
    """``host:port`` of the real Kafka broker (deploy/local/kafka.sh)."""

    def probe() -> None:
        admin = kafka_admin(KAFKA, timeout_ms=5_000)
        try:
            admin.list_topics()
        finally:
            admin.close()

    _require("Kafka", KAFKA, probe)
    return KAFKA


class SecuredKafka:
    """The broker's authenticated listeners, as the ``PROBEWATCH__KAFKA__…`` settings of a worker."""

    def env(self, protocol: str, mechanism: str = "PLAIN", password: str = TEST_PASSWORD) -> dict[str, str]:
        """A worker's Kafka settings for the listener of ``protocol``: SASL with ``mechanism``, TLS
        trusting the local CA, and on the SSL listener (client certificates required) the client's."""
        env = {"PROBEWATCH__KAFKA__BOOTSTRAP_SERVERS": KAFKA_LISTENERS[protocol]}
        env["PROBEWATCH__KAFKA__SECURITY_PROTOCOL"] = protocol
        if protocol.startswith("SASL"):
            env["PROBEWATCH__KAFKA__SASL__MECHANISM"] = mechanism
            env["PROBEWATCH__KAFKA__SASL__USERNAME"] = TEST_USER
            env["PROBEWATCH__KAFKA__SASL__PASSWORD"] = password
        if protocol.endswith("SSL"):
            env["PROBEWATCH__KAFKA__SSL_CAFILE"] = str(LOCAL_TLS / "ca.pem")
        if protocol == "SSL":
            env["PROBEWATCH__KAFKA__SSL_CERTFILE"] = str(LOCAL_TLS / "client.pem")
            env["PROBEWATCH__KAFKA__SSL_KEYFILE"] = str(LOCAL_TLS / "client.key")
        return env


@pytest.fixture(scope="session")
def secured_kafka(kafka_bootstrap: str) -> SecuredKafka:
    """The authenticated listeners of the real broker, each probed with its credentials."""
    secured = SecuredKafka()
    for protocol, address in KAFKA_LISTENERS.items():
        config = load_config(environ=secured.env(protocol), overrides={"source": "kafka"}).kafka

        def probe(config: KafkaConfig = config) -> None:
            kafka_admin(config.bootstrap_servers, timeout_ms=5_000, **kafka_security_options(config)).close()

        _require(f"Kafka's {protocol} listener", address, probe)
    return secured


@pytest.fixture(scope="session")
def secured_clickhouse(clickhouse_server: tuple[str, int]) -> dict[str, str]:
    """The ClickHouse server's native port over TLS, as a worker's ``PROBEWATCH__STORAGE__…``
    settings: the test user with its password, trusting the local CA (probed with them)."""
    host, _, port = CLICKHOUSE_SECURE.rpartition(":")
    env = {
        "PROBEWATCH__STORAGE__BACKEND": "clickhouse",
        "PROBEWATCH__STORAGE__CLICKHOUSE__HOST": host,
        "PROBEWATCH__STORAGE__CLICKHOUSE__PORT": port,
        "PROBEWATCH__STORAGE__CLICKHOUSE__SECURE": "true",
        "PROBEWATCH__STORAGE__CLICKHOUSE__CA_CERTS": str(LOCAL_TLS / "ca.pem"),
        "PROBEWATCH__STORAGE__CLICKHOUSE__USER": TEST_USER,
        "PROBEWATCH__STORAGE__CLICKHOUSE__PASSWORD": TEST_PASSWORD,
    }

    options = {"user": TEST_USER, "password": TEST_PASSWORD, "secure": True, "ca_certs": str(LOCAL_TLS / "ca.pem")}
    _require("ClickHouse's TLS port", CLICKHOUSE_SECURE, lambda: _select_one(host, int(port), **options))
    return env


def _select_one(host: str, port: int, **options: Any) -> None:
    """``SELECT 1`` on a new connection to the ClickHouse server, with short timeouts."""
    client = Client(host, port=port, connect_timeout=5, send_receive_timeout=10, **options)
    try:
        client.execute("SELECT 1")
    finally:
        client.disconnect()


@pytest.fixture(scope="session")
def clickhouse_server() -> tuple[str, int]:
    """``(host, native port)`` of the real ClickHouse server (deploy/local/clickhouse.sh)."""
    host, _, port = CLICKHOUSE.rpartition(":")
    address = (host or "127.0.0.1", int(port))
    _require("ClickHouse", CLICKHOUSE, lambda: _select_one(*address))
    return address


@pytest.fixture(scope="session")
def alertmanager_url() -> str:
    """Base URL of the real Alertmanager (deploy/local/alertmanager.sh)."""
    _require(
        "Alertmanager",
        ALERTMANAGER,
        lambda: requests.get(f"{ALERTMANAGER}/-/ready", timeout=5).raise_for_status(),
    )
    return ALERTMANAGER


@pytest.fixture(scope="session")
def webhook_port() -> int:
    """Port of the webhook receiver that Alertmanager sends to (the tests run the receiver)."""
    return WEBHOOK_PORT


def wait_for_topic(admin: KafkaAdminClient, name: str, partitions: int, timeout: float = 30.0) -> None:
    """Block until every partition of ``name`` has a leader."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            described = admin.describe_topics([name])
            parts = described[0].get("partitions", []) if described else []
            if (
                not described[0].get("error_code")
                and len(parts) == partitions
                and all(p.get("leader", p.get("leader_id", -1)) >= 0 for p in parts)
            ):
                return
        except Exception:
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            raise TimeoutError(f"topic {name} has no leader for all {partitions} partitions after {timeout}s")
        time.sleep(0.1)


@pytest.fixture
def kafka_topic(kafka_bootstrap: str) -> Iterator[Callable[..., str]]:
    """Factory: ``kafka_topic(name=None, partitions=3, configs=None) -> name`` creates a topic
    (replication factor 1; ``name`` defaults to a unique one), waits until it has leaders, and
    deletes it after the test."""
    admin = kafka_admin(kafka_bootstrap)
    created: list[str] = []

    def create(name: str | None = None, partitions: int = 3, configs: dict[str, str] | None = None) -> str:
        topic = name or unique_name("topic")
        admin.create_topics(
            [NewTopic(topic, num_partitions=partitions, replication_factor=1, topic_configs=configs or {})]
        )
        created.append(topic)
        wait_for_topic(admin, topic, partitions)
        return topic

    try:
        yield create
    finally:
        try:
            if created:
                admin.delete_topics(created)
        except Exception as error:  # the broker may be down in a fault test: not the test's failure
            logging.getLogger(__name__).warning("could not delete topics %s: %s", created, error)
        finally:
            admin.close()


ServicesCtl = Callable[..., "subprocess.CompletedProcess[str]"]


@pytest.fixture
def services_ctl() -> Iterator[ServicesCtl]:
    """``services_ctl(service, action, timeout=180)`` runs ``deploy/local/<service>.sh <action>``
    (stop, start, restart, status, ...) and raises when it fails. For fault tests: every service
    touched is started again after the test (a no-op when it is running)."""
    touched: set[str] = set()
    env = {**os.environ, "PYTHON": sys.executable}

    def run(service: str, action: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        if service not in SERVICES:
            raise ValueError(f"unknown service {service!r}: one of {SERVICES}")
        if action != "status":
            touched.add(service)
        result = subprocess.run(
            ["bash", str(LOCAL / f"{service}.sh"), action],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            check=False,
        )
        if result.returncode != 0 and action != "status":
            output = result.stdout + result.stderr
            raise RuntimeError(f"deploy/local/{service}.sh {action} exited {result.returncode}:\n{output}")
        return result

    yield run
    for service in sorted(touched):
        subprocess.run(["bash", str(LOCAL / f"{service}.sh"), "start"], env=env, timeout=180, check=False)

"""Security properties (issue #6): secrets never printed, SQL identifiers validated, personal data
(source IPs, raw inputs) kept out of storage unless asked for, Kafka TLS/SASL options mapped correctly.

Secrets are unique random strings set through every channel the configuration offers (TOML file,
``PROBEWATCH__…`` environment variables, ``*_file`` secret files); every output is then searched for
them. The command-line checks run the real ``python -m probewatch`` in a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from clickhouse_driver import Client
from conftest import CLICKHOUSE_SECURE, LOCAL_TLS, SecuredKafka
from pipeline_helpers import WebhookReceiver

from alerting.receivers import DeliveryError, post_json
from ingest.sources import kafka_security_options
from probewatch.config import ConfigError, KafkaConfig, SaslConfig, load_config, redacted, secret_values
from storage import open_store
from storage.rows import make_ip_hasher
from storage.sql import qualified

ROOT = Path(__file__).resolve().parents[1]
TAG = uuid.uuid4().hex[:10]
# name -> value; each value is unique to this test run so a match cannot be a coincidence.
SECRETS = {
    name: f"{name}-{TAG}"
    for name in (
        "sasl-password-file",
        "clickhouse-password-env",
        "routing-key-file",
        "hmac-secret-toml",
        "hmac-secret-env",
        "authorization-header",
        "grafana-token-env",
        "grafana-password-file",
    )
}


def _env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROBEWATCH")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def probewatch(*args: str, env: dict[str, str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "probewatch", *args],
        env=_env(env),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def leaked(text: str) -> list[str]:
    return [name for name, value in SECRETS.items() if value in text]


@pytest.fixture(scope="module")
def secret_setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, str]]:
    """(directory, TOML config, environment) with a secret in every kind of place."""
    root = tmp_path_factory.mktemp("secrets")
    files = {}
    for name in ("sasl-password-file", "routing-key-file", "grafana-password-file"):
        files[name] = root / f"{name}.txt"
        files[name].write_text(SECRETS[name] + "\n")
    config = root / "probewatch.toml"
    config.write_text(
        f"""
[kafka]
security_protocol = "SASL_SSL"
[kafka.sasl]
mechanism = "SCRAM-SHA-512"
username = "probe-user"
password_file = "{files["sasl-password-file"]}"

[grafana]
password_file = "{files["grafana-password-file"]}"

[alerting]
console = false
shutdown_timeout_s = 1.0
retry_initial_s = 0.1

[alerting.receivers.pd]
type = "pagerduty"
url = "http://127.0.0.1:1/v2/enqueue"
routing_key_file = "{files["routing-key-file"]}"
timeout_s = 1.0

[alerting.receivers.hook]
type = "webhook"
url = "http://127.0.0.1:1/hook"
hmac_secret = "{SECRETS["hmac-secret-toml"]}"
headers = {{ Authorization = "Bearer {SECRETS["authorization-header"]}" }}
timeout_s = 1.0

[alerting.receivers.hook2]
type = "slack"
url = "http://127.0.0.1:1/slack"
timeout_s = 1.0
"""
    )
    env = {
        "PROBEWATCH__STORAGE__CLICKHOUSE__PASSWORD": SECRETS["clickhouse-password-env"],
        "PROBEWATCH__ALERTING__RECEIVERS__HOOK2__HMAC_SECRET": SECRETS["hmac-secret-env"],
        "PROBEWATCH__GRAFANA__TOKEN": SECRETS["grafana-token-env"],
    }
    return root, config, env


def test_the_secrets_reach_the_configuration(secret_setup: tuple[Path, Path, dict[str, str]]) -> None:
    """Otherwise the checks below would pass vacuously."""
    _, config_path, env = secret_setup
    config = load_config(config_path, environ=env)
    assert config.kafka.sasl.password == SECRETS["sasl-password-file"]
    assert config.storage.clickhouse.password == SECRETS["clickhouse-password-env"]
    assert config.alerting.receivers["pd"].routing_key == SECRETS["routing-key-file"]
    assert config.alerting.receivers["hook"].hmac_secret == SECRETS["hmac-secret-toml"]
    assert config.alerting.receivers["hook"].headers["Authorization"].endswith(SECRETS["authorization-header"])
    assert config.alerting.receivers["hook2"].hmac_secret == SECRETS["hmac-secret-env"]
    assert config.grafana.token == SECRETS["grafana-token-env"]
    assert config.grafana.password == SECRETS["grafana-password-file"]


def test_redacted_config_holds_no_secret(secret_setup: tuple[Path, Path, dict[str, str]]) -> None:
    _, config_path, env = secret_setup
    text = json.dumps(redacted(load_config(config_path, environ=env)))
    assert leaked(text) == []
    assert text.count('"***"') >= len(SECRETS)
    assert "probe-user" in text  # not a secret: kept


def test_config_command_prints_no_secret(secret_setup: tuple[Path, Path, dict[str, str]]) -> None:
    root, config_path, env = secret_setup
    result = probewatch("config", "--config", str(config_path), "--log-level", "DEBUG", env=env, cwd=root)
    assert result.returncode == 0, result.stderr
    assert leaked(result.stdout + result.stderr) == []
    shown = json.loads(result.stdout)
    assert shown["kafka"]["sasl"]["password"] == "***"
    assert shown["storage"]["clickhouse"]["password"] == "***"
    assert shown["alerting"]["receivers"]["hook"]["headers"]["Authorization"] == "***"


@pytest.mark.parametrize(
    ("receiver", "secret"),
    [
        ({"type": "alertmanager", "url": f"http://admin:{TAG}-pw@127.0.0.1:9093"}, f"{TAG}-pw"),
        ({"type": "slack", "url": f"https://hooks.slack.com/services/T0/B0/{TAG}tok"}, f"{TAG}tok"),
        ({"type": "webhook", "url": "http://127.0.0.1:1/", "headers": {"X-Api-Key": f"{TAG}key"}}, f"{TAG}key"),
        ({"type": "webhook", "url": f"https://chat.example/v1/messages?key={TAG}k&token={TAG}t"}, f"{TAG}t"),
    ],
)
def test_credentials_inside_urls_and_headers_are_redacted(receiver: dict[str, Any], secret: str) -> None:
    config = load_config(environ={}, overrides={"alerting": {"receivers": {"r": receiver}}})
    assert secret not in json.dumps(redacted(config))
    assert any(secret in hidden for hidden in secret_values(config))  # and kept out of every log line


def test_a_webhook_token_in_its_url_is_in_no_log_line(tmp_path: Path) -> None:
    """A webhook whose URL holds its credentials (Google Chat's ?key=…&token=…) takes the test alert;
    at DEBUG urllib3 logs each request line, URL and all: the token is hidden there too."""
    token = f"chat-token-{TAG}"
    receiver = WebhookReceiver()
    try:
        config = tmp_path / "probewatch.toml"
        config.write_text(
            f"""
[alerting.receivers.chat]
type = "webhook"
url = "{receiver.url}/v1/spaces/ops/messages?key=chat-key-{TAG}&token={token}"
timeout_s = 5.0
"""
        )
        result = probewatch("alerts", "test", "--config", str(config), "--log-level", "DEBUG", env={}, cwd=tmp_path)
        assert result.returncode == 0, result.stdout + result.stderr[-3000:]
        assert "ok    chat" in result.stdout
        delivered = receiver.wait_for(lambda doc: True, timeout=5)
        assert delivered["path"].endswith(f"token={token}")  # the URL was used as configured
        assert '"POST /v1/spaces/ops/messages?key=***&token=*** HTTP/1.1" 200' in result.stderr  # urllib3's line
        assert token not in result.stdout + result.stderr and f"chat-key-{TAG}" not in result.stderr
    finally:
        receiver.close()


def write_log(path: Path, clients: int = 4, queries: int = 30, malformed: int = 2) -> list[str]:
    """A small query log with distinctive source IPs; returns the IPs used."""
    ips = [f"203.0.113.{10 + c}" for c in range(clients - 1)] + ["2001:db8::beef:7"]
    lines = []
    for q in range(queries):
        for c in range(clients):
            lines.append(
                json.dumps(
                    {
                        "ts": 1_800_000_000 + q * 2.0 + c * 0.1,
                        "client_id": f"client-{c}",
                        "model_id": "fraud-v3",
                        "source_ip": ips[c],
                        "input": {"vector": [round(0.001 * (q * 7 + c * 13 + j), 6) + 0.123457 for j in range(8)]},
                        "output": {"probs": [0.2, 0.8] if (q + c) % 3 else [0.6, 0.4]},
                    }
                )
            )
    lines += ['{"ts": "garbage", "source_ip": "198.51.100.99"}'] * malformed
    path.write_text("\n".join(lines) + "\n")
    return ips


def test_debug_run_logs_no_secret(secret_setup: tuple[Path, Path, dict[str, str]]) -> None:
    root, config_path, env = secret_setup
    log = root / "run-logs.jsonl"
    write_log(log)
    result = probewatch(
        "run",
        "--config",
        str(config_path),
        "--input",
        str(log),
        "--data-dir",
        str(root / "run-data"),
        "--log-level",
        "DEBUG",
        env=env,
        cwd=root,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert " DEBUG " in result.stderr  # the debug level was really on
    assert leaked(result.stdout + result.stderr) == []


def test_failing_alert_receivers_report_no_secret(secret_setup: tuple[Path, Path, dict[str, str]]) -> None:
    """`probewatch alerts test` against unreachable receivers: the failures are reported, secrets not."""
    root, config_path, env = secret_setup
    result = probewatch(
        "alerts", "test", "--config", str(config_path), "--receiver", "pd", "--receiver", "hook",
        "--log-level", "DEBUG", env=env, cwd=root,
    )  # fmt: skip
    assert result.returncode == 1
    assert "FAIL  pd" in result.stdout and "FAIL  hook" in result.stdout
    assert leaked(result.stdout + result.stderr) == []


def test_a_failed_delivery_names_the_receiver_host_but_not_the_url_path() -> None:
    """requests names the URL it failed on; a Slack or Discord webhook's path is its token."""
    token = f"path-token-{TAG}"
    with pytest.raises(DeliveryError) as failed:
        post_json(requests.Session(), f"http://127.0.0.1:1/services/T0/B0/{token}?key={token}", b"{}", timeout=2)
    message = str(failed.value)
    assert "ConnectionError" in message and "host='127.0.0.1', port=1" in message
    assert token not in message


@pytest.fixture(scope="module")
def unreachable_clickhouse(tmp_path_factory: pytest.TempPathFactory) -> subprocess.CompletedProcess[str]:
    """A file run against a ClickHouse server that is not there (127.0.0.1:1), with a password set."""
    root = tmp_path_factory.mktemp("unreachable")
    log = root / "one.jsonl"
    log.write_text('{"ts": 1800000000, "client_id": "c", "model_id": "m"}\n')
    return probewatch(
        "run",
        "--input",
        str(log),
        "--log-level",
        "DEBUG",
        env={
            "PROBEWATCH__STORAGE__BACKEND": "clickhouse",
            "PROBEWATCH__STORAGE__CLICKHOUSE__HOST": "127.0.0.1",
            "PROBEWATCH__STORAGE__CLICKHOUSE__PORT": "1",
            "PROBEWATCH__STORAGE__CLICKHOUSE__CONNECT_TIMEOUT_S": "2",
            "PROBEWATCH__STORAGE__CLICKHOUSE__PASSWORD": SECRETS["clickhouse-password-env"],
        },
        cwd=root,
    )


def test_unreachable_clickhouse_fails_without_leaking_the_password(
    unreachable_clickhouse: subprocess.CompletedProcess[str],
) -> None:
    result = unreachable_clickhouse
    assert result.returncode != 0
    assert "127.0.0.1:1" in result.stderr  # says where it tried
    assert leaked(result.stdout + result.stderr) == []


def test_unreachable_clickhouse_is_one_clear_line(unreachable_clickhouse: subprocess.CompletedProcess[str]) -> None:
    result = unreachable_clickhouse
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "probewatch: cannot reach ClickHouse at 127.0.0.1:1" in result.stderr


@pytest.mark.integration
def test_a_run_stores_through_clickhouse_tls_with_a_password_from_a_file(
    secured_clickhouse: dict[str, str], clickhouse_server: tuple[str, int], tmp_path: Path
) -> None:
    """The test user's password from a secret file, over the TLS port, the server's certificate checked
    against the local CA: the run stores its scores (read back as the default user, in the clear)."""
    log = tmp_path / "logs.jsonl"
    write_log(log)
    secret = tmp_path / "clickhouse-password"
    secret.write_text(secured_clickhouse["PROBEWATCH__STORAGE__CLICKHOUSE__PASSWORD"] + "\n")
    database = f"probewatch_tls_{TAG}"
    env = {key: value for key, value in secured_clickhouse.items() if not key.endswith("__PASSWORD")}
    env["PROBEWATCH__STORAGE__CLICKHOUSE__PASSWORD_FILE"] = str(secret)
    env["PROBEWATCH__STORAGE__DATABASE"] = database
    client = Client(*clickhouse_server)
    try:
        result = probewatch("run", "--input", str(log), "--quiet", env=env, cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        scored = client.execute(f"SELECT count() FROM {database}.session_scores")[0][0]
        assert scored > 0
    finally:
        client.execute(f"DROP DATABASE IF EXISTS {database}")


@pytest.mark.integration
@pytest.mark.parametrize(
    ("change", "said"),
    [
        (
            {"PROBEWATCH__STORAGE__CLICKHOUSE__PASSWORD": SECRETS["clickhouse-password-env"]},
            "refused the login of user 'probewatch' (Code: 193",
        ),
        ({"PROBEWATCH__STORAGE__CLICKHOUSE__CA_CERTS": "client.pem"}, "CERTIFICATE_VERIFY_FAILED"),
    ],
)
def test_a_clickhouse_that_refuses_a_run_is_one_clear_line(
    change: dict[str, str], said: str, secured_clickhouse: dict[str, str], tmp_path: Path
) -> None:
    log = tmp_path / "one.jsonl"
    log.write_text('{"ts": 1800000000, "client_id": "c", "model_id": "m"}\n')
    env = {**secured_clickhouse, "PROBEWATCH__STORAGE__CLICKHOUSE__CONNECT_TIMEOUT_S": "3"}
    for key, value in change.items():
        env[key] = str(LOCAL_TLS / value) if key.endswith("CA_CERTS") else value
    last = refusal(probewatch("run", "--input", str(log), "--log-level", "DEBUG", env=env, cwd=tmp_path))
    assert last.startswith("probewatch: ") and said in last and CLICKHOUSE_SECURE in last


def refusal(result: subprocess.CompletedProcess[str]) -> str:
    """The line a run that a service refused ends with, after checking it ends as one should: exit
    status 3, no traceback, no secret anywhere in its output."""
    assert result.returncode == 3, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert leaked(result.stdout + result.stderr) == []
    return result.stderr.strip().splitlines()[-1]


# ------------------------------------------------------------------------------------ SQL identifiers


@pytest.mark.parametrize(
    "database",
    ["x; DROP TABLE events", "x`; DROP DATABASE system; --", "a.b", "probewatch--", "1abc", "", "p w", "x'y"],
)
def test_database_name_injection_is_rejected_at_config_validation(database: str) -> None:
    with pytest.raises(ConfigError, match=r"storage\.database"):
        load_config(environ={}, overrides={"storage": {"database": database}})


def test_database_name_injection_from_the_environment_stops_the_cli(tmp_path: Path) -> None:
    result = probewatch("config", env={"PROBEWATCH__STORAGE__DATABASE": "x; DROP TABLE events"}, cwd=tmp_path)
    assert result.returncode == 2
    assert "storage.database must be a plain identifier" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("database", ["dåtabase", "ｘ", "データ"])
def test_non_ascii_database_name_is_a_config_error(database: str) -> None:
    with pytest.raises(ConfigError, match=r"storage\.database"):
        load_config(environ={}, overrides={"storage": {"database": database}})


# --------------------------------------------------------------------- what is stored: IPs and inputs

IP_KEY = "test-ip-hash-key-" + TAG


class StoredRuns:
    """Two file runs on one chDB directory: ``hashed`` (hash_source_ips, no inputs) and ``plain``
    (raw IPs, store_inputs). Every cell of every table is read back as text."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.log = root / "logs.jsonl"
        self.ips = write_log(self.log)
        self.data = root / "chdb"
        self.cells: dict[str, str] = {}
        self.inputs: dict[str, list[Any]] = {}
        for database, hashed, store_inputs in (("hashed", True, False), ("plain", False, True)):
            result = probewatch(
                "run", "--input", str(self.log), "--data-dir", str(self.data), "--quiet",
                env={
                    "PROBEWATCH__STORAGE__DATABASE": database,
                    "PROBEWATCH__STORAGE__HASH_SOURCE_IPS": str(hashed).lower(),
                    "PROBEWATCH__STORAGE__STORE_INPUTS": str(store_inputs).lower(),
                    "PROBEWATCH__STORAGE__RAW_SAMPLE_RATE": "1.0",
                    "PROBEWATCH__DETECTION__MIN_QUERIES": "5",
                    "PROBEWATCH_IP_HASH_KEY": IP_KEY,
                },
                cwd=root,
            )  # fmt: skip
            assert result.returncode == 0, result.stderr[-3000:]
        config = load_config(environ={}, overrides={"storage": {"chdb": {"path": str(self.data)}}})
        store = open_store(config.storage)
        try:
            for database in ("hashed", "plain"):
                tables = store.query("SELECT name FROM system.tables WHERE database = {db:String}", {"db": database})
                texts = []
                for (table,) in tables:
                    rows = store.query(f"SELECT * FROM {qualified(database, table)}")
                    texts.append(f"{table}: {rows!r}")
                self.cells[database] = "\n".join(texts)
                self.inputs[database] = [r[0] for r in store.query(f"SELECT input FROM {database}.events FINAL")]
                self.cells[database + ".events.source_ip"] = repr(
                    store.query(f"SELECT DISTINCT source_ip FROM {database}.events FINAL")
                )
                self.cells[database + ".session_scores.source_ips"] = repr(
                    store.query(f"SELECT DISTINCT source_ips FROM {database}.session_scores FINAL")
                )
        finally:
            store.close()


@pytest.fixture(scope="module")
def stored(tmp_path_factory: pytest.TempPathFactory) -> StoredRuns:
    return StoredRuns(tmp_path_factory.mktemp("stored"))


def test_source_ips_are_stored_hashed(stored: StoredRuns) -> None:
    hashed = stored.cells["hashed"]
    for ip in stored.ips:
        assert ip not in hashed, f"raw IP {ip} found in storage with hash_source_ips = true"
    hasher = make_ip_hasher(True, IP_KEY.encode())
    assert hasher is not None
    for ip in stored.ips:
        assert hasher(ip) in stored.cells["hashed.events.source_ip"]
        assert hasher(ip) in stored.cells["hashed.session_scores.source_ips"]
    # The same run without hashing does store them (so the search above can find them).
    for ip in stored.ips:
        assert ip in stored.cells["plain.events.source_ip"]
        assert ip in stored.cells["plain.session_scores.source_ips"]


def test_raw_inputs_are_not_stored_unless_asked(stored: StoredRuns) -> None:
    # Every vector component ends in ...123457 (see write_log): unmistakable in any text dump.
    assert stored.inputs["hashed"] and all(vector == [] for vector in stored.inputs["hashed"])
    assert "123457" not in stored.cells["hashed"]
    assert stored.inputs["plain"] and all(len(vector) == 8 for vector in stored.inputs["plain"])


# --------------------------------------------------------------------------- Kafka TLS / SASL options


def test_kafka_plaintext_has_no_tls_or_sasl_options() -> None:
    options = kafka_security_options(KafkaConfig(ssl_cafile="/ca.pem", sasl=SaslConfig(password="pw")))
    assert options == {"security_protocol": "PLAINTEXT"}


def test_kafka_ssl_options() -> None:
    config = KafkaConfig(
        security_protocol="SSL", ssl_cafile="/etc/ca.pem", ssl_certfile="/etc/cert.pem", ssl_keyfile="/etc/key.pem"
    )
    assert kafka_security_options(config) == {
        "security_protocol": "SSL",
        "ssl_cafile": "/etc/ca.pem",
        "ssl_certfile": "/etc/cert.pem",
        "ssl_keyfile": "/etc/key.pem",
    }
    # Unset files are left to kafka-python's defaults (the system CA store), not passed as "".
    assert kafka_security_options(KafkaConfig(security_protocol="SSL")) == {"security_protocol": "SSL"}


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_kafka_sasl_ssl_options(mechanism: str) -> None:
    config = KafkaConfig(
        security_protocol="SASL_SSL",
        ssl_cafile="/etc/ca.pem",
        sasl=SaslConfig(mechanism=mechanism, username="u", password="p"),  # type: ignore[arg-type]
    )
    assert kafka_security_options(config) == {
        "security_protocol": "SASL_SSL",
        "ssl_cafile": "/etc/ca.pem",
        "sasl_mechanism": mechanism,
        "sasl_plain_username": "u",
        "sasl_plain_password": "p",
    }


def test_kafka_sasl_plaintext_options_have_no_tls_files() -> None:
    config = KafkaConfig(
        security_protocol="SASL_PLAINTEXT", ssl_cafile="/etc/ca.pem", sasl=SaslConfig(username="u", password="p")
    )
    assert kafka_security_options(config) == {
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": "PLAIN",
        "sasl_plain_username": "u",
        "sasl_plain_password": "p",
    }


def test_kafka_sasl_password_from_file_and_environment(tmp_path: Path) -> None:
    secret = tmp_path / "sasl"
    secret.write_text("from-file\n")
    config = load_config(
        environ={
            "PROBEWATCH__KAFKA__SECURITY_PROTOCOL": "SASL_SSL",
            "PROBEWATCH__KAFKA__SASL__MECHANISM": "SCRAM-SHA-256",
            "PROBEWATCH__KAFKA__SASL__USERNAME": "svc",
            "PROBEWATCH__KAFKA__SASL__PASSWORD_FILE": str(secret),
        }
    )
    options = kafka_security_options(config.kafka)
    assert options["sasl_plain_password"] == "from-file"  # trailing newline dropped
    assert options["sasl_mechanism"] == "SCRAM-SHA-256" and options["sasl_plain_username"] == "svc"


def test_missing_secret_file_is_a_config_error_without_its_contents(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="password_file"):
        load_config(environ={"PROBEWATCH__KAFKA__SASL__PASSWORD_FILE": str(tmp_path / "nope")})


# ------------------------------------------------------------- Kafka refusing a worker, on the real broker


@pytest.mark.integration
@pytest.mark.parametrize(
    ("protocol", "change", "said"),
    [
        (
            "SASL_PLAINTEXT",
            {},
            # kafka-python now and then sees only the broker closing the connection after a failed login,
            # not the error the broker sent before closing it; then the line can only ask.
            (
                "the broker rejected the credentials of user 'probewatch' (SCRAM-SHA-256)",
                "the broker closed the connection: does kafka.security_protocol (SASL_PLAINTEXT) match the "
                "listener at that address, and does it know user 'probewatch'?",
            ),
        ),
        (
            "SASL_SSL",
            # A certificate, but not of the CA that signed the broker's.
            {"PROBEWATCH__KAFKA__SSL_CAFILE": "client.pem"},
            ("the broker's certificate is not trusted: set kafka.ssl_cafile",),
        ),
        (
            "SSL",
            {"PROBEWATCH__KAFKA__SSL_CERTFILE": "", "PROBEWATCH__KAFKA__SSL_KEYFILE": ""},
            ("the broker refused this client's certificate",),
        ),
    ],
)
def test_a_worker_that_kafka_refuses_says_why_in_one_line(
    protocol: str,
    change: dict[str, str],
    said: tuple[str, ...],
    secured_kafka: SecuredKafka,
    clickhouse_server: tuple[str, int],
    tmp_path: Path,
) -> None:
    """A wrong password or certificate stops `probewatch run` at start-up with the reason (kafka-python
    itself only retries until it times out) and without the password."""
    env = secured_kafka.env(protocol, "SCRAM-SHA-256", password=SECRETS["sasl-password-file"])
    for key, value in change.items():
        env[key] = str(LOCAL_TLS / value) if value else ""
    result = probewatch(
        "run",
        "--source",
        "kafka",
        "--log-level",
        "DEBUG",
        env={
            **env,
            "PROBEWATCH__KAFKA__CONNECT_TIMEOUT_S": "3",
            "PROBEWATCH__STORAGE__BACKEND": "clickhouse",
            "PROBEWATCH__STORAGE__CLICKHOUSE__HOST": clickhouse_server[0],
            "PROBEWATCH__STORAGE__CLICKHOUSE__PORT": str(clickhouse_server[1]),
            "PROBEWATCH__STORAGE__DATABASE": "probewatch_refused",
        },
        cwd=tmp_path,
    )
    last = refusal(result)
    assert last.startswith(f"probewatch: cannot reach Kafka at {env['PROBEWATCH__KAFKA__BOOTSTRAP_SERVERS']}")
    assert any(text in last for text in said)


@pytest.mark.parametrize(
    ("settings", "problem"),
    [
        ({"SECURITY_PROTOCOL": "SSL", "SSL_CAFILE": "/no/such/ca.pem"}, "kafka.ssl_cafile: no such file"),
        ({"SECURITY_PROTOCOL": "SSL", "SSL_KEYFILE": __file__}, "kafka.ssl_keyfile is set without kafka.ssl_certfile"),
        ({"SECURITY_PROTOCOL": "SASL_SSL", "SASL__USERNAME": "svc"}, "needs kafka.sasl.username and a password"),
        ({"CONNECT_TIMEOUT_S": "0"}, "kafka.connect_timeout_s must be positive"),
    ],
)
def test_kafka_settings_no_worker_could_connect_with_are_refused_at_load(
    settings: dict[str, str], problem: str
) -> None:
    environ = {f"PROBEWATCH__KAFKA__{key}": value for key, value in settings.items()}
    with pytest.raises(ConfigError, match=problem):
        load_config(environ={**environ, "PROBEWATCH__SOURCE": "kafka"})
    load_config(environ=environ)  # a file run does not connect to Kafka: nothing to refuse


@pytest.fixture(autouse=True)
def _no_probewatch_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """In-process load_config calls read os.environ when not given one: keep the caller's out."""
    for name in list(os.environ):
        if name.startswith("PROBEWATCH"):
            monkeypatch.delenv(name)
    yield

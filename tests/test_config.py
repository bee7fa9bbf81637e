"""Configuration: TOML + environment, typed and validated with messages that point at the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from probewatch.config import ConfigError, load_config, redacted


def test_defaults_need_no_file_and_no_server() -> None:
    config = load_config(environ={})
    assert config.source == "file"
    assert config.storage.backend == "chdb"
    assert config.kafka.effective_dlq_topic == "inference-logs.dlq"


def test_toml_then_environment_then_overrides(tmp_path: Path) -> None:
    path = tmp_path / "pw.toml"
    path.write_text('source = "kafka"\n[kafka]\ntopic = "logs"\nbatch_max_records = 100\n')
    env = {"PROBEWATCH__KAFKA__BATCH_MAX_RECORDS": "250", "PROBEWATCH__STORAGE__CLICKHOUSE__PORT": "19000"}
    config = load_config(path, environ=env, overrides={"kafka": {"group_id": "g2"}})
    assert (config.source, config.kafka.topic, config.kafka.batch_max_records) == ("kafka", "logs", 250)
    assert config.storage.clickhouse.port == 19000
    assert config.kafka.group_id == "g2"


def test_errors_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"kafka\.batch_max_records"):
        load_config(environ={"PROBEWATCH__KAFKA__BATCH_MAX_RECORDS": "many"})
    with pytest.raises(ConfigError, match="Object contains unknown field `batchsize`"):
        load_config(environ={"PROBEWATCH__KAFKA__BATCHSIZE": "1"})
    with pytest.raises(ConfigError, match="alert_threshold"):
        load_config(environ={"PROBEWATCH__DETECTION__ALERT_THRESHOLD": "1.5"})
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml", environ={})
    bad = tmp_path / "bad.toml"
    bad.write_text("source = ")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad, environ={})


def test_secrets_from_files_are_redacted(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    config = load_config(environ={"PROBEWATCH__STORAGE__CLICKHOUSE__PASSWORD_FILE": str(secret)})
    assert config.storage.clickhouse.password == "s3cret"
    assert "s3cret" not in str(redacted(config))


def test_processing_guarantee_is_validated() -> None:
    assert load_config(environ={}).kafka.processing_guarantee == "at_least_once"
    env = {"PROBEWATCH__KAFKA__PROCESSING_GUARANTEE": "exactly_once"}
    assert load_config(environ=env).kafka.processing_guarantee == "exactly_once"
    with pytest.raises(ConfigError, match=r"kafka\.processing_guarantee"):
        load_config(environ={"PROBEWATCH__KAFKA__PROCESSING_GUARANTEE": "exactly_once_v2"})
    # The ClickHouse state backend cannot take part in a Kafka transaction.
    with pytest.raises(ConfigError, match=r'needs state\.backend = "changelog"'):
        load_config(environ={**env, "PROBEWATCH__STATE__BACKEND": "clickhouse"})

"""One typed configuration object, loaded from a TOML file and the environment, validated at start-up.

Precedence (lowest first): built-in defaults → TOML file (``--config`` or ``$PROBEWATCH_CONFIG``) →
environment variables ``PROBEWATCH__<SECTION>__<KEY>`` (values parsed as TOML literals when they can
be, so ``PROBEWATCH__KAFKA__BATCH_MAX_RECORDS=2000`` is an int) → command-line flags.

Secrets (passwords, tokens, routing keys) can also come from files: any ``*_file`` field is read at
start-up into its sibling field, so Kubernetes secrets mounted as files work without templating.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

import msgspec

ENV_PREFIX = "PROBEWATCH__"


class ConfigError(ValueError):
    """The configuration is invalid; the message says where and how to fix it."""


class _Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class SaslConfig(_Section):
    mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "PLAIN"
    username: str = ""
    password: str = ""
    password_file: str = ""


class KafkaConfig(_Section):
    bootstrap_servers: str = "127.0.0.1:9092"
    topic: str = "inference-logs"
    # Default "<topic>.dlq" when empty.
    dlq_topic: str = ""
    group_id: str = "probewatch"
    client_id: str = "probewatch"
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    # A batch is what one poll returns: up to batch_max_records, and no more than the fetches brought,
    # at most max_partition_fetch_bytes per partition (kafka-python's setting, so a worker buffers at
    # most that much per partition it owns). A poll returns what has arrived without waiting for more,
    # so these limits matter when the worker is behind (a backlog, a restart): each batch has a fixed
    # cost (ClickHouse inserts, checkpoint, offset commit) and the detector vectorises across a batch.
    # Reading a backlog, 20,000 / 4 MiB ran about a third faster than 5,000 / 1 MiB (bench_pipeline).
    batch_max_records: int = 20_000
    max_partition_fetch_bytes: int = 4_194_304
    poll_timeout_ms: int = 500
    # How long the loop may go without polling before the group evicts this worker; long, because
    # while storage is down the worker waits (backpressure) instead of polling more records.
    max_poll_interval_ms: int = 1_800_000
    session_timeout_ms: int = 10_000
    # cooperative-sticky (KIP-429): a rebalance moves only the partitions that change owner, so the
    # other workers keep consuming and keep their session state in memory.
    assignment_strategy: Literal["cooperative-sticky", "range", "roundrobin"] = "cooperative-sticky"
    # Kafka Streams' names. at_least_once: a crash can re-send a batch's dead letters (ClickHouse
    # writes are idempotent either way). exactly_once (Streams' exactly_once_v2): each batch's dead
    # letters, changelog entries and consumer offsets are committed in one Kafka transaction, and the
    # input and changelog are read read_committed; needs state.backend = "changelog" and brokers >= 2.5.
    processing_guarantee: Literal["at_least_once", "exactly_once"] = "at_least_once"
    # Record-batch size of the producers that write checkpoints and dead letters. Checkpoint entries
    # are a few KB each; in kafka-python's default 16 KB batches an entry costs about three times what
    # it costs in 512 KB ones (measured). Keep it below the broker's message.max.bytes (1 MB default).
    producer_batch_bytes: int = 524_288
    # How long a worker waits for the brokers at start-up before it gives up with the reason
    # (refused, credentials rejected, certificate not trusted, ...).
    connect_timeout_s: float = 30.0
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    ssl_cafile: str = ""
    ssl_certfile: str = ""
    ssl_keyfile: str = ""
    sasl: SaslConfig = msgspec.field(default_factory=SaslConfig)

    def problems(self) -> list[str]:
        """What a worker could not connect with: found here, before any connection is tried."""
        problems = []
        if self.connect_timeout_s <= 0:
            problems.append(f"kafka.connect_timeout_s must be positive, got {self.connect_timeout_s}")
        if self.security_protocol in ("SSL", "SASL_SSL"):
            for key in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
                path = getattr(self, key)
                if path and not os.path.isfile(path):
                    problems.append(f"kafka.{key}: no such file {path!r}")
            if self.ssl_keyfile and not self.ssl_certfile:
                problems.append("kafka.ssl_keyfile is set without kafka.ssl_certfile (the client certificate)")
        if self.security_protocol.startswith("SASL") and not (self.sasl.username and self.sasl.password):
            problems.append(
                f"kafka.security_protocol = {self.security_protocol!r} needs kafka.sasl.username and a password "
                "(kafka.sasl.password or kafka.sasl.password_file)"
            )
        return problems

    @property
    def effective_dlq_topic(self) -> str:
        return self.dlq_topic or f"{self.topic}.dlq"


class FileSourceConfig(_Section):
    # Dead-lettered records of a file run go here (JSON lines); empty means "<input>.dlq.jsonl",
    # or "probewatch-dlq.jsonl" for stdin.
    dlq_path: str = ""
    batch_max_records: int = 20_000  # as kafka.batch_max_records
    # ... and at most this many bytes of lines (memory stays bounded whatever the lines' size, up to
    # limits.max_record_bytes each), as kafka.max_partition_fetch_bytes bounds a Kafka batch.
    batch_max_bytes: int = 67_108_864
    # Stdin from a pipe or a terminal: a batch is handed on at most this long after its first line
    # arrived, full or not (a file is read in full batches).
    linger_ms: int = 200


class LimitsConfig(_Section):
    """Caps that keep a hostile or broken producer from exhausting memory."""

    max_record_bytes: int = 1_000_000
    max_vector_len: int = 65_536
    max_classes: int = 10_000
    max_string_len: int = 512


class ChdbConfig(_Section):
    path: str = "./probewatch-data"


class ClickHouseServerConfig(_Section):
    host: str = "127.0.0.1"
    port: int = 9000
    user: str = "default"
    password: str = ""
    password_file: str = ""
    secure: bool = False
    verify: bool = True
    ca_certs: str = ""
    connect_timeout_s: float = 10.0


class StorageConfig(_Section):
    backend: Literal["chdb", "clickhouse"] = "chdb"
    database: str = "probewatch"
    # Fraction of raw query events also written to the `events` table (0 disables it).
    raw_sample_rate: float = 0.0
    # Keep raw input vectors out of storage unless explicitly wanted (they may be customer data).
    store_inputs: bool = False
    hash_source_ips: bool = False
    # Secret key of the source-IP hash (HMAC): without one, hashed IPv4 addresses can be recovered
    # by trying all 2^32. Default: $PROBEWATCH_IP_HASH_KEY.
    ip_hash_key: str = ""
    ip_hash_key_file: str = ""
    # Rows older than this are dropped by ClickHouse TTL, on servers whose version supports TTL.
    retention_days: int = 30
    chdb: ChdbConfig = msgspec.field(default_factory=ChdbConfig)
    clickhouse: ClickHouseServerConfig = msgspec.field(default_factory=ClickHouseServerConfig)


class StateConfig(_Section):
    """Where a Kafka worker checkpoints session state, so that a partition's sessions move with it."""

    # changelog: a compacted Kafka topic (the Kafka Streams way); clickhouse: the store's
    # detector_state table. A file run keeps no checkpoints (it is a replay).
    backend: Literal["changelog", "clickhouse"] = "changelog"
    # Default "<topic>.<group_id>.changelog" when empty: the group's own (an existing topic-only
    # "<topic>.changelog" of earlier versions is kept, with a warning).
    changelog_topic: str = ""
    # -1: the broker's default.replication.factor (also of the population log).
    changelog_replication_factor: int = -1
    # The workers of the group share their population baselines through a population log topic (see
    # probewatch/population_log.py): otherwise a worker of N judges clients against baselines learned
    # from its 1/N of them (`probewatch eval --workers N --baselines per-worker` shows the cost).
    shared_baselines: bool = True
    # Default "<topic>.<group_id>.population" when empty: the group's own (two applications reading
    # one topic must not fold each other's evidence).
    population_topic: str = ""


class SessionConfig(_Section):
    # A client's session ends after this much event-time inactivity (when the record has no session_id).
    inactivity_gap_s: float = 1800.0
    # Records may arrive this much (event time) behind the newest record seen and still count normally.
    allowed_lateness_s: float = 60.0
    # Upper bound on open sessions held in memory; the least recently active are closed first.
    max_open_sessions: int = 1_000_000
    # A client's history (its signals across sessions) is forgotten after this much event-time silence;
    # it starts clean if it comes back. Bounds state over months of new clients; 0 keeps it forever.
    client_ttl_s: float = 30 * 86400.0


class DetectionConfig(_Section):
    # Session score at or above which an alert fires.
    alert_threshold: float = 0.8
    # Minimum queries in a session before it may alert. The scores already allow for the noise of
    # few queries; 10 rather than 20 detected faster with no more false positives on 460 simulated
    # benign clients (see `probewatch eval`).
    min_queries: int = 10
    # Per-model expected input dimension; records with another length are dead-lettered.
    # Models not listed learn their dimension from their first valid record.
    input_dims: dict[str, int] = msgspec.field(default_factory=dict)
    # API keys whose latest source IP is in the same network are also judged together, so an attack
    # split over many keys is seen (see detectors.groups). Prefix lengths; 0 turns grouping off.
    group_v4_prefix: int = 24
    group_v6_prefix: int = 48
    # Threads of the BLAS library numpy calls (its matrix products). A worker is one core's share of
    # the stream (scale out with more workers), and its matrices are small: extra BLAS threads only
    # spin against the Kafka client's I/O thread and the other workers, and took a shared 2-core
    # machine's fold of the population baselines from 4 to 11 µs per record. 0 keeps the library's
    # default (a thread per core the library sees, which in a container may be the host's).
    blas_threads: int = 1


SeverityName = Literal["info", "warning", "high", "critical"]


class AlertReceiverConfig(_Section):
    """One alert receiver, a named table ``[alerting.receivers.<name>]`` (so any field can also come
    from ``PROBEWATCH__ALERTING__RECEIVERS__<NAME>__<FIELD>``, and secrets from ``*_file``)."""

    type: Literal["alertmanager", "pagerduty", "webhook", "slack", "kafka", "jsonl", "console"]
    # Alerts below this severity are not sent to this receiver (recorded as skipped).
    min_severity: SeverityName = "info"
    enabled: bool = True
    # alertmanager: base URL (http://host:9093); pagerduty: the Events API v2 endpoint;
    # webhook/slack: the URL to POST to.
    url: str = ""
    timeout_s: float = 5.0
    # alertmanager: active alerts are re-sent every refresh_s with endsAt = now + ttl_s; a resolve
    # waits until the alert has been firing there for min_firing_s (> the route's group_wait).
    refresh_s: float = 60.0
    ttl_s: float = 300.0
    min_firing_s: float = 45.0
    labels: dict[str, str] = msgspec.field(default_factory=dict)
    # pagerduty
    routing_key: str = ""
    routing_key_file: str = ""
    source: str = "probewatch"
    rate_per_minute: float = 100.0
    # webhook / slack: optional HMAC-SHA256 signature (X-Probewatch-Signature) and extra headers.
    hmac_secret: str = ""
    hmac_secret_file: str = ""
    headers: dict[str, str] = msgspec.field(default_factory=dict)
    # kafka: topic; bootstrap servers and security default to the [kafka] section.
    topic: str = "probewatch.alerts"
    bootstrap_servers: str = ""
    # jsonl
    path: str = ""


class AlertingConfig(_Section):
    console: bool = True
    jsonl_path: str = ""
    grafana_base_url: str = ""
    runbook_url: str = ""
    # The alert policy; durations are EVENT time (the scores' event_time). threshold 0 means
    # detection.alert_threshold.
    threshold: float = 0.0
    cooldown_s: float = 600.0
    renotify_s: float = 3600.0
    resolve_after_s: float = 1800.0
    max_per_minute: int = 20  # pages a minute, for a consumer group in all (each worker its share)
    suppress_clients: list[str] = msgspec.field(default_factory=list)
    suppress_models: list[str] = msgspec.field(default_factory=list)
    receivers: dict[str, AlertReceiverConfig] = msgspec.field(default_factory=dict)
    # Delivery (wall clock): per-receiver queue, retry backoff, outbox sweep, flush at shutdown.
    queue_max: int = 10_000
    retry_initial_s: float = 1.0
    retry_max_s: float = 60.0
    sweep_s: float = 30.0
    shutdown_timeout_s: float = 10.0
    # The outbox sweep redelivers alerts at most this old (event time vs the wall clock), so a new
    # receiver does not get the whole history; 0 = no bound (e.g. replaying old logs).
    redeliver_max_age_s: float = 86_400.0

    def problems(self) -> list[str]:
        out: list[str] = []
        if not 0.0 <= self.threshold <= 1.0:
            out.append("alerting.threshold must be in [0, 1] (0: detection.alert_threshold)")
        for key in ("cooldown_s", "renotify_s", "resolve_after_s", "retry_initial_s", "sweep_s"):
            if getattr(self, key) < 0:
                out.append(f"alerting.{key} must be >= 0")
        if self.resolve_after_s <= 0:
            out.append("alerting.resolve_after_s must be > 0")
        if self.max_per_minute < 0 or self.queue_max <= 0:
            out.append("alerting.max_per_minute must be >= 0 and alerting.queue_max > 0")
        for name, r in self.receivers.items():
            where = f"alerting.receivers.{name}"
            if r.type in ("alertmanager", "webhook", "slack") and not r.url:
                out.append(f"{where}.url is required for a {r.type} receiver")
            if r.type == "pagerduty" and not r.routing_key:
                out.append(f"{where}.routing_key (or routing_key_file) is required for pagerduty")
            if r.type == "jsonl" and not r.path:
                out.append(f"{where}.path is required for a jsonl receiver")
            if r.url and not r.url.startswith(("http://", "https://")):
                out.append(f"{where}.url must start with http:// or https://")
        return out


class MetricsConfig(_Section):
    # Port for /metrics, /healthz and /readyz; 0 disables the endpoint.
    port: int = 0
    host: str = "127.0.0.1"


class LoggingConfig(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    json: bool = False


class GrafanaConfig(_Section):
    """Where `probewatch dashboards push` puts the dashboards (flags and GRAFANA_URL / GRAFANA_TOKEN
    override these). The data source it creates points at [storage.clickhouse], or at
    datasource_host/datasource_port when Grafana reaches ClickHouse by another address."""

    url: str = ""
    token: str = ""
    token_file: str = ""
    user: str = ""
    password: str = ""
    password_file: str = ""
    datasource_host: str = ""
    datasource_port: int = 0


class Config(_Section):
    source: Literal["file", "kafka"] = "file"
    kafka: KafkaConfig = msgspec.field(default_factory=KafkaConfig)
    file: FileSourceConfig = msgspec.field(default_factory=FileSourceConfig)
    limits: LimitsConfig = msgspec.field(default_factory=LimitsConfig)
    storage: StorageConfig = msgspec.field(default_factory=StorageConfig)
    sessions: SessionConfig = msgspec.field(default_factory=SessionConfig)
    state: StateConfig = msgspec.field(default_factory=StateConfig)
    detection: DetectionConfig = msgspec.field(default_factory=DetectionConfig)
    alerting: AlertingConfig = msgspec.field(default_factory=AlertingConfig)
    metrics: MetricsConfig = msgspec.field(default_factory=MetricsConfig)
    logging: LoggingConfig = msgspec.field(default_factory=LoggingConfig)
    grafana: GrafanaConfig = msgspec.field(default_factory=GrafanaConfig)

    def validate(self) -> None:
        """Checks that span fields, raising ConfigError with the offending key."""
        problems: list[str] = []
        if not 0.0 < self.detection.alert_threshold <= 1.0:
            problems.append("detection.alert_threshold must be in (0, 1]")
        if not (0 <= self.detection.group_v4_prefix <= 32 and 0 <= self.detection.group_v6_prefix <= 128):
            problems.append("detection.group_v4_prefix must be in [0, 32] and group_v6_prefix in [0, 128]")
        if self.detection.blas_threads < 0:
            problems.append("detection.blas_threads must be 0 (the library's default) or more")
        if not 0.0 <= self.storage.raw_sample_rate <= 1.0:
            problems.append("storage.raw_sample_rate must be in [0, 1]")
        for key, value in (
            ("kafka.batch_max_records", self.kafka.batch_max_records),
            ("kafka.max_partition_fetch_bytes", self.kafka.max_partition_fetch_bytes),
            ("kafka.producer_batch_bytes", self.kafka.producer_batch_bytes),
            ("file.batch_max_records", self.file.batch_max_records),
            ("file.batch_max_bytes", self.file.batch_max_bytes),
            ("limits.max_record_bytes", self.limits.max_record_bytes),
            ("limits.max_vector_len", self.limits.max_vector_len),
            ("sessions.max_open_sessions", self.sessions.max_open_sessions),
        ):
            if value <= 0:
                problems.append(f"{key} must be positive, got {value}")
        if self.source == "kafka":
            problems.extend(self.kafka.problems())
        if self.file.linger_ms < 0:
            problems.append(f"file.linger_ms must be 0 or more, got {self.file.linger_ms}")
        if self.sessions.inactivity_gap_s <= 0 or self.sessions.allowed_lateness_s < 0:
            problems.append("sessions.inactivity_gap_s must be > 0 and sessions.allowed_lateness_s >= 0")
        if 0 < self.sessions.client_ttl_s <= self.sessions.inactivity_gap_s:
            problems.append("sessions.client_ttl_s must be 0 (keep forever) or longer than sessions.inactivity_gap_s")
        problems.extend(self.alerting.problems())
        if self.kafka.processing_guarantee == "exactly_once" and self.state.backend != "changelog":
            # A checkpoint in ClickHouse cannot join the Kafka transaction: an aborted batch would
            # leave state ahead of the committed offsets, and its records would be counted twice.
            problems.append('kafka.processing_guarantee = "exactly_once" needs state.backend = "changelog"')
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.storage.database):
            problems.append(f"storage.database must be a plain identifier, got {self.storage.database!r}")
        if problems:
            raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))


def _parse_env_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _env_overrides(environ: dict[str, str]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        path = [part.lower() for part in name[len(ENV_PREFIX) :].split("__") if part]
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"environment variable {name} conflicts with another one")
        node[path[-1]] = _parse_env_value(raw)
    return tree


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _read_secret_files(tree: Any, path: str = "") -> None:
    """Replace every non-empty ``x_file`` with the file's contents in ``x`` (trailing newline dropped)."""
    if not isinstance(tree, dict):
        return
    for key, value in list(tree.items()):
        if isinstance(value, dict):
            _read_secret_files(value, f"{path}{key}.")
        elif key.endswith("_file") and isinstance(value, str) and value:
            try:
                tree[key[: -len("_file")]] = Path(value).read_text().rstrip("\n")
            except OSError as exc:
                raise ConfigError(f"{path}{key}: cannot read secret file {value!r}: {exc.strerror}") from exc


def load_config(
    path: str | os.PathLike[str] | None = None,
    environ: dict[str, str] | None = None,
    overrides: dict[str, Any] | None = None,
) -> Config:
    """Build the Config from defaults, an optional TOML file, the environment and explicit overrides."""
    environ = dict(os.environ) if environ is None else environ
    tree: dict[str, Any] = {}
    path = path or environ.get("PROBEWATCH_CONFIG") or None
    if path:
        try:
            tree = tomllib.loads(Path(path).read_text())
        except FileNotFoundError as exc:
            raise ConfigError(f"config file not found: {path}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    tree = _deep_merge(tree, _env_overrides(environ))
    if overrides:
        tree = _deep_merge(tree, overrides)
    _read_secret_files(tree)
    try:
        config = msgspec.convert(tree, Config, strict=False)
    except msgspec.ValidationError as exc:
        # msgspec names the offending key as `$.section.key`; make it read like the TOML.
        raise ConfigError(f"invalid configuration: {str(exc).replace('$.', '')}") from exc
    config.validate()
    return config


_SECRET_KEYS = ("hash_key", "password", "token", "secret", "routing_key", "authorization", "api_key", "apikey")


def _is_secret(key: str) -> bool:
    normal = key.lower().replace("-", "_")
    return any(s in normal for s in _SECRET_KEYS)


# Credentials that hide inside values (each pattern's "secret" group): user:password@ in URLs, webhook
# URLs whose path is the token (Slack, Discord), and query parameters named like a credential
# (Google Chat's ?key=…&token=…, signed URLs' sig=…).
_HIDDEN_IN_VALUES = (
    re.compile(r"(?P<head>[a-z][a-z0-9+.-]*://[^/:@\s]*:)(?P<secret>[^@/\s]+)(?=@)", re.IGNORECASE),
    re.compile(r"(?P<head>://hooks\.slack\.com/services/|://[^/\s]*discord(?:app)?\.com/api/webhooks/)(?P<secret>\S+)"),
    re.compile(
        r"(?P<head>[?&][^=&#\s]*(?:token|key|secret|sig|password|auth)[^=&#\s]*=)(?P<secret>[^&#\s]+)", re.IGNORECASE
    ),
)


def _scrub_value(value: str) -> str:
    for pattern in _HIDDEN_IN_VALUES:
        value = pattern.sub(lambda m: m.group("head") + "***", value)
    return value


def secret_values(config: Config) -> list[str]:
    """Every secret the configuration holds, as text (longest first), of 4 characters or more: the
    values of secret keys and the secrets inside other values (see _HIDDEN_IN_VALUES). What must not
    appear in any log line."""
    found: set[str] = set()

    def collect(node: Any, key: str = "") -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                collect(v, k)
        elif isinstance(node, list):
            for v in node:
                collect(v, key)
        elif isinstance(node, str) and node:
            if _is_secret(key):
                found.add(node)
            found.update(m.group("secret") for pattern in _HIDDEN_IN_VALUES for m in pattern.finditer(node))

    collect(msgspec.to_builtins(config))
    # Not shorter ones: hiding every "1" of a log would make it unreadable, and hide no real secret.
    return sorted((secret for secret in found if len(secret) >= 4), key=len, reverse=True)


def redacted(config: Config) -> dict[str, Any]:
    """The configuration as a dict with every secret replaced, safe to log."""
    tree: dict[str, Any] = msgspec.to_builtins(config)

    def scrub(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: ("***" if v and _is_secret(k) else scrub(v)) for k, v in node.items()}
        if isinstance(node, list):
            return [scrub(v) for v in node]
        if isinstance(node, str):
            return _scrub_value(node)
        return node

    result: dict[str, Any] = scrub(tree)
    return result

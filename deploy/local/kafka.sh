#!/usr/bin/env bash
# Single-node Apache Kafka 3.9.1 (KRaft: broker + controller in one JVM) for local
# development and the integration tests. Jars come from Maven Central (see kafka/pom.xml),
# cached under ${PROBEWATCH_CACHE:-$HOME/.cache/probewatch}/kafka-3.9.1/libs.
set -euo pipefail

KAFKA_VERSION=3.9.1
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE_DIR="${PROBEWATCH_CACHE:-$HOME/.cache/probewatch}"
RUN_ROOT="${PROBEWATCH_RUN_DIR:-$HOME/.cache/probewatch/run}"
LIBS="$CACHE_DIR/kafka-$KAFKA_VERSION/libs"
POM="$HERE/kafka/pom.xml"
RUN="$RUN_ROOT/kafka"
DATA="$RUN/data"
PIDFILE="$RUN/kafka.pid"
LOG="$RUN/kafka.out"
HOST=127.0.0.1
PORT="${PROBEWATCH_KAFKA_PORT:-19092}"
CONTROLLER_PORT="${PROBEWATCH_KAFKA_CONTROLLER_PORT:-19094}"
# Authenticated listeners, so that probewatch's TLS and SASL options are tested against a real broker:
# SASL (PLAIN, SCRAM-SHA-256/512) in the clear, SASL over TLS, and TLS with client certificates.
SASL_PORT="${PROBEWATCH_KAFKA_SASL_PORT:-19095}"
SASL_SSL_PORT="${PROBEWATCH_KAFKA_SASL_SSL_PORT:-19096}"
SSL_PORT="${PROBEWATCH_KAFKA_SSL_PORT:-19097}"
TLS="$RUN_ROOT/tls" # made by ensure_test_certs (lib.sh), shared with ClickHouse
# Local test credentials only (PLAIN and SCRAM accept the same user and password).
SASL_USER=probewatch
SASL_PASSWORD=probewatch-local-secret
START_TIMEOUT="${KAFKA_START_TIMEOUT:-120}"
STOP_TIMEOUT="${KAFKA_STOP_TIMEOUT:-30}"
PYTHON="${PYTHON:-python3}"

usage() {
  cat <<EOF
Usage: $(basename "$0") {install|start|stop|restart|status|reset|logs}

Single-node Apache Kafka $KAFKA_VERSION in KRaft mode on $HOST:$PORT (controller $HOST:$CONTROLLER_PORT).
Authenticated listeners for tests of TLS and SASL (user $SASL_USER, password $SASL_PASSWORD):
SASL_PLAINTEXT $HOST:$SASL_PORT and SASL_SSL $HOST:$SASL_SSL_PORT (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512),
SSL $HOST:$SSL_PORT (client certificate required). Certificates: $TLS (ca.pem, client.pem, client.key).

  install   install Java/Maven via apt if missing, resolve the Kafka jars from Maven Central
            into $LIBS (skipped when already there)
  start     format the storage if needed and start the broker; waits until it answers
            (no-op when already running; timeout \$KAFKA_START_TIMEOUT=${START_TIMEOUT}s)
  stop      SIGTERM, wait up to \$KAFKA_STOP_TIMEOUT=${STOP_TIMEOUT}s, then SIGKILL (data is kept)
  restart   stop + start
  status    exit 0 when running and answering, 3 otherwise
  reset     stop and wipe the data (topics, offsets); the next start formats anew
  logs      print the tail of the broker log

Environment: PROBEWATCH_CACHE, PROBEWATCH_RUN_DIR (runtime dir: $RUN),
             PYTHON (interpreter with kafka-python used for the readiness probe; default python3)
EOF
}

SERVICE=kafka
LOG_FILES=("$LOG" "$RUN/server.log")
PROC_PATTERN=kafka.Kafka
# shellcheck source=deploy/local/lib.sh
source "$HERE/lib.sh"

# The jars are complete when the stamp holds the sha256 of the pom they were resolved from.
pom_sha() { sha256sum "$POM" | cut -d' ' -f1; }
libs_ready() {
  [[ -f "$LIBS/.complete" && -f "$LIBS/kafka_2.13-$KAFKA_VERSION.jar" ]] && [[ "$(cat "$LIBS/.complete")" == "$(pom_sha)" ]]
}

apt_install() {
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y -q "$@"; then
    log "apt-get install failed; running apt-get update and retrying"
    apt-get update -q && apt-get install -y -q "$@"
  fi
}

cmd_install() {
  local t0 pkgs=() tmp
  t0="$(now)"
  command -v java >/dev/null 2>&1 || pkgs+=(openjdk-17-jre-headless)
  command -v mvn >/dev/null 2>&1 || libs_ready || pkgs+=(maven)
  command -v openssl >/dev/null 2>&1 || pkgs+=(openssl) # the test listeners' certificates (lib.sh)
  if ((${#pkgs[@]})); then
    log "installing ${pkgs[*]} with apt-get"
    apt_install "${pkgs[@]}"
  fi
  if libs_ready; then
    log "jars already in $LIBS ($(find "$LIBS" -name '*.jar' | wc -l) jars)"
    return 0
  fi
  log "resolving Kafka $KAFKA_VERSION jars from Maven Central into $LIBS"
  mkdir -p "$(dirname "$LIBS")"
  tmp="$(mktemp -d "$(dirname "$LIBS")/libs.tmp.XXXXXX")"
  # Resolve into a temp dir and move it into place, so an interrupted install never
  # leaves a half-filled libs dir that looks complete.
  # (Debian's mvn prints stray ANSI resets even in batch mode: strip them.)
  if ! mvn -B -q -f "$POM" dependency:copy-dependencies -DoutputDirectory="$tmp" -DincludeScope=runtime 2>&1 \
    | sed -e 's/\x1b\[[0-9;]*m//g'; then
    rm -rf "$tmp"
    die "mvn dependency:copy-dependencies failed (is Maven Central reachable?)"
  fi
  pom_sha >"$tmp/.complete"
  rm -rf "$LIBS"
  if ! mv -T "$tmp" "$LIBS" 2>/dev/null; then # a concurrent install won the race
    rm -rf "$tmp"
    libs_ready || die "could not move the jars into $LIBS"
  fi
  log "installed $(find "$LIBS" -name '*.jar' | wc -l) jars in $(elapsed "$t0")"
}

write_config() {
  mkdir -p "$RUN" "$DATA"
  ensure_test_certs
  local plain scram
  plain="org.apache.kafka.common.security.plain.PlainLoginModule required user_$SASL_USER=\"$SASL_PASSWORD\";"
  scram="org.apache.kafka.common.security.scram.ScramLoginModule required;"
  cat >"$RUN/server.properties" <<EOF
# Generated by deploy/local/kafka.sh; edits are overwritten on start.
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@$HOST:$CONTROLLER_PORT
listeners=PLAINTEXT://$HOST:$PORT,CONTROLLER://$HOST:$CONTROLLER_PORT,SASL_PLAINTEXT://$HOST:$SASL_PORT,SASL_SSL://$HOST:$SASL_SSL_PORT,SSL://$HOST:$SSL_PORT
advertised.listeners=PLAINTEXT://$HOST:$PORT,SASL_PLAINTEXT://$HOST:$SASL_PORT,SASL_SSL://$HOST:$SASL_SSL_PORT,SSL://$HOST:$SSL_PORT
controller.listener.names=CONTROLLER
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,SASL_PLAINTEXT:SASL_PLAINTEXT,SASL_SSL:SASL_SSL,SSL:SSL
inter.broker.listener.name=PLAINTEXT
sasl.enabled.mechanisms=PLAIN,SCRAM-SHA-256,SCRAM-SHA-512
listener.name.sasl_plaintext.plain.sasl.jaas.config=$plain
listener.name.sasl_plaintext.scram-sha-256.sasl.jaas.config=$scram
listener.name.sasl_plaintext.scram-sha-512.sasl.jaas.config=$scram
listener.name.sasl_ssl.plain.sasl.jaas.config=$plain
listener.name.sasl_ssl.scram-sha-256.sasl.jaas.config=$scram
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=$scram
ssl.keystore.type=PEM
ssl.keystore.location=$TLS/server.pem
ssl.truststore.type=PEM
ssl.truststore.location=$TLS/ca.pem
listener.name.ssl.ssl.client.auth=required
log.dirs=$DATA
auto.create.topics.enable=false
num.partitions=3
default.replication.factor=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=3
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
min.insync.replicas=1
group.initial.rebalance.delay.ms=0
delete.topic.enable=true
log.retention.hours=24
log.segment.bytes=67108864
num.network.threads=2
num.io.threads=4
EOF
  cat >"$RUN/log4j.properties" <<EOF
# Generated by deploy/local/kafka.sh
log4j.rootLogger=WARN, file
log4j.appender.file=org.apache.log4j.RollingFileAppender
log4j.appender.file.File=$RUN/server.log
log4j.appender.file.MaxFileSize=10MB
log4j.appender.file.MaxBackupIndex=2
log4j.appender.file.layout=org.apache.log4j.PatternLayout
log4j.appender.file.layout.ConversionPattern=[%d] %p %m (%c)%n
log4j.logger.kafka=WARN
log4j.logger.org.apache.kafka=WARN
log4j.logger.kafka.server.KafkaServer=INFO
log4j.logger.kafka.server.BrokerServer=INFO
EOF
}

# Readiness: a real Kafka request (kafka-python's admin list_topics) when $PYTHON has
# kafka-python, otherwise the broker port accepting connections. -I: isolated mode, so a
# directory named "kafka" in the cwd (like deploy/local/kafka/) cannot shadow the package.
HAVE_KAFKA_PYTHON=""
probe() {
  if [[ -z "$HAVE_KAFKA_PYTHON" ]]; then
    HAVE_KAFKA_PYTHON=no
    "$PYTHON" -I -c 'import kafka.admin' >/dev/null 2>&1 && HAVE_KAFKA_PYTHON=yes
  fi
  if [[ "$HAVE_KAFKA_PYTHON" == yes ]]; then
    timeout 20 "$PYTHON" -I - "$HOST:$PORT" >/dev/null 2>&1 <<'PY'
import logging, sys
logging.disable(logging.CRITICAL)
from kafka import KafkaAdminClient
cfg = {"bootstrap_servers": sys.argv[1], "request_timeout_ms": 5000, "client_id": "probewatch-probe"}
if "bootstrap_timeout_ms" in KafkaAdminClient.DEFAULT_CONFIG:  # kafka-python >= 3
    cfg["bootstrap_timeout_ms"] = 5000
else:
    cfg["api_version_auto_timeout_ms"] = 5000
admin = KafkaAdminClient(**cfg)
try:
    admin.list_topics()
finally:
    admin.close()
PY
  else
    port_open "$PORT"
  fi
}

cmd_start() {
  local t0 uuid pid
  t0="$(now)"
  if pid_alive; then
    log "already running (pid $(cat "$PIDFILE")) on $HOST:$PORT"
    return 0
  fi
  libs_ready || cmd_install
  command -v java >/dev/null 2>&1 || die "java not found (run: $0 install)"
  for p in "$PORT" "$CONTROLLER_PORT" "$SASL_PORT" "$SASL_SSL_PORT" "$SSL_PORT"; do
    port_open "$p" && die "port $HOST:$p is already in use by another process (not ours: no live pid in $PIDFILE)"
  done
  write_config
  if [[ ! -f "$DATA/meta.properties" ]]; then
    uuid="$(java -cp "$LIBS/*" kafka.tools.StorageTool random-uuid 2>/dev/null | tail -n 1)"
    [[ -n "$uuid" ]] || die "kafka.tools.StorageTool random-uuid failed"
    log "formatting storage in $DATA (cluster id $uuid)"
    java -Dlog4j.configuration="file:$RUN/log4j.properties" -cp "$LIBS/*" \
      kafka.tools.StorageTool format -t "$uuid" -c "$RUN/server.properties" >"$RUN/format.log" 2>&1 \
      || { cat "$RUN/format.log" >&2; die "storage format failed"; }
  fi
  log "starting Kafka $KAFKA_VERSION on $HOST:$PORT (logs: $RUN)"
  : >"$LOG"
  rm -f "$PIDFILE"
  # setsid: own session/process group, so the broker outlives the calling shell or make.
  # The inner shell records its own pid and then becomes java (exec), so the pid file is java's.
  # shellcheck disable=SC2016  # $$ and $1 are for the inner shell
  setsid bash -c 'echo $$ >"$1"; shift; exec "$@"' _ "$PIDFILE" \
    java -Xms256m -Xmx512m -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -Djava.awt.headless=true \
    -Dlog4j.configuration="file:$RUN/log4j.properties" -Dkafka.logs.dir="$RUN" \
    -cp "$LIBS/*" kafka.Kafka "$RUN/server.properties" \
    </dev/null >>"$LOG" 2>&1 &
  # Wait for the pid file written by the child.
  wait_ready "$t0" "$HOST:$PORT" "try: $0 reset"
  add_scram_user
}

# SCRAM credentials live in the cluster metadata: set them (again) on every start, so that storage
# formatted before the listeners existed has them too. ConfigCommand is kafka-configs.sh.
# (One mechanism per request: the broker refuses two credentials of one user in one.)
add_scram_user() {
  local t0 mechanism
  t0="$(now)"
  for mechanism in SCRAM-SHA-256 SCRAM-SHA-512; do
    java -Dlog4j.configuration="file:$RUN/log4j.properties" -cp "$LIBS/*" kafka.admin.ConfigCommand \
      --bootstrap-server "$HOST:$PORT" --alter --entity-type users --entity-name "$SASL_USER" \
      --add-config "$mechanism=[password=$SASL_PASSWORD]" \
      >"$RUN/scram.log" 2>&1 || { cat "$RUN/scram.log" >&2; die "adding the $mechanism user failed"; }
  done
  log "SCRAM users set in $(elapsed "$t0")"
}

cmd_stop() {
  stop_service ""
}

cmd_status() {
  status_service "$HOST:$PORT"
}

cmd_reset() {
  cmd_stop
  rm -rf "$DATA"
  log "wiped $DATA"
}

dispatch "$@"

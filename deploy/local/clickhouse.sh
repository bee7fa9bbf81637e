#!/usr/bin/env bash
# Local ClickHouse server (Debian's clickhouse-server 18.16) for development and the
# integration tests: native 127.0.0.1:19000, HTTP 127.0.0.1:18123, everything under the run dir.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
RUN_ROOT="${PROBEWATCH_RUN_DIR:-$HOME/.cache/probewatch/run}"
RUN="$RUN_ROOT/clickhouse"
PIDFILE="$RUN/clickhouse.pid"
LOG="$RUN/log/stdout.log"
SERVER=/usr/sbin/clickhouse-server
CLIENT=clickhouse-client
HOST=127.0.0.1
TCP_PORT="${PROBEWATCH_CLICKHOUSE_PORT:-19000}"
HTTP_PORT="${PROBEWATCH_CLICKHOUSE_HTTP_PORT:-18123}"
TCP_SECURE_PORT="${PROBEWATCH_CLICKHOUSE_SECURE_PORT:-19440}" # native protocol over TLS
START_TIMEOUT="${CLICKHOUSE_START_TIMEOUT:-60}"
STOP_TIMEOUT="${CLICKHOUSE_STOP_TIMEOUT:-30}"

usage() {
  cat <<EOF
Usage: $(basename "$0") {install|start|stop|restart|status|reset|logs}

Local ClickHouse (Debian clickhouse-server) on $HOST:$TCP_PORT (native), $HOST:$TCP_SECURE_PORT (native
over TLS, certificates in $RUN_ROOT/tls) and $HOST:$HTTP_PORT (HTTP). Users: default (no password),
probewatch (password probewatch-local-secret).

  install   apt-get install clickhouse-server clickhouse-client when $SERVER is missing
  start     render deploy/local/clickhouse/*.xml into $RUN and start the server;
            waits until 'SELECT 1' answers (no-op when already running;
            timeout \$CLICKHOUSE_START_TIMEOUT=${START_TIMEOUT}s)
  stop      SIGTERM, wait up to \$CLICKHOUSE_STOP_TIMEOUT=${STOP_TIMEOUT}s, then SIGKILL (data is kept)
  restart   stop + start
  status    exit 0 when running and answering, 3 otherwise
  reset     stop and wipe all databases
  logs      print the tail of the server logs

Environment: PROBEWATCH_RUN_DIR (runtime dir: $RUN)
EOF
}

SERVICE=clickhouse
LOG_FILES=("$LOG" "$RUN/log/server.err.log")
PROC_PATTERN=clickhouse
# shellcheck source=deploy/local/lib.sh
source "$HERE/lib.sh"

probe() { timeout 10 "$CLIENT" --host "$HOST" --port "$TCP_PORT" -q 'SELECT 1' >/dev/null 2>&1; }

cmd_install() {
  local t0
  t0="$(now)"
  if ! command -v openssl >/dev/null 2>&1; then # for the TLS port's certificate (lib.sh)
    log "installing openssl with apt-get"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q openssl || die "apt-get install openssl failed"
  fi
  if [[ -x "$SERVER" ]] && command -v "$CLIENT" >/dev/null 2>&1; then
    # shellcheck disable=SC2016  # ${Version} is dpkg-query's format, not a shell variable
    log "already installed: clickhouse-server $(dpkg-query -W -f '${Version}' clickhouse-server 2>/dev/null || echo '?')"
    return 0
  fi
  log "installing clickhouse-server clickhouse-client with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y -q clickhouse-server clickhouse-client; then
    log "apt-get install failed; running apt-get update and retrying"
    apt-get update -q && apt-get install -y -q clickhouse-server clickhouse-client
  fi
  [[ -x "$SERVER" ]] || die "$SERVER still missing after apt-get install"
  log "installed in $(elapsed "$t0")"
}

render_config() {
  mkdir -p "$RUN/data" "$RUN/tmp" "$RUN/user_files" "$RUN/format_schemas" "$RUN/log"
  ensure_test_certs
  local f
  for f in config.xml users.xml; do
    sed -e "s|@CH_DIR@|$RUN|g" -e "s|@TCP_PORT@|$TCP_PORT|g" -e "s|@HTTP_PORT@|$HTTP_PORT|g" \
      -e "s|@TCP_SECURE_PORT@|$TCP_SECURE_PORT|g" -e "s|@TLS_DIR@|$RUN_ROOT/tls|g" \
      "$HERE/clickhouse/$f" >"$RUN/$f"
  done
}

cmd_start() {
  local t0 pid
  t0="$(now)"
  if pid_alive; then
    log "already running (pid $(cat "$PIDFILE")) on $HOST:$TCP_PORT"
    return 0
  fi
  [[ -x "$SERVER" ]] || cmd_install
  for p in "$TCP_PORT" "$HTTP_PORT" "$TCP_SECURE_PORT"; do
    port_open "$p" && die "port $HOST:$p is already in use by another process (not ours: no live pid in $PIDFILE)"
  done
  render_config
  log "starting ClickHouse on $HOST:$TCP_PORT / http $HOST:$HTTP_PORT (data: $RUN/data)"
  rm -f "$PIDFILE"
  : >"$LOG"
  # setsid: own session, so the server outlives the calling shell; cd so that relative
  # paths the server may resolve land in the run dir. The inner shell execs the server,
  # so the pid it records is the server's.
  # shellcheck disable=SC2016  # $$ and $1 are for the inner shell
  setsid bash -c 'echo $$ >"$1"; cd "$2"; shift 2; exec "$@"' _ "$PIDFILE" "$RUN" \
    "$SERVER" --config-file="$RUN/config.xml" </dev/null >>"$LOG" 2>&1 &
  wait_ready "$t0" "$HOST:$TCP_PORT" ""
}

cmd_stop() {
  stop_service ""
}

cmd_status() {
  status_service "$HOST:$TCP_PORT"
}

cmd_reset() {
  cmd_stop
  rm -rf "$RUN/data" "$RUN/tmp"
  log "wiped $RUN/data"
}

dispatch "$@"

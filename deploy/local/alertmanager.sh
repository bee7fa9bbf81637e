#!/usr/bin/env bash
# Local Prometheus Alertmanager (Debian's prometheus-alertmanager 0.25) for development and
# the integration tests: 127.0.0.1:19093, clustering off, every alert to the webhook
# http://127.0.0.1:19080/alertmanager (see alertmanager/alertmanager.yml).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
RUN_ROOT="${PROBEWATCH_RUN_DIR:-$HOME/.cache/probewatch/run}"
RUN="$RUN_ROOT/alertmanager"
DATA="$RUN/data"
PIDFILE="$RUN/alertmanager.pid"
LOG="$RUN/alertmanager.log"
CONFIG="$HERE/alertmanager/alertmanager.yml"
BIN=/usr/bin/prometheus-alertmanager
HOST=127.0.0.1
PORT="${PROBEWATCH_ALERTMANAGER_PORT:-19093}"
START_TIMEOUT="${ALERTMANAGER_START_TIMEOUT:-30}"
STOP_TIMEOUT="${ALERTMANAGER_STOP_TIMEOUT:-15}"

usage() {
  cat <<EOF
Usage: $(basename "$0") {install|start|stop|restart|status|reset|logs}

Local Alertmanager on http://$HOST:$PORT (config: $CONFIG).

  install   apt-get install prometheus-alertmanager when $BIN is missing
  start     start it; waits until GET /-/ready answers 200 (no-op when already running;
            timeout \$ALERTMANAGER_START_TIMEOUT=${START_TIMEOUT}s)
  stop      SIGTERM, wait up to \$ALERTMANAGER_STOP_TIMEOUT=${STOP_TIMEOUT}s, then SIGKILL;
            the storage (silences, notification log) is kept, so a restart keeps that state
  restart   stop + start
  status    exit 0 when running and ready, 3 otherwise
  reset     stop and wipe the storage (silences, notification log)
  logs      print the tail of the log

Environment: PROBEWATCH_RUN_DIR (runtime dir: $RUN)
EOF
}

SERVICE=alertmanager
LOG_FILES=("$LOG")
PROC_PATTERN=alertmanager
# shellcheck source=deploy/local/lib.sh
source "$HERE/lib.sh"

# GET /-/ready must answer 200 (bash /dev/tcp, so no curl/wget is needed).
probe() {
  local status
  # shellcheck disable=SC2016  # $1/$2 are for the inner shell
  status="$(timeout 5 bash -c '
    exec 3<>"/dev/tcp/$1/$2" || exit 1
    printf "GET /-/ready HTTP/1.0\r\nHost: %s:%s\r\n\r\n" "$1" "$2" >&3
    head -n 1 <&3' _ "$HOST" "$PORT" 2>/dev/null)" || return 1
  [[ "$status" == *" 200"* ]]
}

cmd_install() {
  local t0
  t0="$(now)"
  if [[ -x "$BIN" ]]; then
    # shellcheck disable=SC2016  # ${Version} is dpkg-query's format, not a shell variable
    log "already installed: prometheus-alertmanager $(dpkg-query -W -f '${Version}' prometheus-alertmanager 2>/dev/null || echo '?')"
    return 0
  fi
  log "installing prometheus-alertmanager with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y -q prometheus-alertmanager; then
    log "apt-get install failed; running apt-get update and retrying"
    apt-get update -q && apt-get install -y -q prometheus-alertmanager
  fi
  [[ -x "$BIN" ]] || die "$BIN still missing after apt-get install"
  log "installed in $(elapsed "$t0")"
}

cmd_start() {
  local t0 pid
  t0="$(now)"
  if pid_alive; then
    log "already running (pid $(cat "$PIDFILE")) on http://$HOST:$PORT"
    return 0
  fi
  [[ -x "$BIN" ]] || cmd_install
  port_open "$PORT" && die "port $HOST:$PORT is already in use by another process (not ours: no live pid in $PIDFILE)"
  mkdir -p "$DATA"
  log "starting Alertmanager on http://$HOST:$PORT (storage: $DATA)"
  rm -f "$PIDFILE"
  # setsid: own session, so it outlives the calling shell; the inner shell execs the binary,
  # so the pid it records is Alertmanager's.
  # shellcheck disable=SC2016  # $$ and $1 are for the inner shell
  setsid bash -c 'echo $$ >"$1"; shift; exec "$@"' _ "$PIDFILE" \
    "$BIN" --config.file="$CONFIG" \
    --storage.path="$DATA" \
    --web.listen-address="$HOST:$PORT" \
    --web.external-url="http://$HOST:$PORT" \
    --cluster.listen-address= \
    --log.level=info \
    </dev/null >>"$LOG" 2>&1 &
  wait_ready "$t0" "http://$HOST:$PORT" ""
}

cmd_stop() {
  stop_service "storage kept in $DATA"
}

cmd_status() {
  status_service "http://$HOST:$PORT"
}

cmd_reset() {
  cmd_stop
  rm -rf "$DATA"
  log "wiped $DATA (silences, notification log)"
}

dispatch "$@"

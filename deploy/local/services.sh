#!/usr/bin/env bash
# Starts/stops all local services probewatch's integration tests need:
# Kafka (127.0.0.1:19092), ClickHouse (127.0.0.1:19000, http 18123), Alertmanager (127.0.0.1:19093).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SERVICES=(kafka clickhouse alertmanager)

usage() {
  cat <<EOF
Usage: $(basename "$0") {up|down|status} [--fresh]

  up        install what is missing, then start Kafka, ClickHouse and Alertmanager
            (each is a no-op when already running); --fresh (or PROBEWATCH_FRESH=1) first
            wipes their data (deploy/local/<svc>.sh reset)
  down      stop all three (data kept)
  status    status of each; exit 0 only when all three answer

Per service: deploy/local/{kafka,clickhouse,alertmanager}.sh --help
Environment: PROBEWATCH_CACHE, PROBEWATCH_RUN_DIR, PYTHON (interpreter with kafka-python, for
             Kafka's readiness probe)
EOF
}

now() { date +%s.%N; }
elapsed() { awk -v s="$1" -v e="$(now)" 'BEGIN { printf "%.1fs", e - s }'; }

step() { # step SERVICE ACTION: run deploy/local/SERVICE.sh ACTION and report how long it took
  local t0 rc=0
  t0="$(now)"
  echo "==> $1 $2"
  bash "$HERE/$1.sh" "$2" || rc=$?
  if ((rc != 0)); then
    echo "<== $1 $2: FAILED (exit $rc) after $(elapsed "$t0")" >&2
    return "$rc"
  fi
  echo "<== $1 $2: done in $(elapsed "$t0")"
}

cmd_up() {
  local t0 svc fresh="${PROBEWATCH_FRESH:-0}"
  [[ "${1:-}" == "--fresh" ]] && fresh=1
  t0="$(now)"
  for svc in "${SERVICES[@]}"; do
    step "$svc" install
  done
  if [[ "$fresh" == 1 ]]; then
    for svc in "${SERVICES[@]}"; do
      step "$svc" reset
    done
  fi
  for svc in "${SERVICES[@]}"; do
    step "$svc" start
  done
  echo "services up in $(elapsed "$t0"): kafka 127.0.0.1:19092, clickhouse 127.0.0.1:19000 (http 18123)," \
    "alertmanager http://127.0.0.1:19093"
}

cmd_down() {
  local t0 svc rc=0
  t0="$(now)"
  # Reverse order; keep going when one fails so the others still get stopped.
  for svc in alertmanager clickhouse kafka; do
    step "$svc" stop || rc=1
  done
  echo "services down in $(elapsed "$t0")"
  return "$rc"
}

cmd_status() {
  local svc rc=0
  for svc in "${SERVICES[@]}"; do
    bash "$HERE/$svc.sh" status || rc=3
  done
  return "$rc"
}

case "${1:-}" in
  up) shift; cmd_up "$@" ;;
  down) cmd_down ;;
  status) cmd_status ;;
  -h | --help | help) usage ;;
  *) usage >&2; exit 2 ;;
esac

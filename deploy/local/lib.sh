# Shared by the deploy/local service scripts (sourced, not run). Before sourcing, a script sets:
#   SERVICE       log prefix, e.g. "kafka"
#   PROC_PATTERN  text in the process's command line that proves the pid is still this service
#   PIDFILE, HOST, STOP_TIMEOUT, START_TIMEOUT, RUN, LOG_FILES (logs shown when start fails),
#   RUN_ROOT (the run dir of all services: ensure_test_certs)
# and defines probe (exit 0 when the service answers).
# shellcheck shell=bash

log() { printf '[%s] %s\n' "$SERVICE" "$*"; }
die() { printf '[%s] ERROR: %s\n' "$SERVICE" "$*" >&2; exit 1; }
now() { date +%s.%N; }
elapsed() { awk -v s="$1" -v e="$(now)" 'BEGIN { printf "%.1fs", e - s }'; }

port_open() { (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null; }

# The pid file names a live process of this service (a reused pid is not mistaken for it).
pid_alive() {
  local pid
  [[ -f "$PIDFILE" ]] || return 1
  pid="$(cat "$PIDFILE" 2>/dev/null)" || return 1
  [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null && grep -qa "$PROC_PATTERN" "/proc/$pid/cmdline" 2>/dev/null
}

# The end of each log, on stderr: what an operator needs when a start fails.
tail_log() {
  local f
  for f in "${LOG_FILES[@]}"; do
    [[ -s "$f" ]] || continue
    printf -- '----- last lines of %s -----\n' "$f" >&2
    tail -n 40 "$f" >&2
  done
}

# stop_service [NOTE]: SIGTERM, wait up to STOP_TIMEOUT, then SIGKILL.
stop_service() {
  local t0 pid
  t0="$(now)"
  if ! pid_alive; then
    rm -f "$PIDFILE"
    log "not running"
    return 0
  fi
  pid="$(cat "$PIDFILE")"
  log "stopping (pid $pid)${1:+; $1}"
  kill -TERM "$pid" 2>/dev/null || true
  local deadline=$((SECONDS + STOP_TIMEOUT))
  while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then
    log "still alive after ${STOP_TIMEOUT}s: SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
  fi
  rm -f "$PIDFILE"
  log "stopped in $(elapsed "$t0")"
}

# status_service ADDRESS: exit 0 when running and answering, 3 otherwise.
status_service() {
  if pid_alive && probe; then
    log "running (pid $(cat "$PIDFILE")) on $1"
    return 0
  elif pid_alive; then
    log "process running (pid $(cat "$PIDFILE")) but not answering on $1"
    return 3
  fi
  log "not running"
  return 3
}

# wait_ready T0 ADDRESS HINT: after a background start, wait for the pid file, then until probe
# answers (ready: exit 0) or the process dies or START_TIMEOUT passes (both: log tail, then die).
wait_ready() {
  local t0="$1" address="$2" hint="$3" pid
  for _ in $(seq 50); do [[ -s "$PIDFILE" ]] && break; sleep 0.1; done
  pid="$(cat "$PIDFILE" 2>/dev/null || true)"
  local deadline=$((SECONDS + START_TIMEOUT))
  while ((SECONDS < deadline)); do
    # Alive is what the pid we started says (kill -0), not pid_alive's command-line check: while the
    # starter shell execs the service, /proc/PID/cmdline can read empty, and a start was once failed
    # at 0.0 s with the service running.
    if ! kill -0 "$pid" 2>/dev/null; then
      tail_log
      die "$SERVICE exited during startup (see the log above${hint:+; $hint})"
    fi
    if probe; then
      log "ready on $address (pid $pid) in $(elapsed "$t0")"
      return 0
    fi
    sleep 0.3
  done
  tail_log
  die "$SERVICE not ready on $address within ${START_TIMEOUT}s (pid $pid still running; logs in $RUN)"
}

# dispatch ACTION: the command line every service script shares.
dispatch() {
  case "${1:-}" in
    install) cmd_install ;;
    start) cmd_start ;;
    stop) cmd_stop ;;
    restart) cmd_stop; cmd_start ;;
    status) cmd_status ;;
    reset) cmd_reset ;;
    logs) tail_log 2>&1 ;;
    -h | --help | help) usage ;;
    *) usage >&2; exit 2 ;;
  esac
}

# ensure_test_certs: a local CA, a server certificate (for 127.0.0.1 and localhost) and a client
# certificate, made with openssl once into $RUN_ROOT/tls and shared by the services' TLS listeners
# (Kafka reads server.pem: the PKCS#8 key, then the certificate; ClickHouse server.crt and server.key).
# Made in a temporary folder and moved into place, so an interrupted run leaves no half set.
ensure_test_certs() {
  local tls="$RUN_ROOT/tls" tmp
  [[ -s "$tls/server.pem" && -s "$tls/ca.pem" && -s "$tls/client.pem" && -s "$tls/client.key" ]] && return 0
  command -v openssl >/dev/null 2>&1 || die "openssl not found (apt-get install openssl)"
  log "making a local CA and test certificates in $tls"
  mkdir -p "$RUN_ROOT"
  tmp="$(mktemp -d "$RUN_ROOT/tls.tmp.XXXXXX")"
  if ! (
    cd "$tmp"
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=probewatch local CA" \
      -keyout ca.key -out ca.pem
    openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" -keyout server.key -out server.csr
    printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\n' >server.ext
    openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 3650 \
      -extfile server.ext -out server.crt
    openssl req -newkey rsa:2048 -nodes -subj "/CN=probewatch-client" -keyout client.key -out client.csr
    openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 3650 -out client.pem
    openssl pkcs8 -topk8 -nocrypt -in server.key -out server.pk8
    cat server.pk8 server.crt >server.pem
    rm -f ./*.csr server.ext server.pk8
  ) >"$tmp/openssl.log" 2>&1; then
    cat "$tmp/openssl.log" >&2
    rm -rf "$tmp"
    die "making the test certificates failed"
  fi
  rm -f "$tmp/openssl.log"
  rm -rf "$tls"
  mv -T "$tmp" "$tls" 2>/dev/null || rm -rf "$tmp" # another start made them meanwhile
}

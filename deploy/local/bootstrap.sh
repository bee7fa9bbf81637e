#!/usr/bin/env bash
# Creates/updates the repo's virtualenv .venv (Python 3.11) with `pip install -e '.[dev]'`.
# Skips the install when .venv/.probewatch-stamp holds the sha256 of pyproject.toml.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="$ROOT/.venv"
STAMP="$VENV/.probewatch-stamp"

usage() {
  cat <<EOF
Usage: $(basename "$0") [--force]

Creates $VENV with python3.11 (or python3 when that is >= 3.11; override with
\$BOOTSTRAP_PYTHON) and runs pip install -e '.[dev]' in it, using pip's default cache.
The install is skipped while pyproject.toml is unchanged (stamp: $STAMP);
--force reinstalls anyway.
EOF
}

log() { printf '[bootstrap] %s\n' "$*"; }
die() { printf '[bootstrap] ERROR: %s\n' "$*" >&2; exit 1; }
now() { date +%s.%N; }
elapsed() { awk -v s="$1" -v e="$(now)" 'BEGIN { printf "%.1fs", e - s }'; }

force=0
case "${1:-}" in
  "") ;;
  --force) force=1 ;;
  -h | --help) usage; exit 0 ;;
  *) usage >&2; exit 2 ;;
esac

is_py311plus() { "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' >/dev/null 2>&1; }

pick_python() {
  local c
  for c in ${BOOTSTRAP_PYTHON:-} python3.11 python3; do
    if command -v "$c" >/dev/null 2>&1 && is_py311plus "$c"; then
      echo "$c"
      return 0
    fi
  done
  return 1
}

t0="$(now)"
cd "$ROOT"
[[ -f pyproject.toml ]] || die "no pyproject.toml in $ROOT"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"

# A venv whose interpreter no longer runs (moved repo, removed Python) is rebuilt.
if [[ -d "$VENV" ]] && ! "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1; then
  log "$VENV is broken; recreating it"
  rm -rf "$VENV"
fi

if [[ ! -x "$VENV/bin/python" ]]; then
  py="$(pick_python)" || die "Python >= 3.11 not found (tried ${BOOTSTRAP_PYTHON:-} python3.11 python3)"
  log "creating $VENV with $py ($("$py" --version 2>&1))"
  "$py" -m venv "$VENV"
fi

if ((force == 0)) && [[ -f "$STAMP" ]] && [[ "$(cat "$STAMP")" == "$want" ]]; then
  log "$VENV is up to date with pyproject.toml (stamp $STAMP); nothing to do ($(elapsed "$t0"))"
  exit 0
fi

log "installing: pip install --no-compile -e '.[dev]' into $VENV"
rm -f "$STAMP"
# --no-compile: byte-compiling every installed module takes longer than the whole download
# here (~40 s of ~85 s); Python compiles what is actually imported on first use instead.
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-compile -e '.[dev]'
echo "$want" >"$STAMP"
log "done in $(elapsed "$t0") ($("$VENV/bin/python" --version 2>&1))"

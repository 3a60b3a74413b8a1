#!/usr/bin/env bash
# CDME's two commands on a machine with only Python 3.11+:
#   ./run_cdme.sh          the main job: embedded PostgreSQL (unless CDME_WAREHOUSE_URL is set), a demo epoch
#                          of generated trades, `dbt build` of the reference project, a summary
#   ./run_cdme.sh test     ruff, mypy and the whole pytest suite (extra arguments go to pytest)
# Both create .venv and install the project on first use (again whenever pyproject.toml changes).
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$(pwd)
STATE="${CDME_HOME:-$ROOT/.cdme}"
mkdir -p "$STATE"

fail() { echo "run_cdme.sh: $*" >&2; exit "${2:-1}"; }

find_python() {
  local candidate
  for candidate in "${PYTHON:-}" python3.13 python3.12 python3.11 python3 python; do
    [ -n "$candidate" ] && command -v "$candidate" >/dev/null 2>&1 || continue
    if "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      echo "$candidate"; return 0
    fi
  done
  return 1
}

bootstrap() {  # $1: pip extras ("" or "[dev]")
  local extras="$1" stamp=".venv/.cdme-installed" want python
  want="$(sha256sum pyproject.toml | cut -d' ' -f1)$extras"
  if [ ! -x .venv/bin/python ]; then
    python=$(find_python) || fail "no Python 3.11+ found: install it or set PYTHON=/path/to/python3.11"
    "$python" -m venv .venv >"$STATE/bootstrap.log" 2>&1 || fail "creating .venv failed; see $STATE/bootstrap.log"
  fi
  if ! grep -qxF "$want" "$stamp" 2>/dev/null; then
    echo "run_cdme.sh: installing CDME and its dependencies into .venv (first run takes a few minutes)" >&2
    { .venv/bin/python -m pip install --upgrade pip \
        && .venv/bin/python -m pip install -e ".$extras"; } >"$STATE/bootstrap.log" 2>&1 \
      || fail "installing dependencies failed; see $STATE/bootstrap.log"
    # The dev install is a superset: remember both so the main job does not reinstall after the tests.
    { echo "$want"; [ "$extras" = "[dev]" ] && echo "${want%\[dev\]}"; } >"$stamp"
  fi
  export PATH="$ROOT/.venv/bin:$PATH"
}

step() {  # $1: what the step does, then the command; one line on failure, the command's exit code
  local what="$1" err rc=0
  shift
  err=$(mktemp)
  "$@" 2>"$err" || rc=$?
  if [ "$rc" -ne 0 ]; then
    local reason
    reason=$(grep -v '^\s*$' "$err" | tail -n 1)
    rm -f "$err"
    fail "$what failed: ${reason:-exit $rc}" "$rc"
  fi
  rm -f "$err"
}

main_job() {
  bootstrap ""
  local epoch="${CDME_DEMO_EPOCH:-2026-11-20}" trades="${CDME_DEMO_TRADES:-100000}"
  if [ -z "${CDME_WAREHOUSE_URL:-}" ]; then
    step "starting the embedded PostgreSQL" cdme warehouse start
  fi
  # Services authenticate every call; the demo gets a random token in $STATE/auth/token, never "auth off".
  step "creating the demo bearer token" cdme auth token >/dev/null
  step "generating epoch $epoch" cdme generate --trades "$trades" --epoch "$epoch"
  step "building the dbt project for $epoch" cdme build --epoch "$epoch" --quiet
  echo "CDME demo complete: epoch $epoch built; warehouse: $(cdme warehouse url 2>/dev/null | sed -E 's#//([^:]+):[^@]*@#//\1:***@#')"
}

run_tests() {
  bootstrap "[dev]"
  echo "== ruff check"; ruff check .
  echo "== ruff format --check"; ruff format --check .
  echo "== mypy"; mypy
  echo "== pytest"
  local rc=0
  pytest "$@" || rc=$?
  [ "$rc" -eq 5 ] && fail "pytest collected no tests" 5
  return "$rc"
}

case "${1:-}" in
  test) shift; run_tests "$@" ;;
  "") main_job ;;
  -h|--help) sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//' ;;
  *) fail "unknown command '$1'; use ./run_cdme.sh (main job) or ./run_cdme.sh test" 2 ;;
esac

#!/usr/bin/env bash
# CDME's commands on a machine with only Python 3.11+:
#   ./run_cdme.sh          the main job: embedded PostgreSQL (unless CDME_WAREHOUSE_URL is set), the four
#                          services on free loopback ports, a demo epoch of generated trades, then the planner
#                          runs it (validate, dbt build, capture, finalize) over HTTP with live progress and a
#                          summary; exit 0 only when the run is COMPLETE
#   ./run_cdme.sh test     ruff, mypy and the whole pytest suite (extra arguments go to pytest)
#   ./run_cdme.sh status   the services (pid, URL, readiness) and the latest runs
#   ./run_cdme.sh stop     stop the services (by pid) and the embedded PostgreSQL
#   ./run_cdme.sh logs [RUN_ID|SERVICE]   a run's dbt log (default: the latest run), or a service's log
#   ./run_cdme.sh backward MODEL KEY [...] / impact ENTITY KEY... [...]   the adjoint service's traces
# All create .venv and install the project on first use (again whenever pyproject.toml changes).
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
  echo "== services"
  step "starting the services" cdme services start
  echo "== epoch $epoch"
  step "generating epoch $epoch" cdme generate --trades "$trades" --epoch "$epoch"
  echo "== run"
  # The planner drives validate -> dbt build -> capture -> finalize; on failure cdme prints one line
  # (run, step, reason) and exits non-zero, and so does this script.
  cdme run --epoch "$epoch" --summary
}

planner_cli() {  # the operators' subcommands: thin wrappers over the services' HTTP APIs
  bootstrap ""
  local command="$1"
  shift
  case "$command" in
    status)
      local rc=0
      cdme services status || rc=$?
      [ "$rc" -eq 0 ] && cdme runs --limit 5
      return "$rc" ;;
    stop)
      cdme services stop
      [ -z "${CDME_WAREHOUSE_URL:-}" ] && cdme warehouse stop
      return 0 ;;
    logs)
      local what="${1:-}"
      case "$what" in
        validation|adjoint|lineage|planner) tail -n "${LINES:-100}" "$STATE/logs/$what.log" ;;
        "") local latest
            latest=$(cdme runs --limit 1 | head -n 1 | cut -d' ' -f1)
            [ -n "$latest" ] && [ "$latest" != "0" ] || fail "no run yet" 1
            cdme run-logs "$latest" --no-follow ;;
        *) cdme run-logs "$what" "${@:2}" ;;
      esac ;;
    backward|impact) export_service_urls; cdme "$command" "$@" ;;
  esac
}

export_service_urls() {  # the running services' URLs, for commands that read CDME_<SERVICE>_URL
  local svc port var
  for svc in validation adjoint lineage planner; do
    port=$(cat "$STATE/services/$svc.port" 2>/dev/null || true)
    var="CDME_$(echo "$svc" | tr '[:lower:]' '[:upper:]')_URL"
    [ -n "$port" ] && export "$var=http://127.0.0.1:$port"
  done
  return 0
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
  status|stop|logs|backward|impact) planner_cli "$@" ;;
  -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//' ;;
  *) fail "unknown command '$1'; use ./run_cdme.sh (main job), test, status, stop, logs, backward or impact" 2 ;;
esac

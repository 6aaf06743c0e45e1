#!/usr/bin/env bash
# Set up and run the test suite on a fresh machine (Python 3.11 + pip).
# Creates .venv and installs the project with its test extras (scripts/setup.sh test), then runs
# pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
export MLFLOW_DISABLE_TELEMETRY=true
bash scripts/setup.sh test

# PostgreSQL for the multi-worker study tests (tests/test_study_postgres.py): as root on a
# Debian-like machine it is installed once, started, and given a test role and database; the
# tests read GENOPT_TEST_POSTGRES_URL. Anywhere else they skip and say why.
start_postgres() {
  command -v pg_lsclusters >/dev/null 2>&1 || {
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql
  } >/dev/null 2>&1 || return 0
  local version cluster port _
  read -r version cluster port _ < <(pg_lsclusters --no-header 2>/dev/null | head -n 1) || return 0
  pg_ctlcluster "$version" "$cluster" start >/dev/null 2>&1 || true  # fails if already running
  psql_() { su postgres -c "psql -p $port -qtAX -c \"$1\"" 2>/dev/null; }
  [ "$(psql_ "SELECT 1 FROM pg_roles WHERE rolname='genopt'")" = 1 ] ||
    psql_ "CREATE ROLE genopt LOGIN CREATEDB PASSWORD 'genopt'" >/dev/null || return 0
  [ "$(psql_ "SELECT 1 FROM pg_database WHERE datname='genopt_test'")" = 1 ] ||
    psql_ "CREATE DATABASE genopt_test OWNER genopt" >/dev/null || return 0
  export GENOPT_TEST_POSTGRES_URL="postgresql://genopt:genopt@localhost:$port/genopt_test"
}
if [ -z "${GENOPT_TEST_POSTGRES_URL:-}" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  start_postgres
fi

# Chromium for the lineage page's browser test (tests/test_plugin_browser.py, driven by Playwright
# with the system browser, never a downloaded one): as root on a Debian-like machine it is
# installed once (with fonts, for readable screenshots). Anywhere else the test skips and says why.
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      chromium fonts-liberation; } >/dev/null 2>&1 || echo "scripts/test.sh: could not install chromium" >&2
fi

exec .venv/bin/python -m pytest "$@"

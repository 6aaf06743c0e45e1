#!/usr/bin/env bash
# Set up and run the test suite on a fresh machine (Python 3.11 + pip).
# Creates .venv, installs the project with its test extras, then runs pytest.
# The first install compiles llama-cpp-python (about 10 minutes on 2 cores); pip's wheel cache
# makes later installs fast.
set -euo pipefail
cd "$(dirname "$0")/.."
export MLFLOW_DISABLE_TELEMETRY=true
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[test]"
exec .venv/bin/python -m pytest "$@"

#!/usr/bin/env bash
# Set up the project's virtual environment on a fresh machine (Python 3.11 + pip):
#   bash scripts/setup.sh          the library, CLI and case studies
#   bash scripts/setup.sh test     ... plus the test extras
# The first install compiles llama-cpp-python (about 10 minutes on 2 cores); pip's wheel cache
# makes later installs fast. llama.cpp is built for a portable x86-64 baseline (AVX2, FMA, F16C)
# instead of the build machine's native instruction set: a native build on CPUs that announce
# AMX uses AMX tile instructions, which some virtual machines do not allow, and the embedded
# model then dies with SIGILL on its first call. Set CMAKE_ARGS yourself to choose other flags
# (e.g. CMAKE_ARGS="-DGGML_NATIVE=ON" on a machine where native code runs).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
if [ "${1:-}" = test ]; then
  .venv/bin/python -m pip install --quiet -e ".[test]"
else
  .venv/bin/python -m pip install --quiet -e .
fi

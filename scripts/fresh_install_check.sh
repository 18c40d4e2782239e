#!/usr/bin/env bash
# The README's first command on a fresh checkout, in a clean venv without the test requirements:
#   pip install -e . && python checkpoints/default_model.py && python serve.py
# then one greedy /v1/completions request. It proves the package installs and serves without
# torch (a test-only dependency): the default model folder, its tokenizer included, is built
# from the GGUF file by jaxserve's own code.
#
# Everything happens in a `mktemp -d` folder, removed at the end: a copy of the working tree as
# a checkout has it (tracked and not-ignored files: no .venv, no built model folder), and the
# venv. The GGUF file is seeded from checkpoints/models when present (default_model.py checks its
# sha256 and builds the rest of the folder from it), otherwise default_model.py downloads it.
#
# Usage: bash scripts/fresh_install_check.sh      (PYTHON=python3.11 to pick the interpreter;
#        FRESH_HEALTH_TIMEOUT=seconds to bound the server start-up, default 600)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
HEALTH_TIMEOUT=${FRESH_HEALTH_TIMEOUT:-600}
export PIP_DISABLE_PIP_VERSION_CHECK=1

WORK=$(mktemp -d "${TMPDIR:-/tmp}/jaxserve-fresh.XXXXXX")
SERVER_PID=""
cleanup() {
  if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT

T0=$(date +%s)
say() { echo "fresh_install_check [$(($(date +%s) - T0))s]: $*"; }
fail() { echo "fresh_install_check: FAILED: $*" >&2; exit 1; }

# --- a fresh checkout: the working tree's tracked and untracked-but-not-ignored files ----------
mkdir -p "$WORK/src"
git -C "$ROOT" rev-parse --git-dir >/dev/null 2>&1 || fail "$ROOT is not a git checkout"
"$PY" - "$ROOT" "$WORK/src" <<'EOF'
import os, shutil, subprocess, sys
root, dst = sys.argv[1:]
out = subprocess.run(["git", "-C", root, "ls-files", "-z", "--cached", "--others",
                      "--exclude-standard"], check=True, capture_output=True).stdout
for rel in filter(None, out.decode().split("\0")):
    src = os.path.join(root, rel)
    if os.path.isfile(src):     # skips files deleted in the working tree, and submodules
        os.makedirs(os.path.dirname(os.path.join(dst, rel)), exist_ok=True)
        shutil.copy2(src, os.path.join(dst, rel))
EOF
GGUF=checkpoints/models/SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf
if [ -f "$ROOT/$GGUF" ]; then
  mkdir -p "$(dirname "$WORK/src/$GGUF")"
  cp "$ROOT/$GGUF" "$WORK/src/$GGUF"
fi
say "copied the checkout to $WORK/src"

# --- clean venv; the README's command, step by step ---------------------------------------------
"$PY" -m venv "$WORK/venv"
export VIRTUAL_ENV="$WORK/venv" PATH="$WORK/venv/bin:$PATH"
cd "$WORK/src"
pip install -e . >"$WORK/pip.log" 2>&1 || { tail -n 40 "$WORK/pip.log" >&2; fail "pip install -e ."; }
say "pip install -e . done ($(pip list 2>/dev/null | wc -l) lines in pip list)"
if python -c 'import torch' 2>/dev/null; then
  fail "torch got installed by 'pip install -e .'; jaxserve must not need it"
fi
python checkpoints/default_model.py || fail "python checkpoints/default_model.py"
say "default model folder built: $(ls checkpoints/models/SmolLM2-135M-Instruct | tr '\n' ' ')"

PORT=$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
python serve.py --port "$PORT" >"$WORK/server.log" 2>&1 &
SERVER_PID=$!
say "started python serve.py --port $PORT (pid $SERVER_PID)"

# http METHOD URL [JSON]: prints the body of a 2xx answer, else exits non-zero
http() {
  python - "$@" <<'EOF'
import sys, urllib.request
method, url = sys.argv[1:3]
body = sys.argv[3].encode() if len(sys.argv) > 3 and sys.argv[3] else None
req = urllib.request.Request(url, data=body, method=method,
                             headers={"Content-Type": "application/json"})
try:
    with urllib.request.urlopen(req, timeout=float(sys.argv[4]) if len(sys.argv) > 4 else 120) as r:
        sys.stdout.write(r.read().decode())
except Exception as e:  # connection refused while warming up, HTTP errors, timeouts
    sys.exit(f"{method} {url}: {e}")
EOF
}
server_log() { echo "----- server log (last 60 lines) -----" >&2; tail -n 60 "$WORK/server.log" >&2; }

BASE="http://127.0.0.1:$PORT"
DEADLINE=$(($(date +%s) + HEALTH_TIMEOUT))
until http GET "$BASE/health" "" 5 >/dev/null 2>&1; do
  if ! kill -0 "$SERVER_PID" 2>/dev/null; then
    server_log; SERVER_PID=""; fail "the server exited before /health answered"
  fi
  if [ "$(date +%s)" -ge "$DEADLINE" ]; then
    server_log; fail "/health did not answer 200 within ${HEALTH_TIMEOUT}s"
  fi
  sleep 2
done
say "/health is 200"

MODEL=$(http GET "$BASE/v1/models" | python -c 'import json, sys; print(json.load(sys.stdin)["data"][0]["id"])') \
  || { server_log; fail "GET /v1/models"; }
REQ=$(python -c 'import json, sys; print(json.dumps({"model": sys.argv[1], "max_tokens": 8,
  "prompt": "The capital of France is", "temperature": 0}))' "$MODEL")
ANSWER=$(http POST "$BASE/v1/completions" "$REQ" 300) || { server_log; fail "POST /v1/completions"; }
TEXT=$(python -c '
import json, sys
text = json.loads(sys.argv[1])["choices"][0]["text"]
assert isinstance(text, str) and text, "empty choices[0].text"
print(repr(text))' "$ANSWER") || { server_log; fail "bad /v1/completions answer: $ANSWER"; }
say "/v1/completions ($MODEL): 'The capital of France is' -> $TEXT"

kill -TERM "$SERVER_PID"
STOP_DEADLINE=$(($(date +%s) + 60))
while kill -0 "$SERVER_PID" 2>/dev/null && [ "$(date +%s)" -lt "$STOP_DEADLINE" ]; do sleep 1; done
if kill -0 "$SERVER_PID" 2>/dev/null; then
  server_log; fail "the server did not stop within 60s of SIGTERM"
fi
wait "$SERVER_PID" 2>/dev/null || true
SERVER_PID=""
say "server stopped on SIGTERM; OK"

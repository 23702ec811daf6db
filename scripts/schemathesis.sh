#!/usr/bin/env bash
# schemathesis (PyPI) against docs/openapi.yaml and a real `floodgate serve`: every check, a
# fixed example budget and seed, zero failures allowed. Run by scripts/test.sh.
#
#   ./scripts/schemathesis.sh                 # uses clients/python/.venv (creates it if needed)
#   EXAMPLES=300 SEED=7 ./scripts/schemathesis.sh    # a bigger budget, another seed
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-$ROOT/clients/python/.venv}"
EXAMPLES="${EXAMPLES:-100}"
SEED="${SEED:-1}"
SCHEMATHESIS="schemathesis==4.32.5"

if ! "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1; then
  echo "== creating $VENV"
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
fi
if ! "$VENV/bin/st" --version 2>/dev/null | grep -q "4.32.5"; then
  echo "== installing $SCHEMATHESIS into $VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$SCHEMATHESIS"
fi

cargo build -q -p floodgate-cli
# Where cargo put it: CARGO_TARGET_DIR (or a config's target-dir) moves it out of target/, and
# a fixed target/debug/floodgate would then be missing or stale.
BIN="$(cargo metadata -q --no-deps --format-version 1 \
  | "$PYTHON" -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')/debug/floodgate"
WORK="$(mktemp -d)"
# Limiters the generated names may hit; short waits so long polls end quickly.
cat > "$WORK/floodgate.toml" <<TOML
[limiters.x]
concurrency = 5
max_wait_ms = 20
[limiters.r]
rate = { limit = 100, period_ms = 1000 }
max_wait_ms = 20
TOML
# The server binds port 0 itself and reports the address in its "floodgate listening" log line
# (JSON logs), so no port is picked and released for another process to take in between.
FLOODGATE_LOG_FORMAT=json FLOODGATE_LOG=info \
  "$BIN" serve --listen 127.0.0.1:0 --config "$WORK/floodgate.toml" >"$WORK/server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true; wait $SERVER 2>/dev/null || true; rm -rf "$WORK"' EXIT
# Up to a minute for the server to listen and answer (a liveness bound for a loaded machine),
# else stop here with its log rather than let schemathesis fail on a refused connection.
ADDR=""
READY=""
for _ in $(seq 600); do
  if [ -z "$ADDR" ]; then
    ADDR="$("$VENV/bin/python" - "$WORK/server.log" <<'PY'
import json, sys
for line in open(sys.argv[1], errors="replace"):
    try:
        entry = json.loads(line)
    except ValueError:
        continue
    if entry.get("message") == "floodgate listening":
        print(entry["local"])
        break
PY
)"
  fi
  if [ -n "$ADDR" ] && "$VENV/bin/python" -c "import urllib.request; urllib.request.urlopen('http://$ADDR/healthz')" 2>/dev/null; then READY=1; break; fi
  kill -0 $SERVER 2>/dev/null || break
  sleep 0.1
done
if [ -z "$READY" ]; then
  echo "floodgate serve never answered (address: ${ADDR:-none reported})" >&2
  cat "$WORK/server.log" >&2
  exit 1
fi

echo "== schemathesis $SCHEMATHESIS: every check, $EXAMPLES examples per operation, seed $SEED"
# Hypothesis's own files go under target/ too (the crash files: scripts/schemathesis.toml).
HYPOTHESIS_STORAGE_DIRECTORY="$ROOT/target/hypothesis" \
  "$VENV/bin/st" --config-file scripts/schemathesis.toml run docs/openapi.yaml --url "http://$ADDR" \
    --checks all --max-examples "$EXAMPLES" --seed "$SEED" \
    --generation-database none --workers 1 --request-timeout 10 --no-color --warnings off

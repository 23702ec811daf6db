#!/usr/bin/env bash
# The dashboard's browser tests: Debian's chromium + chromium-driver (installed when missing),
# Selenium in a virtualenv (tests/browser/.venv), the server built by cargo.
set -euo pipefail
cd "$(dirname "$0")"
ROOT="$(cd ../.. && pwd)"
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  echo "== installing chromium and chromium-driver"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
fi
VENV="${VENV:-.venv}"
if ! "$VENV/bin/python" -c 'import selenium' >/dev/null 2>&1; then
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check 'selenium>=4.20,<5'
fi
if [ -z "${FLOODGATE_BIN:-}" ]; then
  (cd "$ROOT" && cargo build -q -p floodgate-cli)
  # The binary just built, wherever CARGO_TARGET_DIR (or a config's target-dir) put it:
  # dashboard_test.py's fallback, target/debug/floodgate, would be missing or stale then.
  FLOODGATE_BIN="$(cd "$ROOT" && cargo metadata -q --no-deps --format-version 1 \
    | python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')/debug/floodgate"
  export FLOODGATE_BIN
fi
exec timeout 300 "$VENV/bin/python" dashboard_test.py

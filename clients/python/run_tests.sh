#!/usr/bin/env bash
# Tests of the Python client against the real server. Creates a virtualenv in .venv (or $VENV),
# installs the package with its test extras (pytest, celery[redis], redis, mypy, ruff) from this directory,
# type-checks the package with `mypy --strict`, lints it and its tests with `ruff check`,
# builds the server with cargo (unless FLOODGATE_BIN names one), and runs pytest; the fixtures
# start floodgate serve, redis-server and a Celery worker on free loopback ports and stop them.
#
#   ./run_tests.sh                      # everything (about 30 s once installed)
#   ./run_tests.sh -m 'not e2e' -x      # arguments go to pytest
#   PYTHON=python3.9 VENV=.venv39 ./run_tests.sh
set -euo pipefail
cd "$(dirname "$0")"
HERE="$(pwd)"
REPO_ROOT="$(cd ../.. && pwd)"
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"

# The end-to-end test needs redis-server (the Celery broker and the backend's witness).
if ! command -v redis-server >/dev/null; then
  echo "== installing redis-server"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq redis-server >/dev/null
fi

if ! "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1; then
  echo "== creating $VENV with $("$PYTHON" --version 2>&1)"
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
fi
echo "== installing floodgate[test] into $VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "$HERE[test]"
rm -rf "$HERE/build"

if [ -z "${FLOODGATE_BIN:-}" ]; then
  if command -v cargo >/dev/null; then
    echo "== cargo build -p floodgate-cli"
    (cd "$REPO_ROOT" && cargo build -q -p floodgate-cli)
    # The binary just built, wherever CARGO_TARGET_DIR (or a config's target-dir) put it: a
    # fixed target/debug/floodgate would be stale or missing then (tests/conftest.py).
    FLOODGATE_BIN="$("$VENV/bin/python" -c 'import sys; sys.path.insert(0, "tests")
from conftest import cargo_binary; print(cargo_binary())')"
  elif [ ! -x "$REPO_ROOT/target/debug/floodgate" ]; then
    echo "target/debug/floodgate is missing and cargo is not installed; set FLOODGATE_BIN" >&2
    exit 1
  else
    FLOODGATE_BIN="$REPO_ROOT/target/debug/floodgate"
  fi
  export FLOODGATE_BIN
fi

echo "== mypy --strict src"
"$VENV/bin/python" -m mypy --strict src
echo "== ruff check src tests"
"$VENV/bin/python" -m ruff check src tests

echo "== pytest (server: $FLOODGATE_BIN)"
exec "$VENV/bin/python" -m pytest -p no:cacheprovider "$@"

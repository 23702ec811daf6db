#!/usr/bin/env bash
# Every test of the project, in the order a failure is cheapest to find. CI runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

# Tests start real redis-server processes (standalone and cluster) on free loopback ports.
if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; then
  echo "== installing redis-server"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq redis-server >/dev/null
fi

# `floodgate top` is tested in a tmux pseudo-terminal; the Grafana queries and alerting rules
# against a real Prometheus (Debian's package, with promtool).
if ! command -v tmux >/dev/null || ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then
  echo "== installing tmux and prometheus"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  $SUDO DEBIAN_FRONTEND=noninteractive apt-get install -y -qq tmux prometheus >/dev/null
fi

echo "== format"
cargo fmt --all -- --check
echo "== clippy"
cargo clippy --workspace --all-targets -- -D warnings
cargo clippy -p floodgate --features shuttle --tests -- -D warnings
echo "== tests"
cargo test --workspace
echo "== randomized schedules (shuttle)"
cargo test -p floodgate --features shuttle --test shuttle_schedules
echo "== Python client and Celery (against the real server, Redis and a Celery worker)"
./clients/python/run_tests.sh -q
echo "== dashboard in a real headless Chromium (tests/browser; installs chromium, chromedriver, selenium)"
./tests/browser/run.sh

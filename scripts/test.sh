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

# The crash test restarts the server with its wall clock set back (libfaketime).
if [ ! -e /usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1 ] && command -v apt-get >/dev/null; then
  echo "== installing faketime"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq faketime >/dev/null
fi
# TLS tests make certificates with openssl and call curl; the deploy recipes' test parses the
# Kubernetes manifests with PyYAML (and runs systemd-analyze when the machine has systemd).
if ! command -v openssl >/dev/null || ! command -v curl >/dev/null \
  || ! python3 -c 'import yaml' 2>/dev/null; then
  echo "== installing openssl, curl, python3-yaml"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq openssl curl python3-yaml >/dev/null
fi
# `floodgate top` is tested in a tmux pseudo-terminal; the Grafana queries and alerting rules
# against a real Prometheus (Debian's package, with promtool).
if ! command -v tmux >/dev/null || ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then
  echo "== installing tmux and prometheus"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq tmux prometheus >/dev/null
fi

echo "== format"
cargo fmt --all -- --check
echo "== clippy"
cargo clippy --workspace --all-targets -- -D warnings
cargo clippy -p floodgate --features shuttle --tests -- -D warnings
echo "== docs (rustdoc -D warnings: the workspace, and the library as users see it, core sealed)"
RUSTDOCFLAGS="-D warnings" cargo doc -q --workspace --no-deps
RUSTDOCFLAGS="-D warnings" cargo doc -q -p floodgate --no-deps
echo "== tests"
cargo test --workspace
echo "== randomized schedules (shuttle)"
cargo test -p floodgate --features shuttle --test shuttle_schedules
echo "== Python client and Celery (against the real server, Redis and a Celery worker)"
./clients/python/run_tests.sh -q
echo "== slow clients, SIGTERM under them, memory after long polls (RSS and fds printed)"
cargo test -q -p floodgate-cli --test slow_clients -- --ignored --nocapture
echo "== schemathesis: docs/openapi.yaml against a real server, every check"
./scripts/schemathesis.sh
echo "== dashboard in a real headless Chromium (tests/browser; installs chromium, chromedriver, selenium)"
./tests/browser/run.sh

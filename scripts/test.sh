#!/usr/bin/env bash
# Every test of the project, in the order a failure is cheapest to find. CI runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== format"
cargo fmt --all -- --check
echo "== clippy"
cargo clippy --workspace --all-targets -- -D warnings
cargo clippy -p floodgate --features shuttle --tests -- -D warnings
echo "== tests"
cargo test --workspace
echo "== randomized schedules (shuttle)"
cargo test -p floodgate --features shuttle --test shuttle_schedules

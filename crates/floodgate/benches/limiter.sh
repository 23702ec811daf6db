#!/usr/bin/env sh
# Runs the floodgate-vs-tokio limiter benchmarks and prints the ratios floodgate/tokio.
# Targets: pair within 4x, handoff within 2x. Extra args go to criterion (e.g. a filter: pair).
set -eu
cd "$(dirname "$0")/../../.."
cargo bench -p floodgate --bench limiter -- "$@"
dir="${CARGO_TARGET_DIR:-target}/criterion"
# Criterion's headline number: the slope when it has one, else the mean.
est() { jq '(.slope // .mean).point_estimate' "$dir/$1/new/estimates.json"; }
for group in pair handoff; do
    [ -f "$dir/$group/floodgate/new/estimates.json" ] || continue
    fg=$(est "$group/floodgate"); tk=$(est "$group/tokio")
    awk -v g="$group" -v f="$fg" -v t="$tk" \
        'BEGIN { printf "%-8s floodgate %8.1f ns   tokio %8.1f ns   ratio %.2fx\n", g, f, t, f / t }'
done

#!/usr/bin/env bash
# Floodgate's Redis store against redis-semaphore (npm), on ONE redis-server, same workload:
# K handoffs on a limit of 1 (release -> blocked acquirer has it), then N holders looping
# acquire -> hold h -> release on a limit L < N for S seconds (utilization, throughput, wait,
# Redis's own cost). See README.md.
#
#   bench/peers/run.sh [--holders N] [--limit L] [--hold-ms H] [--seconds S] [--handoffs K]
#                      [--rounds R]
#
# Environment instead of flags: HOLDERS LIMIT HOLD_MS BENCH_SECONDS HANDOFFS ROUNDS.
# FLOODGATE_BIN=path runs that floodgate binary instead of building one (before/after runs).
# Defaults: 64 holders, limit 8, hold 5 ms, 5 s, 200 handoffs, 1 round (under a minute once
# built). Installs what is missing (node/npm, redis-server) with apt-get, the Node packages with
# `npm ci` from package-lock.json, and builds `floodgate` with cargo.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"

HOLDERS="${HOLDERS:-64}"
LIMIT="${LIMIT:-8}"
HOLD_MS="${HOLD_MS:-5}"
SECONDS_="${BENCH_SECONDS:-5}"
HANDOFFS="${HANDOFFS:-200}"
ROUNDS="${ROUNDS:-1}"
while [ $# -gt 0 ]; do
  case "$1" in
    --holders) HOLDERS="$2"; shift 2 ;;
    --limit) LIMIT="$2"; shift 2 ;;
    --hold-ms) HOLD_MS="$2"; shift 2 ;;
    --seconds) SECONDS_="$2"; shift 2 ;;
    --handoffs) HANDOFFS="$2"; shift 2 ;;
    --rounds) ROUNDS="$2"; shift 2 ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "run.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
for v in HOLDERS LIMIT HOLD_MS HANDOFFS ROUNDS; do
  [[ "${!v}" =~ ^[0-9]+$ ]] || { echo "run.sh: $v must be a whole number, not '${!v}'" >&2; exit 2; }
done
[[ "$SECONDS_" =~ ^[0-9]+([.][0-9]+)?$ ]] || { echo "run.sh: --seconds must be a number" >&2; exit 2; }
[ "$HOLDERS" -gt "$LIMIT" ] || { echo "run.sh: holders must be more than the limit" >&2; exit 2; }

apt_install() {
  local sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  echo "== installing $*" >&2
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq "$@" >/dev/null
}
command -v node >/dev/null && command -v npm >/dev/null || apt_install nodejs npm
command -v redis-server >/dev/null && command -v redis-cli >/dev/null || apt_install redis-server
node -e 'process.exit(+process.versions.node.split(".")[0] >= 16 ? 0 : 1)' \
  || { echo "run.sh: Node.js 16 or newer is needed (found $(node --version))" >&2; exit 1; }

echo "== npm ci (redis-semaphore, ioredis)" >&2
(cd "$HERE" && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
if [ -n "${FLOODGATE_BIN:-}" ]; then
  # A given binary (an older build kept for a before/after comparison in one sitting).
  FLOODGATE="$FLOODGATE_BIN"
  [ -x "$FLOODGATE" ] || { echo "run.sh: FLOODGATE_BIN=$FLOODGATE is not an executable" >&2; exit 2; }
else
  echo "== cargo build --release -p floodgate-cli" >&2
  (cd "$ROOT" && cargo build --release -p floodgate-cli --quiet)
  TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
  FLOODGATE="$TARGET_DIR/release/floodgate"
fi

# One redis-server on a free loopback port, no persistence; stopped on exit whatever happens.
PORT="$(node -e 'const s=require("net").createServer().listen(0,"127.0.0.1",()=>{console.log(s.address().port);s.close()})')"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/floodgate-peers.XXXXXX")"
redis-server --port "$PORT" --bind 127.0.0.1 --save '' --appendonly no --dir "$WORK" \
  --logfile "$WORK/redis.log" &
REDIS_PID=$!
cleanup() {
  kill "$REDIS_PID" 2>/dev/null || true
  wait "$REDIS_PID" 2>/dev/null || true
}
trap cleanup EXIT
for _ in $(seq 1 100); do
  [ "$(redis-cli -p "$PORT" ping 2>/dev/null)" = PONG ] && break
  sleep 0.05
done
[ "$(redis-cli -p "$PORT" ping 2>/dev/null)" = PONG ] || { echo "run.sh: redis-server did not start" >&2; cat "$WORK/redis.log" >&2; exit 1; }
URL="redis://127.0.0.1:$PORT"
REDIS_VERSION="$(redis-cli -p "$PORT" info server | sed -n 's/^redis_version:\(.*\)\r$/\1/p')"

LOAD_BEFORE="$(uptime)"
echo "== load before: $LOAD_BEFORE" >&2
for round in $(seq 1 "$ROUNDS"); do
  echo "== round $round/$ROUNDS: floodgate bench --store $URL" >&2
  "$FLOODGATE" bench --store "$URL" --workloads handoff,saturation \
    --holders "$HOLDERS" --limit "$LIMIT" --hold "${HOLD_MS}ms" \
    --saturation-seconds "$SECONDS_" --handoffs "$HANDOFFS" --json >"$WORK/floodgate-$round.json"
  echo "== round $round/$ROUNDS: node redis-semaphore.js --redis $URL" >&2
  node "$HERE/redis-semaphore.js" --redis "$URL" \
    --holders "$HOLDERS" --limit "$LIMIT" --hold-ms "$HOLD_MS" \
    --seconds "$SECONDS_" --handoffs "$HANDOFFS" --json >"$WORK/redis-semaphore-$round.json"
done
LOAD_AFTER="$(uptime)"

for round in $(seq 1 "$ROUNDS"); do
  node - "$WORK/floodgate-$round.json" "$WORK/redis-semaphore-$round.json" \
    "$round/$ROUNDS" "$REDIS_VERSION" <<'EOF'
const fs = require('fs');
const [fgPath, rsPath, round, redisVersion] = process.argv.slice(2);
const fg = JSON.parse(fs.readFileSync(fgPath, 'utf8'));
const rs = JSON.parse(fs.readFileSync(rsPath, 'utf8'));
const s = fg.saturation;
// The hold asked for: both sides' utilization restated at it, from their own idle per grant
// (their measured holds differ with their timers: see README.md).
const HOLD_US = s.hold_ms * 1000;
const ms = (us) => (us / 1000).toFixed(us < 1000 ? 2 : 1);
const us = (x) => x.toFixed(0);
const rows = [
  ['saturation', null, null],
  ['  acquire+release throughput (pairs/s)', (r) => r.saturation.acquire_release_pairs_per_sec.toFixed(0)],
  ['  utilization (held / (limit x time))', (r) => (r.saturation.utilization * 100).toFixed(1) + ' %'],
  ['  idle per grant (permit between holders, us)', (r) => us(r.saturation.idle_per_grant_us)],
  ['  PING round trip in the window mean / p50 (us)', (r) => `${us(r.saturation.redis.ping_during_mean_us)} / ${us(r.saturation.redis.ping_during.p50_us)}`],
  ['  idle per grant in mean round trips', (r) => (r.saturation.idle_per_grant_us / Math.max(r.saturation.redis.ping_during_mean_us, 1e-9)).toFixed(2)],
  ['  mean hold (us)', (r) => us(r.saturation.mean_hold_us)],
  [`  utilization at a ${HOLD_US / 1000} ms hold: h / (h + idle)`, (r) => (100 * HOLD_US / (HOLD_US + r.saturation.idle_per_grant_us)).toFixed(1) + ' %'],
  ['  ceiling = limit / mean hold (pairs/s)', (r) => r.saturation.ideal_pairs_per_sec.toFixed(0)],
  ['  wait p50 / p99 / max (ms)', (r) => `${ms(r.saturation.wait.p50_us)} / ${ms(r.saturation.wait.p99_us)} / ${ms(r.saturation.wait.max_us)}`],
  ['  Redis commands per grant', (r) => r.saturation.redis.commands_per_grant.toFixed(1)],
  ['  Redis script calls per grant', (r) => r.saturation.redis.scripts_per_grant.toFixed(2)],
  ['  Redis CPU (% of one core)', (r) => (r.saturation.redis.cpu_share * 100).toFixed(1)],
  ['  Redis CPU per grant (us)', (r) => us(r.saturation.redis.cpu_share * 1e6 / r.saturation.acquire_release_pairs_per_sec)],
  [`handoff (limit 1, ${fg.latency.handoffs} timed)`, null, null],
  ['  release -> blocked acquirer has it p50 / p99 (us)', (r) => `${us(r.latency.handoff.p50_us)} / ${us(r.latency.handoff.p99_us)}`],
  ['  release round trip p50 / p99 (us)', (r) => `${us(r.latency.release_round_trip.p50_us)} / ${us(r.latency.release_round_trip.p99_us)}`],
  ['  PING round trip p50 / p99 (us)', (r) => `${us(r.latency.trivial_round_trip.p50_us)} / ${us(r.latency.trivial_round_trip.p99_us)}`],
];
const heads = ['Floodgate RedisStore', `redis-semaphore ${rs.peer_version}`];
const w0 = Math.max(...rows.map(([l]) => l.length)) + 2;
const w = 24;
const line = (label, a, b) => label.padEnd(w0) + a.padStart(w) + b.padStart(w);
const out = [];
out.push('');
out.push(`round ${round}: ${s.holders} holders, limit ${s.limit}, hold ${s.hold_ms} ms, ${s.seconds} s measured (after ${s.warmup_s} s warm-up); one redis-server ${redisVersion} at ${fg.server}`);
out.push(`redis-semaphore with its defaults: an acquire that does not fit polls every retryInterval = ${rs.options.retryInterval} ms (lockTimeout ${rs.options.lockTimeout} ms, acquireTimeout ${rs.options.acquireTimeout} ms); acquire timeouts: ${rs.saturation.acquire_timeouts}`);
out.push('');
out.push(line('', heads[0], heads[1]));
for (const [label, f] of rows) out.push(f ? line(label, f(fg), f(rs)) : label);
console.log(out.join('\n'));
EOF
done
echo
echo "machine: $(nproc) CPUs"
echo "load before:$LOAD_BEFORE"
echo "load after: $LOAD_AFTER"
echo "raw JSON and the Redis log: $WORK"

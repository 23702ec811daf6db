#!/usr/bin/env node
// The peer side of bench/peers: redis-semaphore's Semaphore (with ioredis) under the workloads
// `floodgate bench --store redis://... --workloads handoff,saturation` runs against Floodgate's
// Redis store, measured the same way. See README.md.
//
//   node redis-semaphore.js --redis redis://127.0.0.1:6379 [--holders 64] [--limit 8]
//                           [--hold-ms 5] [--seconds 5] [--handoffs 200] [--json]
//
// redis-semaphore is used with its defaults: an acquire that does not fit polls, retrying its
// script every `retryInterval` (10 ms); lockTimeout 10 s; acquireTimeout 10 s.
//
// saturation: N holders loop acquire -> hold h -> release on one semaphore of limit L < N, so a
//   backlog always exists. Over a window that opens after a warm-up of min(0.5 s, S/4):
//   utilization = time held as the holders see it (acquire() resolved -> release() called,
//   clipped to the window) / (L x window); throughput = grants resolved in the window per
//   second; wait = acquire() called -> resolved (p50, p99, max). All holders share one ioredis
//   client, as Floodgate's holders share one RedisStore. Redis's own work in the window
//   (commands and script calls per grant, CPU) comes from INFO on a separate connection.
// handoff: limit 1; the holder and the waiter each have their own ioredis client (as Floodgate's
//   two RedisStore instances). The waiter calls acquire(); once its first attempt has failed
//   (it is now polling), the holder waits a random 0..retryInterval ms, so that the release
//   lands at a uniformly random point of the waiter's polling cycle, then releases. A handoff
//   is timed from just before release() is called to the moment the waiter's acquire()
//   resolves. Floodgate's waiter is pushed its grant, so the point of its release does not
//   matter there; here it does, and a release right after a failed poll would always cost a
//   full retryInterval. The baseline is one PING on the holder's connection before each release.
'use strict';

const { performance } = require('node:perf_hooks');
const Redis = require('ioredis');
const { Semaphore, defaultTimeoutOptions } = require('redis-semaphore');
const PEER_VERSION = require('redis-semaphore/package.json').version;

const WARMUP_HANDOFFS = 20;
const SATURATION_WARMUP_MS = 500;

function parseArgs(argv) {
  const opts = {
    redis: process.env.REDIS_URL || 'redis://127.0.0.1:6379',
    holders: 64,
    limit: 8,
    holdMs: 5,
    seconds: 5,
    handoffs: 200,
    json: false,
  };
  const numeric = { '--holders': 'holders', '--limit': 'limit', '--hold-ms': 'holdMs', '--seconds': 'seconds', '--handoffs': 'handoffs' };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === '--json') opts.json = true;
    else if (a === '--redis') opts.redis = argv[++i];
    else if (a in numeric) {
      const v = Number(argv[++i]);
      if (!Number.isFinite(v) || v < 0) throw new Error(`${a}: not a number: ${argv[i]}`);
      opts[numeric[a]] = v;
    } else if (a === '-h' || a === '--help') {
      process.stdout.write('usage: node redis-semaphore.js --redis URL [--holders N] [--limit L] [--hold-ms H] [--seconds S] [--handoffs K] [--json]\n');
      process.exit(0);
    } else throw new Error(`unknown argument ${a}`);
  }
  if (!(opts.holders > opts.limit && opts.limit >= 1)) throw new Error('--holders must be more than --limit (>= 1)');
  if (!(opts.seconds > 0)) throw new Error('--seconds must be more than 0');
  if (!(opts.handoffs >= 1)) throw new Error('--handoffs must be at least 1');
  return opts;
}

const now = () => performance.now(); // milliseconds, sub-millisecond resolution
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// Nearest rank, like the Rust side: the smallest sample with at least p of all at or below it.
function latency(samplesMs) {
  const s = Float64Array.from(samplesMs).sort();
  const rank = (p) => (s.length ? s[Math.min(Math.max(Math.ceil(p * s.length), 1), s.length) - 1] * 1000 : 0);
  const r1 = (x) => Math.round(x * 10) / 10;
  return { p50_us: r1(rank(0.5)), p99_us: r1(rank(0.99)), max_us: r1(s.length ? s[s.length - 1] * 1000 : 0) };
}

function parseInfo(info) {
  const c = { commands: 0, scripts: 0, cpu: 0 };
  for (const line of info.split('\n')) {
    const i = line.indexOf(':');
    if (i < 0) continue;
    const key = line.slice(0, i);
    const value = line.slice(i + 1).trim();
    if (key === 'total_commands_processed') c.commands = Number(value);
    else if (key === 'used_cpu_user' || key === 'used_cpu_sys') c.cpu += Number(value);
    else if (key === 'cmdstat_eval' || key === 'cmdstat_evalsha') {
      const m = /(?:^|,)calls=(\d+)/.exec(value);
      if (m) c.scripts += Number(m[1]);
    }
  }
  return c;
}

function client(url, name) {
  return new Redis(url, { connectionName: name, lazyConnect: true, maxRetriesPerRequest: 1 });
}

// Wraps an ioredis client for one semaphore: forwards what redis-semaphore uses and reports
// each script reply, so the handoff knows when the waiter's attempt has failed.
function watched(redis) {
  const w = {
    onReply: null,
    options: redis.options,
    async evalsha(...args) {
      const r = await redis.evalsha(...args);
      if (w.onReply) w.onReply(+r);
      return r;
    },
    async eval(...args) {
      const r = await redis.eval(...args);
      if (w.onReply) w.onReply(+r);
      return r;
    },
    zrem: (...args) => redis.zrem(...args),
    get: (...args) => redis.get(...args),
    set: (...args) => redis.set(...args),
  };
  // Resolves at the next failed attempt (a script reply of 0).
  w.nextFailure = () =>
    new Promise((resolve) => {
      w.onReply = (r) => {
        if (r === 0) {
          w.onReply = null;
          resolve();
        }
      };
    });
  return w;
}

async function saturation(opts, key) {
  const shared = client(opts.redis, 'peer-saturation');
  const probe = client(opts.redis, 'peer-probe');
  await Promise.all([shared.connect(), probe.connect()]);
  const lengthMs = opts.seconds * 1000;
  const warmupMs = Math.min(SATURATION_WARMUP_MS, lengthMs / 4);
  const start = now();
  const from = start + warmupMs;
  const until = from + lengthMs;

  async function holder() {
    const sem = new Semaphore(shared, key, opts.limit);
    const t = { busy: 0, grants: 0, held: 0, waits: [], timeouts: 0 };
    for (;;) {
      const asked = now();
      try {
        await sem.acquire();
      } catch (e) {
        if (e && e.name === 'TimeoutError') {
          t.timeouts++;
          if (now() >= until) return t;
          continue;
        }
        throw e;
      }
      const granted = now();
      await sleep(opts.holdMs);
      const sent = now();
      await sem.release();
      const a = Math.max(granted, from);
      const b = Math.min(sent, until);
      if (b > a) t.busy += b - a;
      if (granted >= from && granted < until) {
        t.grants++;
        t.held += sent - granted;
        t.waits.push(granted - asked);
      }
      if (now() >= until) return t;
    }
  }

  async function counters() {
    await sleep(Math.max(0, from - now()));
    const before = parseInfo(await probe.info('all'));
    // The round trip under the same load (as the Floodgate side): a PING every 5 ms on the
    // probe's own connection throughout the window.
    const pings = [];
    while (now() < until) {
      const t = now();
      await probe.ping();
      pings.push(now() - t);
      await sleep(5);
    }
    const after = parseInfo(await probe.info('all'));
    return { before, after, pings };
  }

  const [tallies, { before, after, pings }] = await Promise.all([
    Promise.all(Array.from({ length: opts.holders }, holder)),
    counters(),
  ]);
  await shared.del(`semaphore:${key}`);
  shared.disconnect();
  probe.disconnect();

  let busy = 0, grants = 0, held = 0, timeouts = 0;
  const waits = [];
  for (const t of tallies) {
    busy += t.busy;
    grants += t.grants;
    held += t.held;
    timeouts += t.timeouts;
    for (const w of t.waits) waits.push(w);
  }
  const windowS = lengthMs / 1000;
  const meanHoldMs = grants ? held / grants : 0;
  const perGrant = (x) => x / Math.max(grants, 1);
  const r1 = (x) => Math.round(x * 10) / 10;
  const r3 = (x) => Math.round(x * 1000) / 1000;
  return {
    holders: opts.holders,
    limit: opts.limit,
    hold_ms: opts.holdMs,
    warmup_s: warmupMs / 1000,
    seconds: windowS,
    utilization: r3(busy / (opts.limit * lengthMs)),
    // How long a permit sat idle between two holders, on average (independent of the hold).
    idle_per_grant_us: r1(grants ? (Math.max(0, opts.limit * lengthMs - busy) / grants) * 1000 : 0),
    acquire_release_pairs_per_sec: r1(grants / windowS),
    ideal_pairs_per_sec: r1(meanHoldMs > 0 ? opts.limit / (meanHoldMs / 1000) : 0),
    mean_hold_us: r1(meanHoldMs * 1000),
    grants,
    acquire_timeouts: timeouts,
    wait: latency(waits),
    redis: {
      // The INFO before the window and the PINGs are not the workload's.
      commands_per_grant: r1(perGrant(Math.max(0, after.commands - before.commands - 1 - pings.length))),
      scripts_per_grant: r3(perGrant(Math.max(0, after.scripts - before.scripts))),
      cpu_share: r3(Math.max(0, after.cpu - before.cpu) / windowS),
      ping_during: latency(pings),
      ping_during_mean_us: r1((pings.reduce((a, b) => a + b, 0) / Math.max(pings.length, 1)) * 1000),
    },
  };
}

async function handoff(opts, key) {
  const a = client(opts.redis, 'peer-handoff-a');
  const b = client(opts.redis, 'peer-handoff-b');
  await Promise.all([a.connect(), b.connect()]);
  const retryInterval = defaultTimeoutOptions.retryInterval;
  const sides = [a, b].map((redis) => {
    const w = watched(redis);
    return { redis, watch: w, sem: new Semaphore(w, key, 1) };
  });
  const samples = { handoff: [], trivial: [], release: [] };
  let [holder, waiter] = sides;
  await holder.sem.acquire();
  for (let i = 0; i < WARMUP_HANDOFFS + opts.handoffs; i++) {
    const blocked = waiter.watch.nextFailure();
    const waiting = waiter.sem.acquire().then(() => now());
    // Its first attempt failed: it is polling now. (Granted instead: the permit was not held.)
    const first = await Promise.race([blocked.then(() => 'blocked'), waiting.then(() => 'granted')]);
    if (first !== 'blocked') throw new Error('the waiter was granted while the permit was held');
    await sleep(Math.floor(Math.random() * retryInterval));
    const t = now();
    await holder.redis.ping();
    const trivial = now() - t;
    const sent = now();
    await holder.sem.release();
    const released = now() - sent;
    const arrived = await waiting;
    if (i >= WARMUP_HANDOFFS) {
      samples.handoff.push(arrived - sent);
      samples.trivial.push(trivial);
      samples.release.push(released);
    }
    [holder, waiter] = [waiter, holder];
  }
  await holder.sem.release();
  await a.del(`semaphore:${key}`);
  a.disconnect();
  b.disconnect();
  return {
    handoffs: opts.handoffs,
    handoff: latency(samples.handoff),
    trivial_round_trip: latency(samples.trivial),
    release_round_trip: latency(samples.release),
  };
}

function text(r) {
  const s = r.saturation;
  const l = r.latency;
  const o = r.options;
  const f1 = (x) => x.toFixed(1).padStart(10);
  return [
    `redis-semaphore ${r.peer_version} (ioredis) on ${r.server}; defaults: retryInterval ${o.retryInterval} ms (an acquire that does not fit polls), lockTimeout ${o.lockTimeout} ms, acquireTimeout ${o.acquireTimeout} ms`,
    '',
    `latency (${l.handoffs} handoffs, limit 1; release at a random point of the waiter's ${o.retryInterval} ms poll)   p50 us     p99 us`,
    `  handoff (release called -> waiter's acquire resolved)   ${f1(l.handoff.p50_us)} ${f1(l.handoff.p99_us)}`,
    `  trivial round trip (PING)                              ${f1(l.trivial_round_trip.p50_us)} ${f1(l.trivial_round_trip.p99_us)}`,
    `  release round trip                                     ${f1(l.release_round_trip.p50_us)} ${f1(l.release_round_trip.p99_us)}`,
    '',
    `saturation (${s.holders} holders, limit ${s.limit}, hold ${s.hold_ms} ms; ${s.seconds} s measured after ${s.warmup_s} s of warm-up)`,
    `  utilization (time held / (limit x time))  ${(s.utilization * 100).toFixed(1).padStart(8)} %`,
    `  acquire + release pairs/s                 ${s.acquire_release_pairs_per_sec.toFixed(0).padStart(8)}     (limit / mean hold: ${s.ideal_pairs_per_sec.toFixed(0)}; mean hold ${s.mean_hold_us.toFixed(0)} us)`,
    `  idle time per grant (a permit between two holders) ${f1(s.idle_per_grant_us).trimStart().padStart(8)} us`,
    `  wait (acquire called -> resolved)  p50 us ${f1(s.wait.p50_us)}   p99 us ${f1(s.wait.p99_us)}   max us ${f1(s.wait.max_us)}   (acquire timeouts: ${s.acquire_timeouts})`,
    `  redis: ${s.redis.commands_per_grant.toFixed(1)} commands and ${s.redis.scripts_per_grant.toFixed(2)} script calls per grant; CPU ${(s.redis.cpu_share * 100).toFixed(1)} % of a core`,
    '',
  ].join('\n');
}

async function main() {
  const opts = parseArgs(process.argv.slice(2));
  const prefix = `peer-bench-${process.pid}-${Date.now()}`;
  const latencyResult = await handoff(opts, `${prefix}-handoff`);
  const saturationResult = await saturation(opts, `${prefix}-saturation`);
  const report = {
    mode: 'peer',
    peer: 'redis-semaphore',
    peer_version: PEER_VERSION,
    server: opts.redis,
    baseline: 'PING',
    options: {
      retryInterval: defaultTimeoutOptions.retryInterval,
      lockTimeout: defaultTimeoutOptions.lockTimeout,
      acquireTimeout: defaultTimeoutOptions.acquireTimeout,
    },
    latency: latencyResult,
    saturation: saturationResult,
  };
  process.stdout.write(opts.json ? JSON.stringify(report, null, 2) + '\n' : text(report));
}

main().catch((e) => {
  process.stderr.write(`redis-semaphore.js: ${e && e.stack ? e.stack : e}\n`);
  process.exit(1);
});

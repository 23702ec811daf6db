-- Floodgate's limiter state machine, one atomic script per operation.
--
-- The same transitions as crates/floodgate/src/core/mod.rs (read that file for the rules);
-- tests/suite runs one behavioural suite against both. Time is the store's own clock (TIME),
-- never a caller's. Every key of a limiter shares the hash tag {name}, so the script works on
-- Redis Cluster. Integers are microseconds; they stay below 2^53, so Lua's doubles hold them
-- exactly, and they are always formatted with %d (tostring would print 1.8e+15).
--
-- KEYS: 1 meta (hash: spec and the state that changes rarely; written only where it changed)
--       2 holders (hash, two kinds of field:
--           token -> permits|deadline|granted_at|waiter_key|label  (a holder's record; the label,
--             sent with its acquire, is last and may contain `|`)
--           k:KEY -> the waiter KEY's entry: `W|seq|MEMBER` while queued, `G|...` (its grant's
--             outcome) or `I|token` (granted at once) while the grant is held
--           a:KEY -> for an idempotent acquire (KEY = `r` + hex request_id), the attempt that
--             owns its wait or grant last, while `k:KEY` is there
--           l:TOKEN -> the lease slot of holder TOKEN, when it is not TOKEN itself (below)
--           s:SLOT -> the holder of lease slot SLOT, when it is not SLOT itself
--           hot -> the fields every acquire and release touch, in HOT order, packed by the
--             `struct` library (HOT_FMT below), kept apart from the spec so the fast paths read
--             and write one short value; a field of `holders`, so that it is read with a
--             release's record (one HMGET) and written with each path's own fields (one HSET))
--       3 leases (zset lease slot by lease deadline: a slot is the token of the holder granted it
--         first, and passes to the head a release hands its permit to (the fast path's
--         handoff), so that handoff writes one ZADD instead of a ZREM and a ZADD; `l:` and `s:`
--         in `holders` map a holder to its slot and back when they differ; a holder with no `l:`
--         field, as every older release's, is its own slot)
--       4 queue (zset MEMBER by arrival sequence; MEMBER = KEY|permits|lease|deadline|enqueued_at|
--         channel|label, so the head is taken and granted without another read)
--       5 heavy (zset MEMBER by arrival sequence: only waiters asking for more than one permit,
--         for retry hints and for refusing what a lowered limit can no longer hold)
--       6 waits (zset %016d(seq)..KEY by wait deadline: ties end in arrival order)
--       7 outcomes (hash waiter key -> outcome not tied to a held grant)
--       8 outcome_times (zset waiter key by when its outcome may be forgotten)
--       9 hot (string: where older releases kept the `hot` value, now `holders`' field;
--         read by the general path when `holders` has none, and deleted when it is moved)
--      10 tokens (string: the next fencing token of a deleted incarnation, so a re-created
--         limiter starts above it; written only by delete, with the idle TTL)
--      11 dead (zset: the queue of a deleted limiter, answered `D` in batches by `drain`)
-- ARGV: 1 op, 2 limiter name, 3 idle TTL in ms, then the op's arguments.
--
-- Reply: a flat array of strings: a tag, the op's fields, and last the delay in microseconds
-- until the next lease or wait deadline ("-1" if none), for the caller's timer. The general
-- path reports it exactly; the fast paths report a lower bound (`due`, below): a timer that
-- fires early finds nothing due and is re-armed at the exact deadline.
--
-- Outcomes of queued waiters ("G|token|permits|lease|deadline|granted_at|waited",
-- "T|retry_after", "X|requested|limit", "D") are recorded BEFORE they are published to the
-- waiter's server channel, so a waiter that missed the message still finds its outcome (after
-- a lost subscription, or when its own timer ends). A grant's outcome is its `k:KEY` field in
-- `holders`, kept while the grant is held (it goes with the release); any other outcome is
-- kept OUTCOME_RETENTION after its decision. So outcome memory is bounded by the holders and
-- by the decisions of the last OUTCOME_RETENTION, whatever the waits.

local K_META, K_HOLD, K_LEASE, K_Q, K_HEAVY, K_WAITS, K_OUT, K_OUTT, K_HOT, K_TOK, K_DEAD =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9], KEYS[10], KEYS[11]
local op, name, ttl_ms = ARGV[1], ARGV[2], tonumber(ARGV[3])

local now
local general_only = false
do
  -- `op@now` (or `op@now@general`, which skips the fast path): the differential test drives
  -- the clock (tests/twin.rs); production sends the bare op and the script reads Redis TIME.
  local at = string.find(op, '@', 1, true)
  if at then
    local rest = string.sub(op, at + 1)
    op = string.sub(op, 1, at - 1)
    local at2 = string.find(rest, '@', 1, true)
    if at2 then
      general_only = string.sub(rest, at2 + 1) == 'general'
      rest = string.sub(rest, 1, at2 - 1)
    end
    now = tonumber(rest)
  else
    local t = redis.call('TIME')
    now = tonumber(t[1]) * 1000000 + tonumber(t[2])
  end
end
-- A release names its caller's wake-up channel (ARGV[5]): an outcome for a waiter of that same
-- store is answered in the release's reply instead of published (it is recorded all the same),
-- so that waiter has it one pub/sub delivery sooner and Redis writes no message.
local local_ch = op == 'release' and ARGV[5] or nil
if local_ch == '' then local_ch = nil end

-- MIN_LEASE, MAX_LEASE, MAX_WAIT, MAX_CONCURRENCY, MAX_QUEUE, MAX_SCHEDULE_AHEAD,
-- HOLD_EWMA_WEIGHT, OUTCOME_RETENTION, MAX_ADOPTED_TOKEN and field_lists() (COUNTERS, STATUS) come from the prelude that
-- store/redis/script.rs builds from the Rust constants.
local function fmt(n) return string.format('%d', n) end
-- The hot value's layout: HOT's first field (`fast`, one character), a tag byte, then the other
-- 22 fields as little-endian doubles (integers below 2^53 are exact; -1 stands for an absent
-- one). Packed and unpacked by Redis's C `struct` library: the fast paths make no string per
-- field and format or parse no number (text fields cost each call their strings, strtod and
-- printf). An older release's value was text, `|`-separated, so its second byte is `|`, never
-- the tag: the general path reads it (split) and writes it back packed.
local HOT_FMT = '<c1c1dddddddddddddddddddddd'
local HOT_TAG, HOT_TAG_BYTE = '#', 35
-- The hot value's field in `holders` (never a token: is_token in helpers.lua).
local HOT_FIELD = 'hot'
local TTL_REFRESH = 3600 * 1000000
-- How long (ms) a limiter's keys are kept from their last renewal: the idle TTL, or longer
-- while a rate's debt could outlast it. `debt` (us): how far ahead of the clock the rate's
-- `tat` can run, interval x burst (a schedule adds at most the longest wait); keys are renewed
-- at most hourly. Kept only the idle TTL, a limiter unused after a burst (a day's interval,
-- a burst of 100: 100 days of debt) forgot a debt still running, and a re-created one granted
-- a fresh burst on top of it.
local function keep_ms(debt)
  if not debt or debt <= 0 then return ttl_ms end
  return math.max(ttl_ms, math.ceil((debt + MAX_WAIT + TTL_REFRESH) / 1000))
end
-- "No deadline": above every time (2^53 - 1, still exact in a double).
local NONE = 9007199254740991

-- An idempotent acquire's waiter key is `r` and its request_id in hex (the store derives it),
-- the same for every retry, on any server. Its `k:KEY` entry then answers a repeat: the wait to
-- join or the grant held. `a:KEY` in `holders` names the attempt (a call) that owns it last,
-- so that an attempt that went away gives it up only if no retry claimed it since.
-- (string.byte: a number, where string.sub would make a string to compare.)
local function idem(key) return string.byte(key, 1) == 114 end   -- 'r'

-- A rate-only (paced) grant holds nothing, so no `k:KEY` keeps its request_id: it is
-- remembered apart, for the default lease (`retention`), as LimiterCore's paced requests do:
-- `p:KEY` in `outcomes` -> token|permits|granted_at|until[|tkey], forgotten at `until` (its
-- score in `outcome_times`, pruned with the outcomes; a repeat also checks `until`, as a
-- prune takes a batch at a time). A keyed grant appends its key (kgrant). Bounded by the
-- grants of one retention window, which the rate bounds.
local function remember_paced(key, token, permits, retention, ttl)
  -- Two entries past their time go first: the fast path, which records most of these, never
  -- runs prune_outcomes, and one insert then never leaves more than it found.
  local old = redis.call('ZRANGEBYSCORE', K_OUTT, '-inf', fmt(now), 'LIMIT', 0, 2)
  if #old > 0 then
    redis.call('HDEL', K_OUT, unpack(old))
    redis.call('ZREM', K_OUTT, unpack(old))
  end
  local f, till = 'p:' .. key, now + retention
  redis.call('HSET', K_OUT, f, fmt(token) .. '|' .. fmt(permits) .. '|' .. fmt(now) .. '|' .. fmt(till))
  redis.call('ZADD', K_OUTT, fmt(till), f)
  redis.call('PEXPIRE', K_OUT, ttl)
  redis.call('PEXPIRE', K_OUTT, ttl)
end


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
--             owns its wait or grant last, while `k:KEY` is there)
--       3 leases (zset token by lease deadline)
--       4 queue (zset MEMBER by arrival sequence; MEMBER = KEY|permits|lease|deadline|enqueued_at|
--         channel|label, so the head is taken and granted without another read)
--       5 heavy (zset MEMBER by arrival sequence: only waiters asking for more than one permit,
--         for retry hints and for refusing what a lowered limit can no longer hold)
--       6 waits (zset %016d(seq)..KEY by wait deadline: ties end in arrival order)
--       7 outcomes (hash waiter key -> outcome not tied to a held grant)
--       8 outcome_times (zset waiter key by when its outcome may be forgotten)
--       9 hot (string: the fields every acquire and release touch, `|`-separated in HOT order,
--         kept apart from the spec so the fast paths read and write one short value)
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

-- MIN_LEASE, MAX_LEASE, MAX_WAIT, MAX_CONCURRENCY, MAX_QUEUE, MAX_SCHEDULE_AHEAD,
-- HOLD_EWMA_WEIGHT, OUTCOME_RETENTION and field_lists() (COUNTERS, STATUS) come from the prelude that
-- store/redis/script.rs builds from the Rust constants.
local function fmt(n) return string.format('%d', n) end
local TTL_REFRESH = 3600 * 1000000
-- "No deadline": above every time (2^53 - 1, still exact in a double).
local NONE = 9007199254740991

-- The smoothed hold time after a hold of `held` (weight 1/8, integer steps: the same
-- arithmetic as the core's observe_hold).
local function next_ewma(ewma, held)
  if not ewma then return held end
  if held >= ewma then return ewma + math.floor((held - ewma) / HOLD_EWMA_WEIGHT) end
  return ewma - math.floor((ewma - held) / HOLD_EWMA_WEIGHT)
end

-- What follows the n-th `|` of s ('' if none): the free-form label ending a record.
local function tail(s, n)
  local at = 0
  for _ = 1, n do
    at = string.find(s, '|', at + 1, true)
    if not at then return '' end
  end
  return string.sub(s, at + 1)
end

local function split(s)
  local out, start = {}, 1
  while true do
    local i = string.find(s, '|', start, true)
    if not i then
      out[#out + 1] = string.sub(s, start)
      return out
    end
    out[#out + 1] = string.sub(s, start, i - 1)
    start = i + 1
  end
end

-- A queued waiter's member of `queue`: everything its grant needs, so taking the head needs
-- no other read. The key comes first (unique) and never contains `|`; the label comes last.
-- `in_waits`: whether the waiter is in `waits`. A waiter whose deadline is no earlier than
-- that of any waiter queued before it (`max_dl` in hot, the latest deadline enqueued since the
-- queue was last empty: the usual case, where waiters share a wait) is not: while it is queued
-- its deadline cannot be the first to come unless it is the head. So the earliest wait
-- deadline is the first of `waits` or the head's (first_wait below), and such a waiter costs
-- no `waits` write on enqueue nor on grant.
local function member(key, permits, lease, deadline, enqueued_at, in_waits, channel, label)
  return key .. '|' .. fmt(permits) .. '|' .. fmt(lease) .. '|' .. fmt(deadline) .. '|' ..
    fmt(enqueued_at) .. '|' .. (in_waits and 'w' or 'm') .. '|' .. channel .. '|' .. (label or '')
end

local function parse_member(mem, seq)
  local f = split(mem)
  -- (`permits_s`, `lease_s`: the fields as written, so a grant need not format them again.)
  return {key = f[1], permits = tonumber(f[2]), lease = tonumber(f[3]), deadline = tonumber(f[4]),
          enqueued_at = tonumber(f[5]), in_waits = f[6] == 'w', channel = f[7],
          label = tail(mem, 7), member = mem, seq = seq, permits_s = f[2], lease_s = f[3]}
end

-- The waits member of waiter `key` with arrival sequence `seq`.
local function wait_member(seq, key) return string.format('%016d', seq) .. key end

-- A release's token is a number; anything else (a `k:` field above all) is held by nobody.
local function is_token(t) return string.find(t, '^%d+$') ~= nil end

-- An idempotent acquire's waiter key is `r` and its request_id in hex (the store derives it),
-- the same for every retry, on any server. Its `k:KEY` entry then answers a repeat: the wait to
-- join or the grant held. `a:KEY` in `holders` names the attempt (a call) that owns it last,
-- so that an attempt that went away gives it up only if no retry claimed it since.
local function idem(key) return string.sub(key, 1, 1) == 'r' end

-- Fast paths: the common operations in a handful of commands, reading and writing only `hot`
-- (plus what the operation itself adds or removes), when no deadline is due (`due` above the
-- clock). The general path below loads and rewrites the whole state and applies every rule;
-- anything these paths do not cover (a refusal, a rate with a queue, a lease due...) falls
-- through to it. The same rules, checked against the core by tests/twin.rs on both paths.
--   concurrency ('1'): an acquire granted at once, an acquire queued behind others, a release
--     (granting the queue's head waiters it frees room for);
--   rate only ('r'): an acquire the rate grants at once, or refuses when it cannot wait; a
--     release with nobody queued and nothing held.
-- A repeated idempotent acquire (its key already has an entry) takes the general path.
local is_repeat = op == 'acquire' and idem(ARGV[7])
  and redis.call('HEXISTS', K_HOLD, 'k:' .. ARGV[7]) == 1
if (op == 'acquire' or op == 'release') and not general_only and not is_repeat then
  local raw_hot = redis.call('GET', K_HOT)
  local h = raw_hot and split(raw_hot) or {}
  local due = tonumber(h[14] or '')
  local mode = h[1]
  if due and due > now and (mode == '1' or (mode == 'r' and (op == 'acquire' or (h[2] == '0' and h[3] == '0')))) then
    local qlen, in_use, next_token = tonumber(h[2]), tonumber(h[3]), tonumber(h[5])
    local refresh = tonumber(h[8] or '0') <= now
    local function save()
      h[2], h[3], h[5], h[14] = fmt(qlen), fmt(in_use), fmt(next_token), fmt(due)
      if refresh then h[8] = fmt(now + TTL_REFRESH) end
      redis.call('SET', K_HOT, table.concat(h, '|'), 'KEEPTTL')
      if refresh then
        for i = 1, 9 do redis.call('PEXPIRE', KEYS[i], ARGV[3]) end
      end
    end
    -- Keys that were empty (so gone) get their TTL when they come back.
    local function created(...)
      if refresh then return end   -- save() refreshes every key
      for _, key in ipairs({...}) do redis.call('PEXPIRE', key, ARGV[3]) end
    end
    local function next_due()
      if due >= NONE then return '-1' end
      return fmt(due - now)
    end
    if op == 'acquire' then
      local permits, lease = tonumber(ARGV[4]), tonumber(h[6])
      if ARGV[5] ~= '' then lease = tonumber(ARGV[5]) end
      local key = ARGV[7]
      if permits >= 1 and permits <= tonumber(h[7]) and lease >= MIN_LEASE and lease <= MAX_LEASE
        and qlen == 0 and mode == 'r' then
        -- GCRA (as rate_at/take_rate below): granted at once, or refused if it cannot wait.
        local t, tat, burst = tonumber(h[19]), tonumber(h[18]), tonumber(h[20])
        local ra = math.max(0, tat + t * permits - t * burst)
        if ra <= now then
          local token = math.max(next_token, now)
          next_token = token + 1
          h[18] = fmt(math.max(tat, now) + t * permits)
          h[9], h[21] = fmt(tonumber(h[9]) + 1), fmt(tonumber(h[21]) + 1)
          save()
          return {'granted', fmt(token), fmt(permits), '0', fmt(now), fmt(now), '0', next_due()}
        end
        local wait = tonumber(h[15])
        if ARGV[6] ~= '' then wait = math.min(tonumber(ARGV[6]), wait) end
        if ra - now > wait then
          h[22] = fmt(tonumber(h[22]) + 1)
          save()
          return {'timeout', fmt(math.max(ra - now, 1000)), next_due()}
        end
      elseif permits >= 1 and permits <= tonumber(h[7]) and lease >= MIN_LEASE
        and lease <= MAX_LEASE and mode == '1' then
        if qlen == 0 and in_use + permits <= tonumber(h[4]) then
          local token = math.max(next_token, now)
          local deadline = now + lease
          -- The waiter key rides along, and indexes the grant (`k:KEY`), so a caller that lost
          -- this reply can still find and return it (cancel, below).
          if idem(key) then
            redis.call('HSET', K_HOLD, fmt(token), fmt(permits) .. '|' .. fmt(deadline) .. '|' ..
              fmt(now) .. '|' .. key .. '|' .. (ARGV[9] or ''), 'k:' .. key, 'I|' .. fmt(token),
              'a:' .. key, ARGV[10] or '')
          elseif key ~= '' then
            redis.call('HSET', K_HOLD, fmt(token), fmt(permits) .. '|' .. fmt(deadline) .. '|' ..
              fmt(now) .. '|' .. key .. '|' .. (ARGV[9] or ''), 'k:' .. key, 'I|' .. fmt(token))
          else
            redis.call('HSET', K_HOLD, fmt(token), fmt(permits) .. '|' .. fmt(deadline) .. '|' ..
              fmt(now) .. '||' .. (ARGV[9] or ''))
          end
          redis.call('ZADD', K_LEASE, fmt(deadline), fmt(token))
          if in_use == 0 then created(K_HOLD, K_LEASE) end
          in_use, next_token = in_use + permits, token + 1
          h[9] = fmt(tonumber(h[9]) + 1)
          due = math.min(due, deadline)
          save()
          return {'granted', fmt(token), fmt(permits), fmt(lease), fmt(deadline), fmt(now), '0',
                  next_due()}
        end
        local wait = tonumber(h[15])
        if ARGV[6] ~= '' then wait = math.min(tonumber(ARGV[6]), wait) end
        if wait >= 1 and qlen < tonumber(h[16]) then
          -- Queued behind others (or behind a full limit): three writes.
          local seq, deadline = tonumber(h[12]), now + wait
          -- An absent max_dl (a hot value older than it) puts the waiter in `waits`: safe.
          local max_dl = qlen == 0 and 0 or tonumber(h[23] or '') or NONE
          local in_waits = deadline < max_dl
          local mem = member(key, permits, lease, deadline, now, in_waits, ARGV[8], ARGV[9])
          if idem(key) then
            redis.call('HSET', K_HOLD, 'k:' .. key, 'W|' .. fmt(seq) .. '|' .. mem,
              'a:' .. key, ARGV[10] or '')
          else
            redis.call('HSET', K_HOLD, 'k:' .. key, 'W|' .. fmt(seq) .. '|' .. mem)
          end
          redis.call('ZADD', K_Q, fmt(seq), mem)
          -- (A TTL is set after the write that creates the key.)
          if qlen == 0 and in_use == 0 then created(K_HOLD) end
          if in_waits then
            redis.call('ZADD', K_WAITS, fmt(deadline), wait_member(seq, key))
            created(K_WAITS)   -- it may have been empty; rare enough to ask every time
          else
            h[23] = fmt(deadline)
          end
          if qlen == 0 then created(K_Q) end
          if permits > 1 then
            redis.call('ZADD', K_HEAVY, fmt(seq), mem)
            if h[17] == '0' then created(K_HEAVY) end
            h[17] = fmt(tonumber(h[17]) + 1)
          end
          qlen = qlen + 1
          h[12], h[13] = fmt(seq + 1), fmt(tonumber(h[13]) + permits)
          due = math.min(due, deadline)
          save()
          return {'queued', fmt(wait), next_due()}
        end
      end
    elseif mode == 'r' then
      -- Rate only, nothing held (holders of a concurrency limit it had before may be) and
      -- nobody queued: nothing to release (a dropped permit still sends its release).
      return {'released', '0', next_due()}
    else
      local token = ARGV[4]
      local raw = is_token(token) and redis.call('HGET', K_HOLD, token)
      if not raw then return {'released', '0', next_due()} end
      local f = split(raw)
      local permits = tonumber(f[1])
      -- Never negative, even if the clock stepped back (a failover to a replica behind).
      local held = math.max(0, now - tonumber(f[3]))
      h[11] = fmt(next_ewma(tonumber(h[11] or ''), held))
      if f[4] ~= '' then
        redis.call('HDEL', K_HOLD, token, 'k:' .. f[4], 'a:' .. f[4])
      else
        redis.call('HDEL', K_HOLD, token)
      end
      redis.call('ZREM', K_LEASE, token)
      in_use = math.max(0, in_use - permits)
      h[10] = fmt(tonumber(h[10]) + 1)
      -- The freed room goes to the head of the queue (strict FIFO: a head that does not fit
      -- holds back those behind it). With no heavy waiter, every waiter fits in one permit.
      local limit, heavy = tonumber(h[4]), tonumber(h[17])
      local granted, now_s = 0, fmt(now)
      while qlen > 0 and in_use < limit do
        local w
        if heavy > 0 then
          local head = redis.call('ZRANGE', K_Q, 0, 0, 'WITHSCORES')
          if not head[1] then break end
          w = parse_member(head[1], tonumber(head[2]))
          if in_use + w.permits > limit then break end
          redis.call('ZREM', K_Q, head[1])
        else
          local head = redis.call('ZPOPMIN', K_Q)
          if not head[1] then break end
          w = parse_member(head[1], tonumber(head[2]))
        end
        if w.in_waits then redis.call('ZREM', K_WAITS, wait_member(w.seq, w.key)) end
        if w.permits > 1 then
          redis.call('ZREM', K_HEAVY, w.member)
          heavy = heavy - 1
        end
        local t = math.max(next_token, now)
        local deadline = now + w.lease
        -- Each number formatted once (string.format is a large part of a script's time).
        local t_s, deadline_s = fmt(t), fmt(deadline)
        local outcome = 'G|' .. t_s .. '|' .. w.permits_s .. '|' .. w.lease_s .. '|' ..
          deadline_s .. '|' .. now_s .. '|' .. fmt(math.max(0, now - w.enqueued_at))
        -- The holder's record and the waiter's outcome (replacing its queue entry), in one write.
        redis.call('HSET', K_HOLD, t_s, w.permits_s .. '|' .. deadline_s .. '|' .. now_s .. '|' ..
          w.key .. '|' .. w.label, 'k:' .. w.key, outcome)
        redis.call('ZADD', K_LEASE, deadline_s, t_s)
        if in_use == 0 then created(K_LEASE) end
        in_use, next_token, qlen = in_use + w.permits, t + 1, qlen - 1
        h[13] = fmt(tonumber(h[13]) - w.permits)
        granted = granted + 1
        due = math.min(due, deadline)
        redis.call('PUBLISH', w.channel, name .. '\n' .. w.key .. '\n' .. outcome)
      end
      h[9], h[17] = fmt(tonumber(h[9]) + granted), fmt(heavy)
      save()
      return {'released', '1', next_due()}
    end
  end
end

-- Answers the queue of a deleted limiter, a batch per call (so no call blocks Redis for long):
-- each waiter is told `D`. Replies the number still to answer.
local DRAIN_BATCH = 500
local function drain()
  local batch = redis.call('ZPOPMIN', K_DEAD, DRAIN_BATCH)
  for i = 1, #batch, 2 do
    local w = parse_member(batch[i])
    redis.call('PUBLISH', w.channel, name .. '\n' .. w.key .. '\nD')
  end
  return redis.call('ZCARD', K_DEAD)
end
if op == 'drain' then return {'drained', fmt(drain()), '-1'} end

-- The general path. What follows the fast paths is built only when they do not answer (each
-- table costs every call that builds it).
local COUNTERS, STATUS = field_lists()

-- The fields of the hot value, in order. `fast`: '1' lets the concurrency fast path run (a
-- concurrency limit, no rate, not learning), 'r' the rate-only one, '0' neither. `due`: no
-- lease or wait deadline (nor the end of a learning window) comes before it, so while the clock
-- is below it nothing needs to be looked at (the core's next_due). `heavy`: queued waiters
-- asking for more than one permit. `rate_t`: the rate's emission interval ('' without a rate).
-- `max_dl`: the latest wait deadline enqueued since the queue was last empty (see member()).
local HOT = {'fast', 'qlen', 'in_use', 'eff_limit', 'next_token', 'lease_us', 'cap', 'ttl_at',
             'c_granted', 'c_released', 'ewma_us', 'next_seq', 'queued_permits', 'due',
             'max_wait_us', 'max_queue', 'heavy', 'tat', 'rate_t', 'rate_burst', 'c_paced',
             'c_timed_out', 'max_dl'}
-- Fields only hot holds (meta does not keep a copy that could go stale).
local HOT_ONLY = {next_seq = true, queued_permits = true, tat = true, c_granted = true,
                  c_released = true, c_paced = true, c_timed_out = true}
-- State, loaded once and written back once.
local m = {}
-- What meta held, to write back only the fields that changed.
local meta_was = {}
do
  local raw = redis.call('HGETALL', K_META)
  for i = 1, #raw, 2 do
    m[raw[i]] = raw[i + 1]
    meta_was[raw[i]] = raw[i + 1]
  end
  local hot = redis.call('GET', K_HOT)
  if hot then
    for i, v in ipairs(split(hot)) do m[HOT[i]] = v end
  end
end
local exists = m.max_queue ~= nil   -- a field only `meta` has

-- Every key has a TTL: set on the key's creation (see `created`) and refreshed for all keys at
-- most hourly (`ttl_at`), so an idle limiter vanishes after `idle_ttl` and nothing grows.
local refresh = tonumber(m.ttl_at or '0') <= now
local function created(...)
  if refresh then return end   -- finish() refreshes every key anyway
  for _, key in ipairs({...}) do redis.call('PEXPIRE', key, ARGV[3]) end
end

-- Absent (empty) fields mean "none": a rate-only limiter has no concurrency.
local function opt(v) if v == nil or v == '' then return nil end return tonumber(v) end
local concurrency = opt(m.concurrency)
local limit = opt(m.eff_limit)           -- the concurrency limit in force (adaptive moves it)
local rate_limit, rate_period, rate_burst = opt(m.rate_limit), opt(m.rate_period_us), opt(m.rate_burst)
local a_min, a_max, a_inc, a_dec, a_cool = opt(m.a_min), opt(m.a_max), opt(m.a_inc), opt(m.a_dec), opt(m.a_cool_us)
-- The adaptive spec's rest, 'algorithm|tolerance|probe_rounds' ('': AIMD with the defaults),
-- written by put; and the gradient controller's state, 'short|long|ceiling|credit', written by
-- feedback (see core/adaptive/mod.rs).
local a_ext = m.a_ext or ''
local tat = tonumber(m.tat or '0')
local successes = tonumber(m.successes or '0')
local last_decrease = opt(m.last_decrease)
local default_lease = tonumber(m.lease_us or '0')
local max_wait = tonumber(m.max_wait_us or '0')
local max_queue = tonumber(m.max_queue or '0')
local in_use = tonumber(m.in_use or '0')
local next_token = tonumber(m.next_token or '1')
local next_seq = tonumber(m.next_seq or '0')
local queued_permits = tonumber(m.queued_permits or '0')
local ewma = nil
if m.ewma_us and m.ewma_us ~= '' then ewma = tonumber(m.ewma_us) end
-- End of the learning window after state loss (see core/learning.rs), or nil.
local learning_until = opt(m.learn_until)
-- A lower bound of the next lease or wait deadline (see HOT); 0 (look) if not known.
local due = tonumber(m.due or '') or 0
-- See member(): an absent value puts every new waiter in `waits` (safe).
local max_dl = tonumber(m.max_dl or '') or NONE
-- Queued waiters asking for more than one permit (the `heavy` zset's size).
local heavy = tonumber(m.heavy or '')
if not heavy then heavy = redis.call('ZCARD', K_HEAVY) end
local c = {}
for _, k in ipairs(COUNTERS) do c[k] = tonumber(m['c_' .. k] or '0') end

local wakes = {}
-- `held`: the outcome is already recorded as the grant's `k:KEY` field (kept while held);
-- any other is recorded in `outcomes` by finish().
local function wake(key, channel, outcome, held)
  wakes[#wakes + 1] = {key, channel, outcome, held}
end

-- A queued waiter, found by its key (nil if not queued).
local function parse_waiter(key)
  local raw = redis.call('HGET', K_HOLD, 'k:' .. key)
  if not raw or string.sub(raw, 1, 2) ~= 'W|' then return nil end
  local at = string.find(raw, '|', 3, true)
  return parse_member(string.sub(raw, at + 1), tonumber(string.sub(raw, 3, at - 1)))
end

local function parse_holder(token)
  local raw = is_token(token) and redis.call('HGET', K_HOLD, token)
  if not raw then return nil end
  local f = split(raw)
  return {permits = tonumber(f[1]), deadline = tonumber(f[2]), granted_at = tonumber(f[3]),
          key = f[4] or '', label = tail(raw, 4)}
end

local function fits(permits) return limit == nil or in_use + permits <= limit end

-- GCRA. The emission interval is rounded up to whole microseconds, so the rate is never
-- exceeded (same as RateSpec::interval_us in Rust).
local function interval()
  return math.max(1, math.ceil(rate_period / rate_limit))
end

-- When the rate allows `permits` tokens; nil without a rate limit.
local function rate_at(permits)
  if not rate_limit then return nil end
  local t = interval()
  return math.max(0, tat + t * permits - t * rate_burst)
end

local function take_rate(at, permits)
  if rate_limit then tat = math.max(tat, at) + interval() * permits end
end

-- The most permits one acquire can ever get.
local function permit_cap()
  -- The limit in force: a request above a lowered adaptive limit is refused, not queued.
  local cap = limit
  if rate_burst and (not cap or rate_burst < cap) then cap = rate_burst end
  return cap
end

local refuse_impossible   -- defined below, after the helpers it uses

-- Takes waiter `w` out of the queue; `granted`: its `k:` entry is about to be overwritten by
-- its grant's outcome, so it is left for that write.
local function remove_waiter(w, granted)
  redis.call('ZREM', K_Q, w.member)
  if w.in_waits then redis.call('ZREM', K_WAITS, wait_member(w.seq, w.key)) end
  if not granted then redis.call('HDEL', K_HOLD, 'k:' .. w.key, 'a:' .. w.key) end
  if w.permits > 1 then
    redis.call('ZREM', K_HEAVY, w.member)
    heavy = heavy - 1
  end
  queued_permits = queued_permits - w.permits
end

-- `queued`: the grant goes to a waiter that was queued, whose outcome is recorded with the
-- holder (`k:KEY` = the `G|...` outcome); an immediate grant indexes its token (`I|token`), so a
-- caller that lost the reply can find it. Returns the grant's fields.
local function grant(permits, lease, enqueued_at, key, label, queued)
  -- Never below the clock: after a failover to a replica that missed the last grants, the
  -- clock has moved past their tokens, so none is issued twice (unless grants outran one per
  -- microsecond).
  local token = math.max(next_token, now)
  next_token = token + 1
  take_rate(now, permits)
  c.granted = c.granted + 1
  if not concurrency then
    -- Rate only: nothing is held, so no lease and nothing to release.
    c.paced = c.paced + 1
    return {fmt(token), fmt(permits), '0', fmt(now), fmt(now), fmt(math.max(0, now - enqueued_at))}
  end
  local deadline = now + lease
  local g = {fmt(token), fmt(permits), fmt(lease), fmt(deadline), fmt(now),
             fmt(math.max(0, now - enqueued_at))}
  local rec = fmt(permits) .. '|' .. fmt(deadline) .. '|' .. fmt(now) .. '|' .. key .. '|' .. (label or '')
  if key == '' then
    redis.call('HSET', K_HOLD, fmt(token), rec)
  elseif queued then
    redis.call('HSET', K_HOLD, fmt(token), rec, 'k:' .. key, 'G|' .. table.concat(g, '|'))
  else
    redis.call('HSET', K_HOLD, fmt(token), rec, 'k:' .. key, 'I|' .. fmt(token))
  end
  redis.call('ZADD', K_LEASE, fmt(deadline), fmt(token))
  -- The holders hash is empty (so gone) only with no holder and no waiter.
  if in_use == 0 then created(K_HOLD, K_LEASE) end
  in_use = in_use + permits
  return g
end

-- Removes holder `token` (record `h`) and its waiter's entry. `expired`: its grant's outcome,
-- if it came from the queue, moves to `outcomes` (kept OUTCOME_RETENTION), for a waiter that
-- never saw it.
local function drop_holder(token, h, expired)
  if h.key == '' then
    redis.call('HDEL', K_HOLD, token)
  else
    if expired then
      local o = redis.call('HGET', K_HOLD, 'k:' .. h.key)
      if o and string.sub(o, 1, 2) == 'G|' then wake(h.key, nil, o, false) end
    end
    redis.call('HDEL', K_HOLD, token, 'k:' .. h.key, 'a:' .. h.key)
  end
  redis.call('ZREM', K_LEASE, token)
end

local function nearest_lease()
  local l = redis.call('ZRANGE', K_LEASE, 0, 0, 'WITHSCORES')
  if l[2] then return tonumber(l[2]) end
  return nil
end

local function retry_hint(ahead)
  local by_rate = 0
  local ra = rate_at(ahead)
  if ra then by_rate = math.max(0, ra - now) end
  -- At least the time left in a learning window, when nothing is granted.
  local learning_left = 0
  if learning_until then learning_left = math.max(0, learning_until - now) end
  if not limit then
    if not ra then by_rate = 1000000 end
    return math.min(math.max(by_rate, learning_left, 1000), MAX_LEASE)
  end
  local rounds = math.max(1, math.ceil(ahead / limit))
  local est
  if ewma then
    est = ewma * rounds
  else
    local d = nearest_lease()
    if d then est = math.max(0, d - now) else est = 1000000 end
  end
  return math.min(math.max(est, by_rate, learning_left, 1000), MAX_LEASE)
end

-- Permits queued up to and including waiter `w` (for its retry hint, computed only when one is
-- sent): its rank counts one per waiter, and only the waiters asking for more are read to add
-- the rest. O(log n), plus the multi-permit waiters ahead of it.
local function permits_ahead(w)
  local sum = redis.call('ZRANK', K_Q, w.member) + 1
  if heavy > 0 then
    for _, mem in ipairs(redis.call('ZRANGEBYSCORE', K_HEAVY, '-inf', fmt(w.seq))) do
      sum = sum + parse_member(mem).permits - 1
    end
  end
  return sum
end

-- The head waiter (nil if none).
local function queue_head()
  local head = redis.call('ZRANGE', K_Q, 0, 0, 'WITHSCORES')
  if not head[1] then return nil end
  return parse_member(head[1], tonumber(head[2]))
end

local function grant_waiters()
  if learning_until then return end   -- nothing is granted while learning
  while true do
    -- Nothing fits a full limit (every waiter asks for a permit at least).
    if limit and in_use >= limit then return end
    local w = queue_head()
    if not w then return end
    if not fits(w.permits) then return end
    local ra = rate_at(w.permits)
    if ra and ra > now then return end
    remove_waiter(w, concurrency ~= nil)
    local g = grant(w.permits, w.lease, w.enqueued_at, w.key, w.label, true)
    wake(w.key, w.channel, 'G|' .. table.concat(g, '|'), concurrency ~= nil)
  end
end

-- Refuses queued waiters asking for more than any grant can now hold (after the limit or the
-- burst went down): they would otherwise hold back the queue until their wait ends. Every
-- waiter asks for one permit at least and the cap is at least one, so only the heavy ones can.
refuse_impossible = function()
  local cap = permit_cap()
  if not cap or heavy == 0 then return end
  for _, mem in ipairs(redis.call('ZRANGE', K_HEAVY, 0, -1)) do
    local w = parse_waiter(parse_member(mem).key)
    if w and w.permits > cap then
      remove_waiter(w)
      c.rejected = c.rejected + 1
      wake(w.key, w.channel, 'X|' .. fmt(w.permits) .. '|' .. fmt(cap), false)
    end
  end
end

local function observe_hold(held)
  ewma = next_ewma(ewma, held)
end

-- The head waiter's token time, if it fits the concurrency and only the rate holds it.
local function head_rate_at()
  if not rate_limit or learning_until then return nil end
  local w = queue_head()
  if not w or not fits(w.permits) then return nil end
  return rate_at(w.permits)
end

-- Applies the passage of time: lease ends and wait deadlines in deadline order (lease first
-- on a tie), granting what each frees. Deadlines are looked at only once the clock has reached
-- `due`; a look that finds none due moves `due` to the nearest.
-- The earliest wait deadline and its waiter's key (nil if none): the first of `waits`, or the
-- head if it is not in `waits` (see member()); the head first on a tie (it arrived first).
local function first_wait()
  local w = redis.call('ZRANGE', K_WAITS, 0, 0, 'WITHSCORES')
  local head = queue_head()
  if head and not head.in_waits and (not w[2] or head.deadline <= tonumber(w[2])) then
    return head.deadline, head.key
  end
  if w[2] then return tonumber(w[2]), string.sub(w[1], 17), w[1] end
  return nil
end

local function advance()
  if learning_until and learning_until <= now then
    learning_until = nil
    grant_waiters()
  end
  while true do
    local ld, wd, lm, wm = nil, nil, nil, nil
    if due <= now then
      local l = redis.call('ZRANGE', K_LEASE, 0, 0, 'WITHSCORES')
      local wat, wkey, wmem = first_wait()
      if l[2] and tonumber(l[2]) <= now then ld, lm = tonumber(l[2]), l[1] end
      if wat and wat <= now then wd, wm = wat, {wkey, wmem} end
      if not ld and not wd then
        due = NONE
        if l[2] then due = tonumber(l[2]) end
        if wat then due = math.min(due, wat) end
        if learning_until then due = math.min(due, learning_until) end
      end
    end
    local rd = head_rate_at()
    if rd and rd > now then rd = nil end
    if not ld and not wd and not rd then return end
    local first = ld
    if wd and (not first or wd < first) then first = wd end
    if rd and (not first or rd <= first) then
      -- The head's token time came first: grant it and whoever else is ready.
      grant_waiters()
    elseif ld and (not wd or ld <= wd) then
      local h = parse_holder(lm)
      if h then
        drop_holder(lm, h, true)
        in_use = math.max(0, in_use - h.permits)
        c.expired = c.expired + 1
      else
        redis.call('ZREM', K_LEASE, lm)
      end
    else
      -- Waits ending at the same moment end in queue order (the core's order): the waits
      -- member starts with the arrival sequence, which orders ties.
      local wt = parse_waiter(wm[1])
      if wt then
        local ahead = permits_ahead(wt)
        remove_waiter(wt)
        c.timed_out = c.timed_out + 1
        wake(wt.key, wt.channel, 'T|' .. fmt(retry_hint(ahead)), false)
      elseif wm[2] then
        redis.call('ZREM', K_WAITS, wm[2])
      end
    end
    grant_waiters()
  end
end

local function check_lease(lease)
  if lease < MIN_LEASE then return 'must be at least 1 ms' end
  if lease > MAX_LEASE then return 'must be at most ' .. fmt(MAX_LEASE / 1000) .. ' ms (24 h)' end
  return nil
end

local function check_spec(conc, lease, wait, queue)
  if conc < 1 or conc > MAX_CONCURRENCY then return {'concurrency', 'must be from 1 to ' .. fmt(MAX_CONCURRENCY)} end
  local e = check_lease(lease)
  if e then return {'lease_ms', e} end
  if wait < 0 or wait > MAX_WAIT then return {'max_wait_ms', 'must be at most ' .. fmt(MAX_WAIT / 1000) .. ' ms (1 h)'} end
  if queue < 0 or queue > MAX_QUEUE then return {'max_queue', 'must be at most ' .. fmt(MAX_QUEUE)} end
  return nil
end

local function ofmt(v) if v == nil then return '' end return fmt(v) end

-- Spec, state and counters, by name, in the order of STATUS (one schema, defined in Rust:
-- store/redis/script.rs, which RedisLimiter::parse_status reads by the same names).
local function status_fields()
  local v = {concurrency = ofmt(concurrency), lease_us = fmt(default_lease),
             max_wait_us = fmt(max_wait), max_queue = fmt(max_queue), in_use = fmt(in_use),
             holders = fmt(redis.call('ZCARD', K_LEASE)), waiting = fmt(redis.call('ZCARD', K_Q)),
             waiting_permits = fmt(queued_permits), limit = ofmt(limit),
             rate_limit = ofmt(rate_limit), rate_period_us = ofmt(rate_period),
             rate_burst = ofmt(rate_burst), a_min = ofmt(a_min), a_max = ofmt(a_max),
             a_inc = ofmt(a_inc), a_dec = a_dec and string.format('%.17g', a_dec) or '',
             a_cool_us = ofmt(a_cool), learning = learning_until and '1' or '0'}
  v.a_ext = a_ext
  for _, k in ipairs(COUNTERS) do v[k] = fmt(c[k]) end
  local out = {}
  for i, k in ipairs(STATUS) do
    if v[k] == nil then error('floodgate: no status field ' .. k) end
    out[i] = v[k]
  end
  return out
end

-- Forgets outcomes whose time is over (OUTCOME_RETENTION after their decision), a batch at a
-- time.
local function prune_outcomes()
  local old = redis.call('ZRANGEBYSCORE', K_OUTT, '-inf', fmt(now), 'LIMIT', 0, 100)
  if #old > 0 then
    redis.call('HDEL', K_OUT, unpack(old))
    redis.call('ZREM', K_OUTT, unpack(old))
  end
end

local function finish(reply)
  local kept = false
  for _, wk in ipairs(wakes) do
    if not wk[4] then
      redis.call('HSET', K_OUT, wk[1], wk[3])
      redis.call('ZADD', K_OUTT, fmt(now + OUTCOME_RETENTION), wk[1])
      kept = true
    end
    -- (An expired grant's outcome moved to `outcomes` has no channel: it was published.)
    if wk[2] then redis.call('PUBLISH', wk[2], name .. '\n' .. wk[1] .. '\n' .. wk[3]) end
  end
  if kept then created(K_OUT, K_OUTT) end
  local fields = {'concurrency', ofmt(concurrency), 'eff_limit', ofmt(limit),
                  'rate_limit', ofmt(rate_limit), 'rate_period_us', ofmt(rate_period),
                  'rate_burst', ofmt(rate_burst), 'a_min', ofmt(a_min), 'a_max', ofmt(a_max),
                  'a_inc', ofmt(a_inc), 'a_dec', a_dec and string.format('%.17g', a_dec) or '',
                  'a_cool_us', ofmt(a_cool), 'successes', fmt(successes),
                  'last_decrease', ofmt(last_decrease), 'lease_us', fmt(default_lease),
                  'max_wait_us', fmt(max_wait), 'max_queue', fmt(max_queue),
                  'learn_until', ofmt(learning_until)}
  for _, k in ipairs(COUNTERS) do
    if not HOT_ONLY['c_' .. k] then
      fields[#fields + 1] = 'c_' .. k
      fields[#fields + 1] = fmt(c[k])
    end
  end
  -- Only what changed is written.
  local changed = {}
  for i = 1, #fields, 2 do
    if meta_was[fields[i]] ~= fields[i + 1] then
      changed[#changed + 1] = fields[i]
      changed[#changed + 1] = fields[i + 1]
    end
  end
  if #changed > 0 then redis.call('HSET', K_META, unpack(changed)) end
  -- The exact next deadline: the fast paths' `due` starts from it.
  local l = redis.call('ZRANGE', K_LEASE, 0, 0, 'WITHSCORES')
  local wat = first_wait()
  due = NONE
  if l[2] then due = tonumber(l[2]) end
  if wat then due = math.min(due, wat) end
  local qlen = redis.call('ZCARD', K_Q)
  if qlen == 0 then max_dl = 0 end
  if learning_until then due = math.min(due, learning_until) end
  -- What the fast paths read: which may run, and the fields they need.
  local fast = '0'
  if not learning_until and concurrency and not rate_limit then fast = '1' end
  if not learning_until and rate_limit and not concurrency then fast = 'r' end
  local ttl_at = refresh and fmt(now + TTL_REFRESH) or m.ttl_at
  redis.call('SET', K_HOT, table.concat({fast, fmt(qlen), fmt(in_use),
    ofmt(limit), fmt(next_token), fmt(default_lease), ofmt(permit_cap()),
    ttl_at, fmt(c.granted), fmt(c.released), ewma and fmt(ewma) or '', fmt(next_seq),
    fmt(queued_permits), fmt(due), fmt(max_wait), fmt(max_queue), fmt(heavy), fmt(tat),
    rate_limit and fmt(interval()) or '', ofmt(rate_burst), fmt(c.paced), fmt(c.timed_out),
    fmt(max_dl)},
    '|'), 'KEEPTTL')
  if refresh then
    for i = 1, 9 do redis.call('PEXPIRE', KEYS[i], ttl_ms) end
  end
  local next = due
  local rd = head_rate_at()
  if rd and rd < next then next = rd end
  if next >= NONE then next = -1 else next = math.max(0, next - now) end
  reply[#reply + 1] = fmt(next)
  return reply
end

if op == 'put' then
  -- The Rust side validates the whole spec first; these checks are a backstop.
  local conc, lease, wait, queue, first_token =
    opt(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
  local bad = check_spec(conc or 1, lease, wait, queue)
  if bad then return {'invalid', bad[1], bad[2]} end
  local new_rate = {opt(ARGV[9]), opt(ARGV[10]), opt(ARGV[11])}
  local new_adaptive = {opt(ARGV[12]), opt(ARGV[13]), opt(ARGV[14]), opt(ARGV[15]), opt(ARGV[16])}
  if not conc and not new_rate[1] then return {'invalid', 'concurrency', 'a limiter needs a concurrency limit, a rate limit, or both'} end
  -- ARGV[17]: a learning window in us ('' or 0: none), entered only if this call creates the
  -- limiter and it was not deleted on purpose (no tombstone). ARGV[18]: 'revive' when a server
  -- re-creates a limiter it knew that vanished: then an existing limiter is left as it is, and a
  -- deleted one (tombstone) is not resurrected.
  local learn_us, mode = opt(ARGV[17]) or 0, ARGV[18] or ''
  -- ARGV[19]: the adaptive spec's rest ('algorithm|tolerance|probe_rounds'), '' without one.
  local new_ext = ARGV[19] or ''
  local tombstone = not exists and redis.call('EXISTS', K_TOK) == 1
  if mode == 'revive' then
    if tombstone then return {'deleted', '-1'} end
    if exists then
      local reply = status_fields()
      table.insert(reply, 1, 'status')
      return finish(reply)
    end
  end
  if not exists then
    -- Keys of an earlier incarnation that outlived its meta (they expire a little later)
    -- must not leak into this one.
    -- UNLINK frees them in the background, however large.
    redis.call('UNLINK', K_HOLD, K_LEASE, K_Q, K_HEAVY, K_WAITS, K_OUT, K_OUTT)
    heavy, due = 0, 0
    -- Seeded from the store's clock, and above any token of a deleted incarnation.
    next_token = math.max(first_token, now, tonumber(redis.call('GET', K_TOK) or '0'))
    -- The tombstone has served as the token floor; from now on the limiter exists.
    if tombstone then redis.call('DEL', K_TOK) end
  else
    -- Time that has passed is settled under the old spec, as the core does.
    advance()
  end
  -- The blocks below compare the old spec with the new one, so they run before the new
  -- fields are assigned.
  -- Every queued waiter fits the cap in force (acquire and every lowering see to it), so only
  -- a lower cap can make one impossible: an unchanged spec reads no waiter.
  local old_cap = exists and permit_cap() or nil
  -- Debt under the old rate is rescaled to the new one, so a raised rate applies now.
  if exists and rate_limit and new_rate[1] and tat > now then
    local old_t = interval()
    local new_t = math.max(1, math.ceil(new_rate[2] / new_rate[1]))
    tat = now + math.floor((tat - now) * new_t / old_t)
  end
  -- A learned adaptive limit survives a change of other fields; a new concurrency or adaptive
  -- range resets it.
  local same = exists and conc == concurrency and new_adaptive[1] == a_min and
    new_adaptive[2] == a_max and new_adaptive[3] == a_inc and new_adaptive[4] == a_dec and
    new_adaptive[5] == a_cool and new_ext == a_ext
  rate_limit, rate_period, rate_burst = new_rate[1], new_rate[2], new_rate[3]
  a_min, a_max, a_inc, a_dec, a_cool =
    new_adaptive[1], new_adaptive[2], new_adaptive[3], new_adaptive[4], new_adaptive[5]
  concurrency, default_lease, max_wait, max_queue = conc, lease, wait, queue
  if not same then
    limit = conc
    successes = 0
    redis.call('HDEL', K_META, 'g_state')
  end
  if new_ext ~= a_ext then
    a_ext = new_ext
    if a_ext == '' then redis.call('HDEL', K_META, 'a_ext') else redis.call('HSET', K_META, 'a_ext', a_ext) end
  end
  -- The limit in force always lies within the adaptive range.
  if limit and a_min then limit = math.min(math.max(limit, a_min), a_max) end
  if not exists and not tombstone and learn_us > 0 then
    -- State was lost: learn who still holds permits before granting (core/learning.rs).
    learning_until = now + learn_us
    if rate_limit then tat = math.max(tat, now + interval() * rate_burst) end
  end
  local new_cap = permit_cap()
  if old_cap and new_cap and new_cap < old_cap then refuse_impossible() end
  grant_waiters()
  local reply = status_fields()
  table.insert(reply, 1, 'status')
  return finish(reply)
end

if not exists then
  if op == 'cancel' then
    -- The limiter is gone; an outcome recorded before it went may still be here.
    return {'gone', '-1'}
  end
  return {'unknown', '-1'}
end

if op == 'peek' then
  -- Read-only: has this waiter's outcome been decided? Used after a lost subscription.
  local entry = redis.call('HGET', K_HOLD, 'k:' .. ARGV[4])
  if entry and string.sub(entry, 1, 2) == 'G|' then return {'decided', entry, '-1'} end
  local outcome = redis.call('HGET', K_OUT, ARGV[4])
  if outcome then return {'decided', outcome, '-1'} end
  return {'waiting', '-1'}
end

if op == 'delete' then
  -- Gone at once (meta and hot: every later call answers `unknown`); the rest is freed in the
  -- background (UNLINK) and the queue moves aside, to be answered `D` in batches (`drain`), so
  -- no call blocks Redis for long however many waited. Replies how many are left to drain.
  redis.call('DEL', K_META, K_HOT)
  redis.call('SET', K_TOK, fmt(math.max(next_token, now)), 'PX', ARGV[3])
  if redis.call('EXISTS', K_Q) == 1 then
    redis.call('UNLINK', K_DEAD)
    redis.call('RENAME', K_Q, K_DEAD)
    redis.call('PEXPIRE', K_DEAD, ARGV[3])
  end
  redis.call('UNLINK', K_HOLD, K_LEASE, K_HEAVY, K_WAITS, K_OUT, K_OUTT)
  return {'deleted', fmt(drain()), '-1'}
end

if op == 'acquire' then
  -- ARGV[10]: this call's attempt id (idempotent acquires only: see `idem`).
  local permits, lease_arg, wait_arg, key, channel, attempt =
    tonumber(ARGV[4]), ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[10] or ''
  advance()
  prune_outcomes()
  if is_repeat then
    -- The same request again (a retry after a lost answer or a dropped connection), as
    -- LimiterCore::repeat_of: the grant it got, or its wait to join.
    local entry = redis.call('HGET', K_HOLD, 'k:' .. key)
    local kind = entry and string.sub(entry, 1, 2)
    if kind == 'W|' then
      local w = parse_waiter(key)
      -- Joined: the same place in the queue and the same deadline; its wake-up goes to this
      -- caller's server from now on.
      if w.channel ~= channel then
        local mem = member(w.key, w.permits, w.lease, w.deadline, w.enqueued_at, w.in_waits,
          channel, w.label)
        redis.call('ZREM', K_Q, w.member)
        redis.call('ZADD', K_Q, fmt(w.seq), mem)
        if w.permits > 1 then
          redis.call('ZREM', K_HEAVY, w.member)
          redis.call('ZADD', K_HEAVY, fmt(w.seq), mem)
        end
        redis.call('HSET', K_HOLD, 'k:' .. key, 'W|' .. fmt(w.seq) .. '|' .. mem)
      end
      redis.call('HSET', K_HOLD, 'a:' .. key, attempt)
      return finish({'queued', fmt(math.max(1, w.deadline - now))})
    elseif kind == 'G|' or kind == 'I|' then
      local token = kind == 'I|' and string.sub(entry, 3) or split(entry)[2]
      local h = parse_holder(token)
      if h then
        redis.call('HSET', K_HOLD, 'a:' .. key, attempt)
        -- The lease reported is what is left of it (the record keeps no lease length).
        return finish({'granted', token, fmt(h.permits), fmt(math.max(MIN_LEASE, h.deadline - now)),
          fmt(h.deadline), fmt(h.granted_at), '0'})
      end
    end
    -- What the key named has ended: a new acquire.
  end
  if permits < 1 then
    c.rejected = c.rejected + 1
    return finish({'invalid', 'permits', 'must be at least 1'})
  end
  local cap = permit_cap()
  if cap and permits > cap then
    c.rejected = c.rejected + 1
    return finish({'exceeds', fmt(permits), fmt(cap)})
  end
  local lease = default_lease
  if lease_arg ~= '' then lease = tonumber(lease_arg) end
  local bad = check_lease(lease)
  if bad then
    c.rejected = c.rejected + 1
    return finish({'invalid', 'lease_ms', bad})
  end
  local wait = max_wait
  if wait_arg ~= '' then wait = math.min(tonumber(wait_arg), max_wait) end
  local qlen = redis.call('ZCARD', K_Q)
  if qlen == 0 and fits(permits) and not learning_until then
    local ra = rate_at(permits)
    if ra and ra > now then
      -- Only the rate holds it back and its token time is known: past the wait, say so now.
      if ra - now > wait then
        c.timed_out = c.timed_out + 1
        return finish({'timeout', fmt(math.max(ra - now, 1000))})
      end
    else
      local g = grant(permits, lease, now, key, ARGV[9], false)
      if idem(key) and concurrency then redis.call('HSET', K_HOLD, 'a:' .. key, attempt) end
      table.insert(g, 1, 'granted')
      return finish(g)
    end
  end
  local ahead = queued_permits + permits
  if wait < 1 then
    c.timed_out = c.timed_out + 1
    return finish({'timeout', fmt(retry_hint(ahead))})
  end
  if qlen >= max_queue then
    c.queue_full = c.queue_full + 1
    return finish({'queue_full', fmt(retry_hint(ahead))})
  end
  local seq = next_seq
  next_seq = next_seq + 1
  local deadline = now + wait
  if qlen == 0 then max_dl = 0 end
  local in_waits = deadline < max_dl
  local mem = member(key, permits, lease, deadline, now, in_waits, channel, ARGV[9])
  redis.call('HSET', K_HOLD, 'k:' .. key, 'W|' .. fmt(seq) .. '|' .. mem)
  if idem(key) then redis.call('HSET', K_HOLD, 'a:' .. key, attempt) end
  redis.call('ZADD', K_Q, fmt(seq), mem)
  -- (A TTL is set after the write that creates the key.)
  if qlen == 0 and in_use == 0 then created(K_HOLD) end
  if in_waits then
    redis.call('ZADD', K_WAITS, fmt(deadline), wait_member(seq, key))
    created(K_WAITS)
  else
    max_dl = deadline
  end
  if qlen == 0 then created(K_Q) end
  if permits > 1 then
    redis.call('ZADD', K_HEAVY, fmt(seq), mem)
    if heavy == 0 then created(K_HEAVY) end
    heavy = heavy + 1
  end
  queued_permits = queued_permits + permits
  return finish({'queued', fmt(wait)})
end

if op == 'release' then
  local token = ARGV[4]
  advance()
  local h = parse_holder(token)
  if not h then return finish({'released', '0'}) end
  drop_holder(token, h, false)
  in_use = math.max(0, in_use - h.permits)
  c.released = c.released + 1
  observe_hold(now - h.granted_at)
  grant_waiters()
  return finish({'released', '1'})
end

if op == 'extend' then
  -- ARGV[6]: the permit's size ('' if not sent), for re-adoption during a learning window.
  local token, lease, adopt_permits = ARGV[4], tonumber(ARGV[5]), opt(ARGV[6])
  local bad = check_lease(lease)
  if bad then return {'invalid', 'lease_ms', bad, '-1'} end
  advance()
  local h = parse_holder(token)
  local tok = tonumber(token)
  if not h and learning_until and concurrency and adopt_permits and adopt_permits >= 1
    and tok and tok >= 1 then
    -- Re-adopted (core/learning.rs): held again, counted in in_use even above the limit;
    -- later tokens start above it.
    local deadline = now + lease
    local first_holder = in_use == 0
    redis.call('HSET', K_HOLD, fmt(tok), fmt(adopt_permits) .. '|' .. fmt(deadline) .. '|' .. fmt(now) .. '|')
    redis.call('ZADD', K_LEASE, fmt(deadline), fmt(tok))
    if first_holder then created(K_HOLD, K_LEASE) end
    in_use = in_use + adopt_permits
    next_token = math.max(next_token, tok + 1)
    c.granted = c.granted + 1
    c.adopted = c.adopted + 1
    return finish({'extended', fmt(deadline)})
  end
  if not h then
    c.extend_lost = c.extend_lost + 1
    return finish({'lost'})
  end
  local deadline = now + lease
  redis.call('HSET', K_HOLD, token,
    fmt(h.permits) .. '|' .. fmt(deadline) .. '|' .. fmt(h.granted_at) .. '|' .. h.key .. '|' .. h.label)
  redis.call('ZADD', K_LEASE, fmt(deadline), token)
  return finish({'extended', fmt(deadline)})
end

if op == 'cancel' then
  -- reason: 'drop' (the waiter went away), 'timeout' (its own timer ran out first) or
  -- 'abandon' (an idempotent acquire's attempt ARGV[6] went away, and its grant reached its
  -- server or its grace for a retry ended: a drop, unless a retry has claimed the wait or
  -- grant since; then {'kept'}).
  local key, reason = ARGV[4], ARGV[5]
  advance()
  if reason == 'abandon' then
    local owner = redis.call('HGET', K_HOLD, 'a:' .. key)
    if owner and owner ~= ARGV[6] then return finish({'kept'}) end
    reason = 'drop'
  end
  local w = parse_waiter(key)
  if w then
    local reply
    if reason == 'timeout' then
      -- The hint is computed only here, where it is sent (a drop's caller is gone).
      local ahead = permits_ahead(w)
      remove_waiter(w)
      c.timed_out = c.timed_out + 1
      reply = {'timed_out', fmt(retry_hint(ahead))}
    else
      remove_waiter(w)
      c.cancelled = c.cancelled + 1
      reply = {'cancelled'}
    end
    grant_waiters()
    return finish(reply)
  end
  -- Already decided (perhaps by this very call's advance): hand back the recorded outcome.
  local outcome = nil
  for _, wk in ipairs(wakes) do
    if wk[1] == key then outcome = wk[3] end
  end
  if not outcome then
    -- A grant still held keeps its entry (the release removes it).
    local entry = redis.call('HGET', K_HOLD, 'k:' .. key)
    if entry and string.sub(entry, 1, 2) == 'G|' then
      outcome = entry
    elseif entry and string.sub(entry, 1, 2) == 'I|' and reason == 'drop' then
      -- Granted at once but the caller never saw the reply (it timed out): the entry names
      -- the grant, so the caller can return it.
      local token = string.sub(entry, 3)
      local f = split(redis.call('HGET', K_HOLD, token) or '0|0|0')
      outcome = 'G|' .. token .. '|' .. f[1] .. '|' .. fmt(tonumber(f[2]) - tonumber(f[3])) ..
        '|' .. f[2] .. '|' .. f[3] .. '|0'
    else
      outcome = redis.call('HGET', K_OUT, key)
      if outcome then
        -- Read: forgotten now.
        redis.call('HDEL', K_OUT, key)
        redis.call('ZREM', K_OUTT, key)
      end
    end
  end
  if outcome then return finish({'decided', outcome}) end
  return finish({'gone'})
end

if op == 'schedule' then
  local count = tonumber(ARGV[4])
  if not rate_limit then return {'invalid', 'count', 'this limiter has no rate limit to schedule against', '-1'} end
  advance()
  local before = tat
  local reply = {'offsets'}
  local last, fit = 0, 0
  for _ = 1, count do
    local at = math.max(now, rate_at(1))
    last = at - now
    if last <= max_wait then fit = fit + 1 end
    reply[#reply + 1] = fmt(last)
    take_rate(at, 1)
  end
  -- The limiter's cap on waits bounds how far ahead a schedule reserves (as in core::schedule).
  if last > max_wait then
    tat = before
    -- Refused, but the time that passed (expiries, ended waits) is kept, as in the core.
    return finish({'invalid', 'count', 'would reserve tokens further ahead than this limiter\'s max_wait_ms ('
      .. fmt(math.floor(max_wait / 1000)) .. ' ms), which bounds a schedule; ' .. fmt(fit) .. ' fit now'})
  end
  c.scheduled = c.scheduled + count
  -- ARGV[5]: the reservation id the store drew; remembered with `tat` after it, so that its
  -- unused tail can be given back while nothing has been taken after it (core/reservation.rs).
  redis.call('HSET', K_META, 'res', ARGV[5] .. '|' .. fmt(tat) .. '|' .. fmt(count))
  return finish(reply)
end

if op == 'unschedule' then
  -- ARGV[4]: the reservation id, ARGV[5]: how many tokens the producer did not use.
  -- Reply: {'returned', n}. Mirrors LimiterCore::unschedule (core/reservation.rs).
  local id, unused = ARGV[4], tonumber(ARGV[5])
  if not rate_limit then return {'invalid', 'reservation', 'this limiter has no rate limit, so it has no reservations', '-1'} end
  if not unused or unused < 1 then return {'invalid', 'count', 'must be at least 1', '-1'} end
  advance()
  local res = split(redis.call('HGET', K_META, 'res') or '')
  if res[1] ~= id or tonumber(res[2]) ~= tat then return finish({'returned', '0'}) end
  local t = interval()
  local lead = t * rate_burst
  local ahead = tat - now
  local future = 0
  if ahead > lead then future = math.ceil((ahead - lead) / t) end
  local returned = math.min(future, unused, tonumber(res[3]))
  if returned <= 0 then return finish({'returned', '0'}) end
  tat = tat - t * returned
  redis.call('HSET', K_META, 'res', id .. '|' .. fmt(tat) .. '|' .. fmt(tonumber(res[3]) - returned))
  grant_waiters()
  return finish({'returned', fmt(returned)})
end

-- An integer EWMA of latencies (core/adaptive's `ewma`: the first sample sets it).
local function gradient_ewma(avg, sample, weight)
  if avg == 0 then return math.max(sample, 1) end
  if sample >= avg then return avg + math.floor((sample - avg) / weight) end
  return avg - math.floor((avg - sample) / weight)
end

-- The gradient controller (core/adaptive/mod.rs, step for step: read it for the why).
local function gradient_feedback(outcome, latency)
  local ext = split(a_ext)
  local tolerance, probe_rounds = tonumber(ext[2]), tonumber(ext[3])
  local g = split(m.g_state or '0|0|0|0|0|0')
  local short, long, ceiling, credit = tonumber(g[1]), tonumber(g[2]), tonumber(g[3]), tonumber(g[4])
  local samples, backoff = tonumber(g[5]), tonumber(g[6])
  local function save()
    redis.call('HSET', K_META, 'g_state', table.concat({fmt(short), fmt(long), fmt(ceiling),
      fmt(credit), fmt(samples), fmt(backoff)}, '|'))
  end
  local news
  if not last_decrease then
    news = true
  elseif latency then
    news = now - latency >= last_decrease
  else
    news = now >= last_decrease + math.max(a_cool, ewma or 0)
  end
  local new = limit
  if outcome == 'throttled' then
    if not news then return limit end
    local deep = successes == 0 and last_decrease ~= nil
    last_decrease = now
    successes = 0
    credit = 0
    if ceiling > 0 and limit == ceiling + 1 and not deep then
      backoff = math.min(backoff + 1, GRADIENT_MAX_BACKOFF)
      save()
      return math.max(ceiling, a_min)
    end
    backoff = 0
    ceiling = math.max(math.min(in_use, limit) - 1, a_min)
    local lowered = math.floor(limit * a_dec)
    if deep then lowered = math.floor(lowered * a_dec) end
    new = math.max(math.min(lowered, limit - 1), a_min)
    save()
    return new
  end
  if outcome ~= 'ok' then return limit end
  if news and last_decrease then successes = successes + 1 end
  if latency then
    if long > 0 then latency = math.min(latency, long * 2) end
    short = gradient_ewma(short, latency, GRADIENT_SHORT_WEIGHT)
    long = gradient_ewma(long, latency, GRADIENT_LONG_WEIGHT)
    samples = math.min(samples + 1, GRADIENT_WARM_UP)
    local cooled = not last_decrease or now >= last_decrease + short
    if samples >= GRADIENT_WARM_UP and short > tolerance * long and cooled then
      local gradient = math.max(tolerance * long / short, 0.5)
      new = math.max(math.min(math.floor(limit * (0.8 + 0.2 * gradient)), limit), a_min)
      last_decrease = now
      successes = 0
      credit = 0
      ceiling = limit
      save()
      return new
    end
  end
  if in_use * 2 < limit then
    save()
    return limit
  end
  local step, threshold
  if ceiling == 0 then
    step, threshold = limit, limit
  elseif limit < ceiling then
    step, threshold = math.max(math.floor((ceiling - limit) / 2), 1), limit
  elseif limit == ceiling then
    step, threshold = 1, limit * probe_rounds * 2 ^ backoff
  else
    step, threshold = limit - ceiling, limit
  end
  if short > long then step = math.max(math.floor(step / 2), 1) end
  credit = credit + step
  if credit >= threshold then
    local permits = math.floor(credit / threshold)
    credit = credit - permits * threshold
    new = limit + permits
    if limit < ceiling then new = math.min(new, ceiling) end
    new = math.min(new, a_max)
    if ceiling > 0 and new >= ceiling * 2 then ceiling = 0 end
  end
  save()
  return new
end

if op == 'feedback' then
  local outcome = ARGV[4]
  -- ARGV[5]: the call's latency in us ('' if not reported): the gradient controller uses it.
  local latency = opt(ARGV[5])
  advance()
  c['feedback_' .. outcome] = c['feedback_' .. outcome] + 1
  if a_min and limit and string.sub(a_ext, 1, 9) == 'gradient|' then
    local new = gradient_feedback(outcome, latency)
    if new < limit then
      limit = new
      c.limit_decreases = c.limit_decreases + 1
      refuse_impossible()
    elseif new > limit then
      limit = new
      c.limit_increases = c.limit_increases + 1
      grant_waiters()
    end
  elseif a_min and limit then
    if outcome == 'throttled' then
      successes = 0
      -- Cooling interval: the cooldown or the typical hold time, whichever is longer.
      if not last_decrease or now >= last_decrease + math.max(a_cool, ewma or 0) then
        last_decrease = now
        local lowered = math.max(math.min(math.floor(limit * a_dec), limit - 1), a_min)
        if lowered < limit then
          limit = lowered
          c.limit_decreases = c.limit_decreases + 1
          refuse_impossible()
        end
      end
    elseif outcome == 'ok' then
      successes = successes + 1
      if successes >= limit then
        successes = 0
        local raised = math.min(limit + a_inc, a_max)
        if raised > limit then
          limit = raised
          c.limit_increases = c.limit_increases + 1
          grant_waiters()
        end
      end
    end
  end
  return finish({'limit', ofmt(limit)})
end

if op == 'learn' then
  -- ARGV[4]: a learning window in us. The store saw Redis change under it (a failover or a
  -- restart that may have lost the last writes): enter (or prolong) a window on the state that
  -- is here, as LimiterCore::enter_learning does. Reply: {'ok'}.
  local window = tonumber(ARGV[4]) or 0
  advance()
  if window > 0 then
    local until_ = now + window
    if not learning_until or until_ > learning_until then learning_until = until_ end
    -- Spend the burst: the tokens taken just before the loss are unknown.
    if rate_limit then tat = math.max(tat, now + interval() * rate_burst) end
  end
  return finish({'ok'})
end

if op == 'advance' then
  advance()
  prune_outcomes()
  return finish({'ok'})
end

if op == 'status' then
  advance()
  local reply = status_fields()
  table.insert(reply, 1, 'status')
  return finish(reply)
end

return redis.error_reply('floodgate: unknown op ' .. tostring(op))

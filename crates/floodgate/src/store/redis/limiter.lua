-- Floodgate's limiter state machine, one atomic script per operation.
--
-- The same transitions as crates/floodgate/src/core/mod.rs (read that file for the rules);
-- tests/suite runs one behavioural suite against both. Time is the store's own clock (TIME),
-- never a caller's. Every key of a limiter shares the hash tag {name}, so the script works on
-- Redis Cluster. Integers are microseconds; they stay below 2^53, so Lua's doubles hold them
-- exactly, and they are always formatted with %d (tostring would print 1.8e+15).
--
-- KEYS: 1 meta (hash: spec, state, counters)      2 holders (hash token -> permits|deadline|granted_at|key)
--       3 leases (zset token by lease deadline)   4 queue (zset waiter key by arrival sequence)
--         (a holder's label, sent with its acquire, follows: `|label`, possibly containing `|`)
--       5 waiters (hash key -> seq|permits|lease|deadline|enqueued_at|channel|label)
--       6 waits (zset waiter key by wait deadline)
--       7 outcomes (hash waiter key -> outcome)   8 outcome_times (zset waiter key by decision time)
--       9 hot (string: the fields every acquire and release touch, `|`-separated in HOT order,
--         kept apart from the spec so the fast path reads and writes one short value)
--      10 tokens (string: the next fencing token of a deleted incarnation, so a re-created
--         limiter starts above it; written only by delete, with the idle TTL)
-- ARGV: 1 op, 2 limiter name, 3 idle TTL in ms, then the op's arguments.
--
-- Reply: a flat array of strings: a tag, the op's fields, and last the delay in microseconds
-- until the next lease or wait deadline ("-1" if none), for the caller's timer.
--
-- Outcomes of queued waiters ("G|token|permits|lease|deadline|granted_at|waited",
-- "T|retry_after", "X|requested|limit", "D") are recorded in `outcomes` BEFORE they are
-- published to the waiter's server channel, so a waiter that missed the message still finds
-- its outcome when it cancels.

local K_META, K_HOLD, K_LEASE, K_Q, K_W, K_WAITS, K_OUT, K_OUTT, K_HOT, K_TOK =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9], KEYS[10]
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
-- HOLD_EWMA_WEIGHT, OUTCOME_RETENTION, STATUS and COUNTERS come from the prelude that
-- store/redis/script.rs builds from the Rust constants.
local function fmt(n) return string.format('%d', n) end
local TTL_REFRESH = 3600 * 1000000

-- The smoothed hold time after a hold of `held` (weight 1/8, integer steps: the same
-- arithmetic as the core's observe_hold).
local function next_ewma(ewma, held)
  if not ewma then return held end
  if held >= ewma then return ewma + math.floor((held - ewma) / HOLD_EWMA_WEIGHT) end
  return ewma - math.floor((ewma - held) / HOLD_EWMA_WEIGHT)
end

-- The fields of the hot value, in order.
local HOT = {'fast', 'qlen', 'in_use', 'eff_limit', 'next_token', 'lease_us', 'cap', 'ttl_at',
             'c_granted', 'c_released', 'ewma_us'}

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

-- Fast path: an acquire granted at once or a release, on a concurrency-only limiter with an
-- empty queue and no lease due. Same rules as the general path below, in a handful of
-- commands (the general path loads and rewrites the whole state). Anything else falls through.
if (op == 'acquire' or op == 'release') and not general_only then
  local raw_hot = redis.call('GET', K_HOT)
  local h = raw_hot and split(raw_hot) or {}
  local first = (h[1] == '1' and h[2] == '0') and redis.call('ZRANGE', K_LEASE, '0', '0', 'WITHSCORES')
  local first_at = first and first[2] and tonumber(first[2])
  if first and (not first_at or first_at > now) then
    local in_use = tonumber(h[3])
    local refresh = tonumber(h[8] or '0') <= now
    local function expire_all()
      for i = 1, 9 do redis.call('PEXPIRE', KEYS[i], ARGV[3]) end
    end
    if op == 'acquire' then
      local permits, lease = tonumber(ARGV[4]), tonumber(h[6])
      if ARGV[5] ~= '' then lease = tonumber(ARGV[5]) end
      if permits >= 1 and permits <= tonumber(h[7]) and lease >= MIN_LEASE and lease <= MAX_LEASE
        and in_use + permits <= tonumber(h[4]) then
        local token = math.max(tonumber(h[5]), now)
        local deadline = now + lease
        -- The waiter key rides along, so a caller that lost this reply can still find and
        -- return the grant (cancel, below).
        redis.call('HSET', K_HOLD, fmt(token),
          fmt(permits) .. '|' .. fmt(deadline) .. '|' .. fmt(now) .. '|' .. ARGV[7] .. '|' .. (ARGV[9] or ''))
        redis.call('ZADD', K_LEASE, fmt(deadline), fmt(token))
        h[3], h[5], h[9] = fmt(in_use + permits), fmt(token + 1), fmt(tonumber(h[9]) + 1)
        if refresh then h[8] = fmt(now + TTL_REFRESH) end
        redis.call('SET', K_HOT, table.concat(h, '|'), 'KEEPTTL')
        if refresh then
          expire_all()
        elseif in_use == 0 then
          -- The holders hash and leases set were empty (so gone) and are new: give them a TTL.
          redis.call('PEXPIRE', K_HOLD, ARGV[3])
          redis.call('PEXPIRE', K_LEASE, ARGV[3])
        end
        local next = deadline
        if first_at and first_at < next then next = first_at end
        return {'granted', fmt(token), fmt(permits), fmt(lease), fmt(deadline), fmt(now), '0',
                fmt(next - now)}
      end
    else
      local token = ARGV[4]
      local next = '-1'
      if first_at then next = fmt(first_at - now) end
      local raw = redis.call('HGET', K_HOLD, token)
      if not raw then return {'released', '0', next} end
      local f = split(raw)
      local permits = tonumber(f[1])
      -- Never negative, even if the clock stepped back (a failover to a replica behind).
      local held = math.max(0, now - tonumber(f[3]))
      local ewma = next_ewma(tonumber(h[11] or ''), held)
      redis.call('HDEL', K_HOLD, token)
      redis.call('ZREM', K_LEASE, token)
      h[3], h[10], h[11] = fmt(math.max(0, in_use - permits)), fmt(tonumber(h[10]) + 1), fmt(ewma)
      if refresh then h[8] = fmt(now + TTL_REFRESH) end
      redis.call('SET', K_HOT, table.concat(h, '|'), 'KEEPTTL')
      if refresh then expire_all() end
      return {'released', '1', next}
    end
  end
end



-- State, loaded once and written back once.
local m = {}
do
  local raw = redis.call('HGETALL', K_META)
  for i = 1, #raw, 2 do m[raw[i]] = raw[i + 1] end
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
local c = {}
for _, k in ipairs(COUNTERS) do c[k] = tonumber(m['c_' .. k] or '0') end

local wakes = {}
-- `keep_until`: the waiter's own wait deadline; its outcome is kept 120 s past it, for a
-- waiter whose message was lost and that asks when its own timer ends.
local function wake(key, channel, outcome, keep_until)
  wakes[#wakes + 1] = {key, channel, outcome, keep_until or now}
end

local function parse_waiter(key)
  local raw = redis.call('HGET', K_W, key)
  if not raw then return nil end
  local f = split(raw)
  return {seq = tonumber(f[1]), permits = tonumber(f[2]), lease = tonumber(f[3]),
          deadline = tonumber(f[4]), enqueued_at = tonumber(f[5]), channel = f[6], label = tail(raw, 6)}
end

local function parse_holder(token)
  local raw = redis.call('HGET', K_HOLD, token)
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

local function remove_waiter(key, w)
  redis.call('ZREM', K_Q, key)
  redis.call('HDEL', K_W, key)
  redis.call('ZREM', K_WAITS, key)
  queued_permits = queued_permits - w.permits
end

local function grant(permits, lease, enqueued_at, key, label)
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
  local first_holder = in_use == 0
  redis.call('HSET', K_HOLD, fmt(token),
    fmt(permits) .. '|' .. fmt(deadline) .. '|' .. fmt(now) .. '|' .. key .. '|' .. (label or ''))
  redis.call('ZADD', K_LEASE, fmt(deadline), fmt(token))
  if first_holder then created(K_HOLD, K_LEASE) end
  in_use = in_use + permits
  return {fmt(token), fmt(permits), fmt(lease), fmt(deadline), fmt(now),
          fmt(math.max(0, now - enqueued_at))}
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

local function permits_ahead(seq)
  local sum = 0
  for _, key in ipairs(redis.call('ZRANGEBYSCORE', K_Q, '-inf', fmt(seq))) do
    local w = parse_waiter(key)
    if w then sum = sum + w.permits end
  end
  return sum
end

local function grant_waiters()
  if learning_until then return end   -- nothing is granted while learning
  while true do
    local head = redis.call('ZRANGE', K_Q, 0, 0)
    if #head == 0 then return end
    local key = head[1]
    local w = parse_waiter(key)
    if not fits(w.permits) then return end
    local ra = rate_at(w.permits)
    if ra and ra > now then return end
    remove_waiter(key, w)
    local g = grant(w.permits, w.lease, w.enqueued_at, key, w.label)
    wake(key, w.channel, 'G|' .. table.concat(g, '|'), w.deadline)
  end
end

-- Refuses queued waiters asking for more than any grant can now hold (after the limit or the
-- burst went down): they would otherwise hold back the queue until their wait ends.
refuse_impossible = function()
  local cap = permit_cap()
  if not cap then return end
  for _, key in ipairs(redis.call('ZRANGE', K_Q, 0, -1)) do
    local w = parse_waiter(key)
    if w and w.permits > cap then
      remove_waiter(key, w)
      c.rejected = c.rejected + 1
      wake(key, w.channel, 'X|' .. fmt(w.permits) .. '|' .. fmt(cap), w.deadline)
    end
  end
end

local function observe_hold(held)
  ewma = next_ewma(ewma, held)
end

-- The head waiter's token time, if it fits the concurrency and only the rate holds it.
local function head_rate_at()
  if not rate_limit or learning_until then return nil end
  local head = redis.call('ZRANGE', K_Q, 0, 0)
  if #head == 0 then return nil end
  local w = parse_waiter(head[1])
  if not w or not fits(w.permits) then return nil end
  return rate_at(w.permits)
end

-- Applies the passage of time: lease ends and wait deadlines in deadline order (lease first
-- on a tie), granting what each frees.
local function advance()
  if learning_until and learning_until <= now then
    learning_until = nil
    grant_waiters()
  end
  while true do
    local l = redis.call('ZRANGE', K_LEASE, 0, 0, 'WITHSCORES')
    local w = redis.call('ZRANGE', K_WAITS, 0, 0, 'WITHSCORES')
    local ld, wd = nil, nil
    if l[2] and tonumber(l[2]) <= now then ld = tonumber(l[2]) end
    if w[2] and tonumber(w[2]) <= now then wd = tonumber(w[2]) end
    local rd = head_rate_at()
    if rd and rd > now then rd = nil end
    if not ld and not wd and not rd then return end
    local first = ld
    if wd and (not first or wd < first) then first = wd end
    if rd and (not first or rd <= first) then
      -- The head's token time came first: grant it and whoever else is ready.
      grant_waiters()
    elseif ld and (not wd or ld <= wd) then
      local h = parse_holder(l[1])
      redis.call('HDEL', K_HOLD, l[1])
      redis.call('ZREM', K_LEASE, l[1])
      if h then
        in_use = math.max(0, in_use - h.permits)
        c.expired = c.expired + 1
      end
    else
      -- Waits ending at the same moment end in queue order (the core's order), not in the
      -- zset's order of their keys.
      local key = w[1]
      local tied = redis.call('ZRANGEBYSCORE', K_WAITS, w[2], w[2])
      if #tied > 1 then
        local best = nil
        for _, k in ipairs(tied) do
          local t = parse_waiter(k)
          if t and (not best or t.seq < best) then key, best = k, t.seq end
        end
      end
      local wt = parse_waiter(key)
      if wt then
        local ahead = permits_ahead(wt.seq)
        remove_waiter(key, wt)
        c.timed_out = c.timed_out + 1
        wake(key, wt.channel, 'T|' .. fmt(retry_hint(ahead)), wt.deadline)
      else
        redis.call('ZREM', K_WAITS, key)
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
             holders = fmt(redis.call('HLEN', K_HOLD)), waiting = fmt(redis.call('ZCARD', K_Q)),
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

-- Forgets outcomes nobody will ask for any more (their waiter's wait is long over).
local function prune_outcomes()
  local horizon = now
  local old = redis.call('ZRANGEBYSCORE', K_OUTT, '-inf', fmt(horizon), 'LIMIT', 0, 100)
  for _, key in ipairs(old) do
    redis.call('HDEL', K_OUT, key)
    redis.call('ZREM', K_OUTT, key)
  end
end

local function finish(reply)
  for _, wk in ipairs(wakes) do
    redis.call('HSET', K_OUT, wk[1], wk[3])
    redis.call('ZADD', K_OUTT, fmt(wk[4] + OUTCOME_RETENTION), wk[1])
    redis.call('PUBLISH', wk[2], name .. '\n' .. wk[1] .. '\n' .. wk[3])
  end
  if #wakes > 0 then created(K_OUT, K_OUTT) end
  local fields = {'concurrency', ofmt(concurrency), 'eff_limit', ofmt(limit),
                  'rate_limit', ofmt(rate_limit), 'rate_period_us', ofmt(rate_period),
                  'rate_burst', ofmt(rate_burst), 'a_min', ofmt(a_min), 'a_max', ofmt(a_max),
                  'a_inc', ofmt(a_inc), 'a_dec', a_dec and string.format('%.17g', a_dec) or '',
                  'a_cool_us', ofmt(a_cool), 'tat', fmt(tat), 'successes', fmt(successes),
                  'last_decrease', ofmt(last_decrease), 'lease_us', fmt(default_lease),
                  'max_wait_us', fmt(max_wait), 'max_queue', fmt(max_queue),
                  'next_seq', fmt(next_seq), 'queued_permits', fmt(queued_permits),
                  'learn_until', ofmt(learning_until)}
  for _, k in ipairs(COUNTERS) do
    if k ~= 'granted' and k ~= 'released' then
      fields[#fields + 1] = 'c_' .. k
      fields[#fields + 1] = fmt(c[k])
    end
  end
  redis.call('HSET', K_META, unpack(fields))
  -- What the fast path reads: whether it may run (concurrency only, nothing queued) and the
  -- fields it needs.
  local fast = (concurrency and not rate_limit and not learning_until) and '1' or '0'
  local ttl_at = refresh and fmt(now + TTL_REFRESH) or m.ttl_at
  redis.call('SET', K_HOT, table.concat({fast, fmt(redis.call('ZCARD', K_Q)), fmt(in_use),
    ofmt(limit), fmt(next_token), fmt(default_lease), ofmt(permit_cap()),
    ttl_at, fmt(c.granted), fmt(c.released), ewma and fmt(ewma) or ''}, '|'), 'KEEPTTL')
  if refresh then
    for i = 1, 9 do redis.call('PEXPIRE', KEYS[i], ttl_ms) end
  end
  local next = -1
  local l = redis.call('ZRANGE', K_LEASE, 0, 0, 'WITHSCORES')
  local w = redis.call('ZRANGE', K_WAITS, 0, 0, 'WITHSCORES')
  if l[2] then next = tonumber(l[2]) end
  if w[2] and (next < 0 or tonumber(w[2]) < next) then next = tonumber(w[2]) end
  if learning_until and (next < 0 or learning_until < next) then next = learning_until end
  local rd = head_rate_at()
  if rd and (next < 0 or rd < next) then next = rd end
  if next >= 0 then next = math.max(0, next - now) end
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
    redis.call('DEL', K_HOLD, K_LEASE, K_Q, K_W, K_WAITS, K_OUT, K_OUTT)
    -- Seeded from the store's clock, and above any token of a deleted incarnation.
    next_token = math.max(first_token, now, tonumber(redis.call('GET', K_TOK) or '0'))
    -- The tombstone has served as the token floor; from now on the limiter exists.
    if tombstone then redis.call('DEL', K_TOK) end
  else
    -- Time that has passed is settled under the old spec, as the core does.
    advance()
  end
  -- Both blocks below compare the old spec with the new one, so they run before the new
  -- fields are assigned.
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
  refuse_impossible()
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
  local outcome = redis.call('HGET', K_OUT, ARGV[4])
  if outcome then return {'decided', outcome, '-1'} end
  return {'waiting', '-1'}
end

if op == 'delete' then
  for _, key in ipairs(redis.call('ZRANGE', K_Q, 0, -1)) do
    local w = parse_waiter(key)
    if w then redis.call('PUBLISH', w.channel, name .. '\n' .. key .. '\nD') end
  end
  redis.call('DEL', K_META, K_HOLD, K_LEASE, K_Q, K_W, K_WAITS, K_OUT, K_OUTT, K_HOT)
  redis.call('SET', K_TOK, fmt(math.max(next_token, now)), 'PX', ARGV[3])
  return {'deleted', '-1'}
end

if op == 'acquire' then
  local permits, lease_arg, wait_arg, key, channel =
    tonumber(ARGV[4]), ARGV[5], ARGV[6], ARGV[7], ARGV[8]
  advance()
  prune_outcomes()
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
  if redis.call('ZCARD', K_Q) == 0 and fits(permits) and not learning_until then
    local ra = rate_at(permits)
    if ra and ra > now then
      -- Only the rate holds it back and its token time is known: past the wait, say so now.
      if ra - now > wait then
        c.timed_out = c.timed_out + 1
        return finish({'timeout', fmt(math.max(ra - now, 1000))})
      end
    else
      local g = grant(permits, lease, now, key, ARGV[9])
      table.insert(g, 1, 'granted')
      return finish(g)
    end
  end
  local ahead = queued_permits + permits
  if wait < 1 then
    c.timed_out = c.timed_out + 1
    return finish({'timeout', fmt(retry_hint(ahead))})
  end
  if redis.call('ZCARD', K_Q) >= max_queue then
    c.queue_full = c.queue_full + 1
    return finish({'queue_full', fmt(retry_hint(ahead))})
  end
  local seq = next_seq
  next_seq = next_seq + 1
  local deadline = now + wait
  redis.call('HSET', K_W, key, fmt(seq) .. '|' .. fmt(permits) .. '|' .. fmt(lease) .. '|' ..
    fmt(deadline) .. '|' .. fmt(now) .. '|' .. channel .. '|' .. (ARGV[9] or ''))
  redis.call('ZADD', K_Q, fmt(seq), key)
  redis.call('ZADD', K_WAITS, fmt(deadline), key)
  if queued_permits == 0 then created(K_Q, K_W, K_WAITS) end
  queued_permits = queued_permits + permits
  return finish({'queued', fmt(wait)})
end

if op == 'release' then
  local token = ARGV[4]
  advance()
  local h = parse_holder(token)
  if not h then return finish({'released', '0'}) end
  redis.call('HDEL', K_HOLD, token)
  redis.call('ZREM', K_LEASE, token)
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
  -- reason: 'drop' (the waiter went away) or 'timeout' (its own timer ran out first).
  local key, reason = ARGV[4], ARGV[5]
  advance()
  local w = parse_waiter(key)
  if w then
    local ahead = permits_ahead(w.seq)
    remove_waiter(key, w)
    local reply
    if reason == 'timeout' then
      c.timed_out = c.timed_out + 1
      reply = {'timed_out', fmt(retry_hint(ahead))}
    else
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
  if not outcome then outcome = redis.call('HGET', K_OUT, key) end
  if not outcome and reason == 'drop' then
    -- Granted at once but the caller never saw the reply (it timed out): find the grant by
    -- the waiter key its holder record carries, so the caller can return it.
    local all = redis.call('HGETALL', K_HOLD)
    for i = 1, #all, 2 do
      local f = split(all[i + 1])
      if f[4] == key then
        outcome = 'G|' .. all[i] .. '|' .. f[1] .. '|' .. fmt(tonumber(f[2]) - tonumber(f[3])) ..
          '|' .. f[2] .. '|' .. f[3] .. '|0'
      end
    end
  end
  redis.call('HDEL', K_OUT, key)
  redis.call('ZREM', K_OUTT, key)
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
  return finish(reply)
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

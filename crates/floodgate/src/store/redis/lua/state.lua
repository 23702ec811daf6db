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
-- Whether `holders` holds the hot value (so the key exists, with its TTL): when not, finish()
-- writing it creates the key, which then needs its TTL; and an older release's `hot` key, read
-- instead, is deleted once its value is moved.
local hot_in_holders, hot_key_old = false, false
-- Whether the limiter exists: `meta` (its spec) is there. State found without it is a vanished
-- incarnation's (keys that outlived `meta`), never this one's.
local exists
do
  local raw = redis.call('HGETALL', K_META)
  exists = raw[1] ~= nil
  for i = 1, #raw, 2 do
    m[raw[i]] = raw[i + 1]
    meta_was[raw[i]] = raw[i + 1]
  end
  local hot = redis.call('HGET', K_HOLD, HOT_FIELD)
  hot_in_holders = hot ~= false
  if not hot then
    -- Where an older release kept it (its own key).
    hot = redis.call('GET', K_HOT)
    hot_key_old = hot ~= false
  end
  if hot and string.byte(hot, 2) == HOT_TAG_BYTE then
    -- Packed (HOT_FMT): the fields after the tag are numbers, -1 for an absent one.
    local v = {struct.unpack(HOT_FMT, hot)}
    m.fast = v[1]
    for i = 2, #HOT do
      if v[i + 1] == -1 then m[HOT[i]] = nil else m[HOT[i]] = v[i + 1] end
    end
  elseif hot then
    -- Text, as an older release wrote it ('' for an absent field): rewritten packed by finish().
    for i, v in ipairs(split(hot)) do m[HOT[i]] = v end
  end
  -- Part of the state lost (one key deleted, evicted or expired while `meta` stayed): read as
  -- empty, its permits would be granted again while their holders still work. So it is made
  -- a whole loss, which every store already handles (revive.rs: re-created learning, holders
  -- re-adopt). Each key whose loss matters, by what says it must be there: `hot` always (it
  -- is written with `meta`); `leases` while permits are held; `queue` while waiters are
  -- queued; a keyed limiter's `kstate` while `kholders` names a held grant (re-adopted
  -- holders have no key, so `kholders` stands for "a grant of a key is held").
  if exists then
    local held, queued = tonumber(m.in_use or '0') > 0, tonumber(m.qlen or '0') > 0
    local lost = not hot
    if not lost and (held or queued) then
      -- One command for all of them: how many of those that must be there are. (KEYS[12] and
      -- KEYS[16], `kstate` and `kholders`, are named only in keyed/drain.lua, after this.)
      local must = {}
      if held then must[#must + 1] = K_LEASE end
      if queued then must[#must + 1] = K_Q end
      local kstate = held and m.keyed == '1' and KEYS[16] ~= nil
      if kstate then must[#must + 1] = KEYS[12] end
      if redis.call('EXISTS', unpack(must)) < #must then
        -- Something is missing. `kstate` alone counts only while `kholders` names a grant.
        lost = not kstate
          or (#must > 1 and redis.call('EXISTS', unpack(must, 1, #must - 1)) < #must - 1)
          or redis.call('EXISTS', KEYS[16]) == 1
      end
    end
    if lost then
      redis.call('DEL', K_META)
      exists = false
    end
  end
  if not exists then m, meta_was, hot_key_old = {}, {}, false end
end

-- Every key has a TTL: set on the key's creation (see `created`) and refreshed for all keys at
-- most hourly (`ttl_at`), so an idle limiter vanishes after `idle_ttl` (or once its rate's debt
-- is over, `keep_for`) and nothing grows.
local refresh = tonumber(m.ttl_at or '0') <= now

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
  if not is_token(token) then return nil end
  local r = redis.call('HMGET', K_HOLD, token, 'l:' .. token)
  local raw = r[1]
  if not raw then return nil end
  local f = split(raw)
  -- `slot`: its member of `leases` (common.lua), itself unless handed another's.
  return {permits = tonumber(f[1]), deadline = tonumber(f[2]), granted_at = tonumber(f[3]),
          key = f[4] or '', label = tail(raw, 4), slot = r[2] or token}
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

-- Every key's TTL (ms), for the spec in force when it is set (common.lua's keep_ms): the debt
-- the rate can run to, or the one it has if more (a burst lowered by a put leaves `tat` as it
-- was). The keyed layer adds its per-key rate's debt.
local function keep_for(key_debt)
  local debt = key_debt or 0
  if rate_limit then debt = math.max(debt, interval() * rate_burst, tat - now) end
  return keep_ms(debt)
end

local function created(...)
  if refresh then return end   -- finish() refreshes every key anyway
  for _, key in ipairs({...}) do redis.call('PEXPIRE', key, keep_for()) end
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
    if idem(key) then remember_paced(key, token, permits, default_lease, ARGV[3]) end
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
  -- `leases` is empty (so gone) with no holder. (Not `holders`, which holds `hot` so is
  -- never gone: its TTL must stay `meta`'s, or it outlives `meta`.)
  if in_use == 0 then created(K_LEASE) end
  in_use = in_use + permits
  return g
end

-- Removes holder `token` (record `h`) and its waiter's entry. `expired`: its grant's outcome,
-- if it came from the queue, moves to `outcomes` (kept OUTCOME_RETENTION), for a waiter that
-- never saw it.
local function drop_holder(token, h, expired)
  local gone = {token}
  if h.key ~= '' then
    if expired then
      local o = redis.call('HGET', K_HOLD, 'k:' .. h.key)
      if o and string.sub(o, 1, 2) == 'G|' then wake(h.key, nil, o, false) end
    end
    gone[2], gone[3] = 'k:' .. h.key, 'a:' .. h.key
  end
  if h.slot ~= token then
    gone[#gone + 1], gone[#gone + 2] = 'l:' .. token, 's:' .. h.slot
  end
  redis.call('HDEL', K_HOLD, unpack(gone))
  redis.call('ZREM', K_LEASE, h.slot)
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
    -- No release yet, so no typical hold: a guess per round, no later than the nearest lease
    -- end (as the core's retry_hint).
    est = NO_HISTORY_ROUND * rounds
    local d = nearest_lease()
    if d then est = math.min(est, math.max(0, d - now)) end
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

-- A lease that ran out: its grant ends (expired); an entry whose record is gone is dropped.
-- Shared by the plain and the keyed advance.
local function lapse(slot)
  -- The member of `leases` is a slot: its holder is `s:SLOT`, or the slot itself.
  local token = redis.call('HGET', K_HOLD, 's:' .. slot) or slot
  local h = parse_holder(token)
  if h and h.slot == slot then
    drop_holder(token, h, true)
    in_use = math.max(0, in_use - h.permits)
    c.expired = c.expired + 1
  else
    redis.call('ZREM', K_LEASE, slot)
  end
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
      lapse(lm)
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
    if wk[2] and wk[2] == local_ch then
      -- A waiter of the releasing store: answered in the reply, before its last field.
      reply[#reply + 1], reply[#reply + 2] = wk[1], wk[3]
    elseif wk[2] then
      redis.call('PUBLISH', wk[2], name .. '\n' .. wk[1] .. '\n' .. wk[3])
    end
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
  -- A keyed limiter's operations all take the general path of the keyed script (lua/keyed/).
  if m.keyed == '1' then fast = '0' end
  local ttl_at = refresh and now + TTL_REFRESH or tonumber(m.ttl_at)
  local function absent(v) if v == nil then return -1 end return v end
  redis.call('HSET', K_HOLD, HOT_FIELD, struct.pack(HOT_FMT, fast, HOT_TAG, qlen, in_use, absent(limit),
    next_token, default_lease, absent(permit_cap()), ttl_at, c.granted, c.released, absent(ewma),
    next_seq, queued_permits, due, max_wait, max_queue, heavy, tat,
    rate_limit and interval() or -1, absent(rate_burst), c.paced, c.timed_out, max_dl))
  if not hot_in_holders then
    created(K_HOLD)
    hot_in_holders = true
  end
  if hot_key_old then
    redis.call('DEL', K_HOT)
    hot_key_old = false
  end
  if refresh then
    local keep = keep_for()
    -- `meta` (KEYS[1]) last: each PEXPIRE reads the clock anew, so no key outlives it.
    for i = 9, 1, -1 do redis.call('PEXPIRE', KEYS[i], keep) end
  end
  local next = due
  local rd = head_rate_at()
  if rd and rd < next then next = rd end
  if next >= NONE then next = -1 else next = math.max(0, next - now) end
  reply[#reply + 1] = fmt(next)
  return reply
end

-- A repeated idempotent acquire whose first attempt was granted (`entry` of kind 'G|' or
-- 'I|' in the holders hash), asking for the same `permits`: the same grant again, with what is left of its lease (the record
-- keeps no lease length); nil when that grant has ended (a new acquire follows). Shared by the
-- plain and the keyed acquire.
-- A repeat asking for other permits than its first attempt did (`first`): refused, naming
-- request_id, and what the key names goes on as it was (LimiterCore::mismatch).
local function mismatch(first)
  c.rejected = c.rejected + 1
  return finish({'invalid', 'request_id', 'already names an acquire of ' .. fmt(first) ..
    ' permit(s); a retry must ask for the same permits (a new acquire needs a new request_id)'})
end

-- A keyed repeat naming another key than its first attempt (LimiterCore::key_mismatch).
local function key_mismatch()
  c.rejected = c.rejected + 1
  return finish({'invalid', 'request_id', 'already names an acquire of another key; a retry ' ..
    'must name the same key (a new acquire needs a new request_id)'})
end

-- `owner_of` (keyed only): the key a token's grant belongs to, checked against `tkey`.
local function repeat_granted(entry, kind, key, attempt, permits, owner_of, tkey)
  local token = kind == 'I|' and string.sub(entry, 3) or split(entry)[2]
  local h = parse_holder(token)
  if not h then return nil end
  if h.permits ~= permits then return mismatch(h.permits) end
  if owner_of and owner_of(token) ~= tkey then return key_mismatch() end
  redis.call('HSET', K_HOLD, 'a:' .. key, attempt)
  return finish({'granted', token, fmt(h.permits), fmt(math.max(MIN_LEASE, h.deadline - now)),
    fmt(h.deadline), fmt(h.granted_at), '0'})
end

-- A repeated idempotent acquire of a paced grant still remembered (`p:KEY`, see
-- remember_paced): the same grant again, not counted again (LimiterCore::repeat_of_paced); nil
-- when none is (a new acquire follows). `tkey` (keyed only): the key it must name. Forgotten
-- once the limiter has a concurrency limit (a put gave it one): the grant holds no permit.
local function repeat_paced(key, permits, tkey)
  if concurrency then return nil end
  local p = redis.call('HGET', K_OUT, 'p:' .. key)
  if not p then return nil end
  local f = split(p)
  if tonumber(f[4]) <= now then return nil end
  if tonumber(f[2]) ~= permits then return mismatch(tonumber(f[2])) end
  if tkey and tail(p, 4) ~= tkey then return key_mismatch() end
  return finish({'granted', f[1], f[2], '0', f[3], f[3], '0'})
end

-- An acquire's lease and wait from its arguments ('' for the limiter's defaults; a wait is
-- capped at max_wait): lease, wait; or nil and the refusal to answer. Shared by the plain and
-- the keyed acquire.
local function acquire_terms(lease_arg, wait_arg)
  local lease = default_lease
  if lease_arg ~= '' then lease = tonumber(lease_arg) end
  local bad = check_lease(lease)
  if bad then
    c.rejected = c.rejected + 1
    return nil, finish({'invalid', 'lease_ms', bad})
  end
  local wait = max_wait
  if wait_arg ~= '' then wait = math.min(tonumber(wait_arg), max_wait) end
  return lease, wait
end


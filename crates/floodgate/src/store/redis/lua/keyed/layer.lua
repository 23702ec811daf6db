-- The keyed layer's state and rules (core/keyed/sched.rs and ops.rs, in Lua). The plain
-- helpers that touch waiters and holders are replaced here (they are locals of this chunk, so
-- the plain operations included after this file call the keyed ones): parse_waiter,
-- remove_waiter, permits_ahead, retry_hint, grant_waiters, refuse_impossible, drop_holder,
-- advance, head_rate_at (the next time event, for the store's timer), status_fields, finish. Key state is read once per operation into `KD.cache` and written back by finish().

-- Per-key spec (meta fields written by a keyed put): the per-key concurrency, the key cap,
-- the total concurrency as configured ('' none: the total then runs at MAX_CONCURRENCY, or,
-- rate-only (no per-key concurrency; a total rate, or per-key rates alone and then no total
-- rate either), with no concurrency: paced grants).
-- `rate`: the per-key rate ({limit, period, burst, t: its emission interval}) or nil; `held`:
-- when the total's rate lets the key whose turn it is run, while only that holds it.
local KD = {cache = {}, dirty = {}, touched = {}, conc = opt(m.k_conc),
            max = tonumber(m.k_max or '0'), gen = tonumber(m.k_gen or '0'),
            tmk = tonumber(m.k_tmk or '0'), created = tonumber(m.k_created or '0'),
            held = opt(m.k_held)}
local K_SLEEP, K_IDLE = KEYS[18], KEYS[19]
-- `kheads` (drain.lua's key 20), in KD: the main chunk is near Lua's limit of 200 locals.
KD.K_HEADS = KEYS[20]

-- The per-key rate from its meta field 'limit|period_us|burst' ('' none).
local function parse_rate(raw)
  if not raw or raw == '' then return nil end
  local f = split(raw)
  local r = {limit = tonumber(f[1]), period = tonumber(f[2]), burst = tonumber(f[3])}
  r.t = math.max(1, math.ceil(r.period / r.limit))
  return r
end
KD.rate = parse_rate(m.k_rate)

-- Keys kept while a per-key rate's debt (in `kstate`) could run too (state.lua's keep_for):
-- a key's `tat` runs at most its interval x burst ahead. (Reassigned, so created() and the
-- plain finish use it as well.)
KD.plain_keep_for = keep_for
keep_for = function()
  local r = KD.rate
  local debt = r and r.t * r.burst or 0
  -- A key's debt from before its rate was lowered (keyed/put.lua's apply_put records it).
  local till = tonumber(m.k_debt or '')
  if till and till - now > debt then debt = till - now end
  return KD.plain_keep_for(debt)
end

-- When the key's rate allows `permits` tokens (sched.rs gcra_at); nil without a rate.
local function key_rate_at(k, permits)
  local r = KD.rate
  if not r then return nil end
  return math.max(0, k.tat + r.t * permits - r.t * r.burst)
end

-- A key written by this operation gets its TTL in finish() (it may have been created).
local function ktouch(key) KD.touched[key] = true end

local function bool(b) return b and '1' or '0' end

-- A key's state (nil if it has none), read once per operation.
local function kget(tkey)
  local k = KD.cache[tkey]
  if k ~= nil then return k or nil end
  local raw = redis.call('HGET', K_KS, tkey)
  if not raw then
    KD.cache[tkey] = false
    return nil
  end
  local f = split(raw)
  k = {gen = tonumber(f[1]), in_use = tonumber(f[2]), holders = tonumber(f[3]),
       qlen = tonumber(f[4]), qperm = tonumber(f[5]), deficit = tonumber(f[6]),
       turn = f[7] == '1', in_ring = f[8] == '1', limit = opt(f[9]), weight = tonumber(f[10]),
       load = tonumber(f[11]), tat = tonumber(f[12] or '0'), sleeping = opt(f[13]),
       idle_armed = f[14] == '1', res = f[15] ~= '' and f[15] or nil}
  KD.cache[tkey] = k
  return k
end

local function kdirty(tkey) KD.dirty[tkey] = true end

-- The concurrency limit and weight in force for a key: its override, else the defaults.
local function limits_for(tkey)
  local ov = redis.call('HGET', K_KO, tkey)
  if ov then
    local f = split(ov)
    return opt(f[1]) or KD.conc, tonumber(f[2])
  end
  return KD.conc, 1
end

local function new_key(tkey)
  local limit_, weight = limits_for(tkey)
  local k = {gen = KD.gen, in_use = 0, holders = 0, qlen = 0, qperm = 0, deficit = 0,
             turn = false, in_ring = false, limit = limit_, weight = weight, load = 0, tat = 0,
             sleeping = nil, idle_armed = false}
  KD.gen = KD.gen + 1
  KD.created = KD.created + 1
  KD.cache[tkey] = k
  kdirty(tkey)
  return k
end

-- Writes back the keys this operation changed; a dropped key's state is deleted.
local function kflush()
  for tkey in pairs(KD.dirty) do
    local k = KD.cache[tkey]
    if k then
      redis.call('HSET', K_KS, tkey, table.concat({fmt(k.gen), fmt(k.in_use), fmt(k.holders),
        fmt(k.qlen), fmt(k.qperm), fmt(k.deficit), bool(k.turn), bool(k.in_ring), ofmt(k.limit),
        fmt(k.weight), fmt(k.load), fmt(k.tat), ofmt(k.sleeping), bool(k.idle_armed),
        k.res or ''}, '|'))
      ktouch(K_KS)
    else
      redis.call('HDEL', K_KS, tkey)
    end
  end
  KD.dirty = {}
end

local function kq_member(tkey, seq, mem)
  return tkey .. SEP .. string.format('%016d', seq) .. SEP .. mem
end

-- A waiter parsed from its `kqueue` member.
local function parse_kq(kmem)
  local s = string.find(kmem, SEP, 1, true)
  local w = parse_member(string.sub(kmem, s + 18), tonumber(string.sub(kmem, s + 1, s + 16)))
  w.tkey = string.sub(kmem, 1, s - 1)
  return w
end

-- A key's head waiter (nil if none): the first member of its range.
local function key_head(tkey)
  local r = redis.call('ZRANGEBYLEX', K_KQ, '[' .. tkey .. SEP, '(' .. tkey .. '\2', 'LIMIT', 0, 1)
  if not r[1] then return nil end
  return parse_kq(r[1])
end

-- Records that key `tkey`'s head may have changed (a waiter queued into an empty key, or its
-- head taken out): `kheads` scores the key by its head's arrival, or drops it without waiters
-- (core/keyed/oldest.rs head_moved). O(log n).
function KD.head_moved(tkey)
  local h = key_head(tkey)
  if h then
    redis.call('ZADD', KD.K_HEADS, fmt(h.enqueued_at), tkey)
    ktouch(KD.K_HEADS)
  else
    redis.call('ZREM', KD.K_HEADS, tkey)
  end
end

-- Whether `permits` more fit the key's own limits as of `as_of` (default now; sched.rs
-- admits): true, or false and the moment its rate allows them (nil: its concurrency limit is
-- reached).
local function admits(k, permits, as_of)
  if k.limit and k.in_use + permits > k.limit then return false, nil end
  local at = key_rate_at(k, permits)
  if at and at > (as_of or now) then return false, at end
  return true
end

-- Arms the wake-up of a key held back by its own rate until `at`. One entry per arming, as
-- the core's heap: an entry that no longer matches the key's `sleeping` is skipped when its
-- time comes, but its time is still an event (the core grants after every event).
local function sleep_key(tkey, k, at)
  if not k.sleeping or k.sleeping > at then
    k.sleeping = at
    kdirty(tkey)
    -- (The generation zero-padded: keys woken at one moment join the ring in the core's
    -- order, by generation, then key.)
    redis.call('ZADD', K_SLEEP, fmt(at), string.format('%016d', k.gen) .. SEP .. fmt(at) .. SEP .. tkey)
    ktouch(K_SLEEP)
  end
end

-- Puts a key that is not in the ring there if its head can run, or arms its rate wake-up
-- (sched.rs wake_key).
local function wake_key(tkey)
  local k = kget(tkey)
  if not k or k.in_ring or k.qlen == 0 then return end
  local head = key_head(tkey)
  if not head then return end
  local ok, at = admits(k, head.permits)
  if ok then
    k.in_ring = true
    kdirty(tkey)
    redis.call('RPUSH', K_RING, fmt(k.gen) .. SEP .. tkey)
    ktouch(K_RING)
  elseif at then
    sleep_key(tkey, k, at)
  end
end

-- Keeps the busiest-keys index in step with a key's holders and waiters.
local function reindex(tkey, k)
  local load = k.holders + k.qlen
  if load == k.load then return end
  if load > 0 then
    redis.call('ZADD', K_BUSY, fmt(load), tkey)
    ktouch(K_BUSY)
  else
    redis.call('ZREM', K_BUSY, tkey)
  end
  k.load = load
  kdirty(tkey)
end

-- A key's latest schedule reservation (core/keyed/reserve.rs), field 15 of its state:
-- 'id,at,count,last_start,total rate,total tat before,total tat after,key rate,key tat
-- before,key tat after' (a rate as 'limit/period_us/burst'; a rate's three fields are empty
-- when it has none). `kholders` maps 'r:ID' to the key, so an unschedule needs only the id.
-- (One table, not locals: the script's main chunk is near Lua's limit of 200 locals.)
local KR = {}

function KR.parse(raw)
  if not raw then return nil end
  local f = split(raw, ',')
  return {id = f[1], at = tonumber(f[2]), count = tonumber(f[3]), last = tonumber(f[4]),
          trate = f[5], tbefore = opt(f[6]), tend = opt(f[7]),
          krate = f[8], kbefore = opt(f[9]), kend = opt(f[10])}
end

function KR.format(r)
  return table.concat({r.id, fmt(r.at), fmt(r.count), fmt(r.last), r.trate, ofmt(r.tbefore),
    ofmt(r.tend), r.krate, ofmt(r.kbefore), ofmt(r.kend)}, ',')
end

-- Forgets key `tkey`'s reservation (the key is dropped, or the reservation is used up).
function KR.forget(tkey, k)
  local r = KR.parse(k.res)
  if not r then return end
  redis.call('HDEL', K_KH, 'r:' .. r.id)
  k.res = nil
  kdirty(tkey)
end

-- The total's rate and the per-key rate as a reservation records them ('' none): a changed
-- rate means nothing goes back.
function KR.total_rate()
  if not rate_limit then return '' end
  return fmt(rate_limit) .. '/' .. fmt(rate_period) .. '/' .. fmt(rate_burst)
end

function KR.key_rate()
  local r = KD.rate
  if not r then return '' end
  return fmt(r.limit) .. '/' .. fmt(r.period) .. '/' .. fmt(r.burst)
end

-- Records the reservation kschedule just made for key `tkey` (replacing its previous one):
-- the rates' `tat` before it, and after it (as they are now).
function KR.remember(tkey, k, id, tbefore, kbefore, count, last)
  local old = KR.parse(k.res)
  if old then redis.call('HDEL', K_KH, 'r:' .. old.id) end
  local trate, krate = KR.total_rate(), KR.key_rate()
  local r = {id = id, at = now, count = count, last = last, trate = trate, krate = krate}
  if trate ~= '' then r.tbefore, r.tend = tbefore, tat end
  if krate ~= '' then r.kbefore, r.kend = kbefore, k.tat end
  k.res = KR.format(r)
  kdirty(tkey)
  redis.call('HSET', K_KH, 'r:' .. id, tkey)
  ktouch(K_KH)
end

-- One token of reservation `r` again, as kschedule took it, from the total's `tat` `wt` and
-- the key's `wk` (nil: no such rate): its start and both `tat`s after it.
function KR.step(r, wt, wk)
  local at = r.at
  if wt then
    local t = interval()
    local a = math.max(0, wt + t - t * rate_burst)
    if a > at then at = a end
  end
  local kr = KD.rate
  if wk then
    local a = math.max(0, wk + kr.t - kr.t * kr.burst)
    if a > at then at = a end
  end
  local nt = wt and (math.max(wt, at) + interval())
  local nk = wk and (math.max(wk, at) + kr.t)
  return at, nt, nk
end

-- Drops a key's state once it holds nothing, waits for nothing, owes no rate and has no
-- reservation left to give back; a key whose only state is rate debt or a reservation is
-- looked at again when they end.
local function maybe_drop(tkey)
  local k = kget(tkey)
  if not k or k.holders > 0 or k.qlen > 0 then return end
  local r = KR.parse(k.res)
  local until_ = k.tat
  if r and r.last > until_ then until_ = r.last end
  if until_ > now then
    if not k.idle_armed then
      k.idle_armed = true
      kdirty(tkey)
      redis.call('ZADD', K_IDLE, fmt(until_), string.format('%016d', k.gen) .. SEP .. tkey)
      ktouch(K_IDLE)
    end
    return
  end
  KR.forget(tkey, k)
  if k.load > 0 then redis.call('ZREM', K_BUSY, tkey) end
  KD.cache[tkey] = false
  kdirty(tkey)
end

parse_waiter = function(key)
  local raw = redis.call('HGET', K_HOLD, 'k:' .. key)
  if not raw or string.sub(raw, 1, 2) ~= 'W|' then return nil end
  local at = string.find(raw, '|', 3, true)
  local seq = tonumber(string.sub(raw, 3, at - 1))
  local rest = string.sub(raw, at + 1)
  local s = string.find(rest, SEP, 1, true)
  local w = parse_member(string.sub(rest, s + 1), seq)
  w.tkey = string.sub(rest, 1, s - 1)
  return w
end

-- Takes a waiter out of its key's queue; `granted`: its grant follows (the caller does the
-- key's bookkeeping), otherwise it gave up, timed out or was refused, and its key's next
-- waiter may run.
remove_waiter = function(w, granted)
  -- (A granted waiter is its key's head; another one may not be.)
  local head = not granted and key_head(w.tkey)
  local was_head = head and head.seq == w.seq
  -- A waiter already taken out is not taken out again (false): refuse_impossible's list is
  -- made before it removes anyone, and a removal grants, which may apply a keyed put
  -- (apply_put) that refuses the same waiters first; counting one twice left its key with -1
  -- waiters (never put in the round robin again) and waiting_permits negative (h-krev16).
  if redis.call('ZREM', K_KQ, kq_member(w.tkey, w.seq, w.member)) == 0 then return false end
  redis.call('ZREM', K_WAITS, wait_member(w.seq, w.key))
  -- (A granted waiter was its key's head.)
  if granted or was_head then KD.head_moved(w.tkey) end
  if not granted then redis.call('HDEL', K_HOLD, 'k:' .. w.key, 'a:' .. w.key) end
  queued_permits = queued_permits - w.permits
  local k = kget(w.tkey)
  if not k then return true end
  k.qlen = k.qlen - 1
  k.qperm = k.qperm - w.permits
  kdirty(w.tkey)
  if not granted then
    reindex(w.tkey, k)
    if was_head then
      -- Its key's next waiter may run now (the core's dequeue grants before anything else).
      wake_key(w.tkey)
      -- (A time-out in advance() grants after it, as of its deadline.)
      if not KD.defer_grant then grant_waiters() end
    elseif op == 'cancel' then
      -- Nothing can run that could not before: the plain cancel's grant after it is skipped,
      -- as the core's cancel grants only when a head leaves.
      KD.skip_grant = true
    end
    maybe_drop(w.tkey)
  end
  return true
end

-- The retry hint's backlog: the permits still queued for the waiter's key once it has left
-- (and whatever its leaving granted), plus its own, as the core's hint. The plain operations
-- ask for it before taking the waiter out and use it after, so it is counted when used.
permits_ahead = function(w)
  KD.hint_w = w
  return w.permits
end
local plain_retry_hint = retry_hint
-- When to try again, for `permits` more of key `tkey`: the total's hint for the key's backlog,
-- or the key's rate, if later (ops.rs hint).
local function khint(tkey, permits)
  local k = kget(tkey)
  local hint = plain_retry_hint((k and k.qperm or 0) + permits)
  local at = k and key_rate_at(k, permits)
  if at and at - now > hint then hint = at - now end
  return hint
end
retry_hint = function(ahead)
  local w = KD.hint_w
  if w then
    KD.hint_w = nil
    return khint(w.tkey, w.permits)
  end
  return plain_retry_hint(ahead)
end

-- A grant to key `tkey` (state `k`): the total's grant, plus the key's share.
local function kgrant(tkey, k, permits, lease, enqueued_at, key, label, queued)
  local g = grant(permits, lease, enqueued_at, key, label, queued)
  if not concurrency then
    -- Rate only (no concurrency limit anywhere): a paced grant holds nothing; the key keeps
    -- only its rate debt, and may go (sched.rs grant_to).
    if KD.rate then k.tat = math.max(k.tat, now) + KD.rate.t * permits end
    -- Its remembered request id (grant's remember_paced) names its key too.
    if idem(key) then
      local f = 'p:' .. key
      redis.call('HSET', K_OUT, f, redis.call('HGET', K_OUT, f) .. '|' .. tkey)
    end
    kdirty(tkey)
    reindex(tkey, k)
    maybe_drop(tkey)
    return g
  end
  redis.call('HSET', K_KH, g[1], tkey)
  ktouch(K_KH)
  k.in_use = k.in_use + permits
  k.holders = k.holders + 1
  if KD.rate then k.tat = math.max(k.tat, now) + KD.rate.t * permits end
  kdirty(tkey)
  reindex(tkey, k)
  return g
end

-- A keyed put's changes (see keyed/put.lua), applied before its grants.
local apply_put

-- Grants waiters while the total has room, the keys taking turns by weight (deficit round
-- robin, sched.rs grant_waiters). Afterwards no waiter can be granted until something changes.
grant_waiters = function()
  if KD.skip_grant then
    KD.skip_grant = nil
    return
  end
  if KD.put then apply_put() end
  KD.held = nil
  if learning_until then return end
  -- Who may run is judged as of the event being applied (advance() sets it when applying one
  -- late), so a waiter whose own deadline came first is not granted late (sched.rs
  -- grant_waiters_as_of); grants are still made now.
  local judge = KD.as_of or now
  if KD.lapse_at then
    -- Leases ending at the same moment all end before anyone is granted, as in the core
    -- (which frees them together): the plain advance grants after each one.
    local at = KD.lapse_at
    KD.lapse_at = nil
    local l = redis.call('ZRANGE', K_LEASE, 0, 0, 'WITHSCORES')
    if l[2] and tonumber(l[2]) == at then return end
  end
  -- Turns ended without a grant since the last grant (sched.rs idle_turns).
  local idle = 0
  while true do
    local front = redis.call('LINDEX', K_RING, 0)
    if not front then return end
    local s = string.find(front, SEP, 1, true)
    local gen, tkey = tonumber(string.sub(front, 1, s - 1)), string.sub(front, s + 1)
    local k = kget(tkey)
    if not k or k.gen ~= gen then
      redis.call('LPOP', K_RING)
    else
      local head = k.qlen > 0 and key_head(tkey) or nil
      local ok, at = false, nil
      if head then ok, at = admits(k, head.permits, judge) end
      if not ok then
        -- Left the ring: emptied, or held back by its own limit (its rate: until `at`).
        redis.call('LPOP', K_RING)
        k.in_ring, k.turn, k.deficit = false, false, 0
        kdirty(tkey)
        if at then sleep_key(tkey, k, at) end
      else
        if not k.turn then
          k.turn = true
          k.deficit = k.deficit + k.weight
          kdirty(tkey)
        end
        if head.permits > k.deficit then
          -- Its turn is over; the deficit carries to the next round.
          k.turn = false
          kdirty(tkey)
          redis.call('LMOVE', K_RING, K_RING, 'LEFT', 'RIGHT')
          idle = idle + 1
          if idle >= redis.call('LLEN', K_RING) then
            -- Every key in the ring has just ended a turn short of its head: the rounds before
            -- the first head fits would grant nothing, so each key is credited their weight at
            -- once (sched.rs skip_idle_rounds): one visit of the ring, not one turn per permit
            -- a head lacks, inside a script that blocks Redis.
            local live, rounds = {}, nil
            for _, entry in ipairs(redis.call('LRANGE', K_RING, 0, -1)) do
              local at_sep = string.find(entry, SEP, 1, true)
              local rkey = string.sub(entry, at_sep + 1)
              local rk = kget(rkey)
              local rhead = rk and rk.gen == tonumber(string.sub(entry, 1, at_sep - 1))
                and rk.qlen > 0 and key_head(rkey) or nil
              if rhead and admits(rk, rhead.permits, judge) then
                local w = math.max(rk.weight, 1)
                local need = math.ceil(math.max(rhead.permits - rk.deficit, 1) / w)
                if not rounds or need < rounds then rounds = need end
                live[#live + 1] = {rkey, rk, w}
              end
            end
            -- (The round in which the first head fits is played as usual.)
            if rounds and rounds > 1 then
              for _, e in ipairs(live) do
                e[2].deficit = e[2].deficit + (rounds - 1) * e[3]
                kdirty(e[1])
              end
            end
            idle = 0
          end
        elseif not fits(head.permits) then
          -- The total holds back the key whose turn it is (and so everyone).
          return
        elseif (rate_at(head.permits) or 0) > judge then
          -- So does the total's rate, until its token time.
          KD.held = rate_at(head.permits)
          return
        else
          remove_waiter(head, true)
          -- A paced grant (rate only) is held by nobody: its outcome is kept in `outcomes`,
          -- as a plain rate-only limiter's, and its waiter's entries go now.
          if not concurrency then redis.call('HDEL', K_HOLD, 'k:' .. head.key, 'a:' .. head.key) end
          k.deficit = k.deficit - head.permits
          local g = kgrant(tkey, k, head.permits, head.lease, head.enqueued_at, head.key,
            head.label, true)
          wake(head.key, head.channel, 'G|' .. table.concat(g, '|'), concurrency ~= nil)
          idle = 0
        end
      end
    end
  end
end

-- Refuses waiters asking for more than their key or the total can ever grant now (after a
-- limit went down). Visits every waiter, as the core does; only limit changes run it.
refuse_impossible = function()
  -- A keyed put's per-key changes first: the plain put refuses before its first grant (which
  -- is where they were applied), so its refusals judged, and its woken keys slept, by the old
  -- per-key limits and rate, unlike the core's reconfigure (h-krev16, keyed_twin).
  if KD.put then apply_put() end
  local total_cap = permit_cap()
  local doomed = {}
  for _, kmem in ipairs(redis.call('ZRANGE', K_KQ, 0, -1)) do
    local w = parse_kq(kmem)
    local k = kget(w.tkey)
    local cap = total_cap
    if k and k.limit and (not cap or k.limit < cap) then cap = k.limit end
    if KD.rate and (not cap or KD.rate.burst < cap) then cap = KD.rate.burst end
    if cap and w.permits > cap then doomed[#doomed + 1] = {w, cap} end
  end
  -- By arrival (seq), not by key name as `kqueue` lists them: a refusal may ready its key's
  -- next waiter (joining the ring), in the core's order (ops.rs refuse_impossible sorts by
  -- waiter id), so both stores grant the same waiters next (h-krev16).
  table.sort(doomed, function(x, y) return x[1].seq < y[1].seq end)
  for _, d in ipairs(doomed) do
    local w, cap = d[1], d[2]
    -- (Unless a grant made by an earlier removal already refused it.)
    if remove_waiter(w) then
      c.rejected = c.rejected + 1
      wake(w.key, w.channel, 'X|' .. fmt(w.permits) .. '|' .. fmt(cap), false)
    end
  end
end

-- A grant ended (released or lapsed): its key's share is freed too.
local plain_drop_holder = drop_holder
drop_holder = function(token, h, expired)
  plain_drop_holder(token, h, expired)
  if expired then KD.lapse_at = h.deadline end
  local tkey = redis.call('HGET', K_KH, token)
  if not tkey then return end
  redis.call('HDEL', K_KH, token)
  local k = kget(tkey)
  if not k then return end
  k.in_use = math.max(0, k.in_use - h.permits)
  k.holders = math.max(0, k.holders - 1)
  kdirty(tkey)
  reindex(tkey, k)
  wake_key(tkey)
  maybe_drop(tkey)
end

-- The status as a plain limiter's: the waiters of every key; no concurrency limit when only
-- the keys have one.
local plain_status_fields = status_fields
status_fields = function()
  local out = plain_status_fields()
  local none = (m.k_user or '') == ''
  for i, f in ipairs(STATUS) do
    if f == 'waiting' then out[i] = fmt(redis.call('ZCARD', K_KQ)) end
    if none and (f == 'concurrency' or f == 'limit') then out[i] = '' end
  end
  return out
end

-- Applies the passage of time up to now: lease lapses, wait deadlines, per-key rate token
-- times, ends of rate debt and the total's token time, in time order (a lapse first, then a
-- rate wake-up, an idle key, a wait), granting what each frees (ops.rs advance).
advance = function()
  while true do
    local l = redis.call('ZRANGE', K_LEASE, 0, 0, 'WITHSCORES')
    local lease = l[2] and tonumber(l[2])
    local wat, wkey, wmem = first_wait()
    local sl = redis.call('ZRANGE', K_SLEEP, 0, 0, 'WITHSCORES')
    local sleep = sl[2] and tonumber(sl[2])
    local il = redis.call('ZRANGE', K_IDLE, 0, 0, 'WITHSCORES')
    local idle = il[2] and tonumber(il[2])
    local at = nil
    for _, t in ipairs({learning_until or NONE, lease or NONE, sleep or NONE, idle or NONE,
                        KD.held or NONE, wat or NONE}) do
      if not at or t < at then at = t end
    end
    if at > now then return end
    if learning_until == at then
      -- The learning window after a loss ends (revive.lua): the keys' queues are served.
      learning_until = nil
    elseif lease == at then
      -- Every lease ending then lapses before anyone is granted.
      local due = redis.call('ZRANGEBYSCORE', K_LEASE, '-inf', fmt(at))
      for _, token in ipairs(due) do
        -- (Its outcome, if it came from the queue, is kept for a waiter that never saw it.)
        lapse(token)
      end
    elseif sleep == at then
      for _, mem in ipairs(redis.call('ZRANGEBYSCORE', K_SLEEP, '-inf', fmt(at))) do
        redis.call('ZREM', K_SLEEP, mem)
        local s = string.find(mem, SEP, 1, true)
        local s2 = string.find(mem, SEP, s + 1, true)
        local gen, tkey = tonumber(string.sub(mem, 1, s - 1)), string.sub(mem, s2 + 1)
        local k = kget(tkey)
        if k and k.gen == gen and k.sleeping == at then
          k.sleeping = nil
          kdirty(tkey)
          wake_key(tkey)
        end
      end
    elseif idle == at then
      redis.call('ZREM', K_IDLE, il[1])
      local s = string.find(il[1], SEP, 1, true)
      local gen, tkey = tonumber(string.sub(il[1], 1, s - 1)), string.sub(il[1], s + 1)
      local k = kget(tkey)
      if k and k.gen == gen then
        k.idle_armed = false
        kdirty(tkey)
        maybe_drop(tkey)
      end
    elseif wat == at then
      local wt = parse_waiter(wkey)
      if wt then
        local ahead = permits_ahead(wt)
        KD.defer_grant = true
        remove_waiter(wt)
        KD.defer_grant = nil
        c.timed_out = c.timed_out + 1
        wake(wt.key, wt.channel, 'T|' .. fmt(retry_hint(ahead)), false)
      elseif wmem then
        redis.call('ZREM', K_WAITS, wmem)
      end
    end
    KD.as_of = at
    grant_waiters()
    KD.as_of = nil
  end
end

-- The next moment the keyed layer's own time events need looking at, for the store's timer.
head_rate_at = function()
  local t = KD.held
  for _, key in ipairs({K_SLEEP, K_IDLE}) do
    local r = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
    if r[2] and (not t or tonumber(r[2]) < t) then t = tonumber(r[2]) end
  end
  return t
end

local plain_finish = finish
finish = function(reply)
  kflush()
  local fields = {k_gen = fmt(KD.gen), k_tmk = fmt(KD.tmk), k_created = fmt(KD.created),
                  k_held = ofmt(KD.held)}
  local changed = {}
  for f, v in pairs(fields) do
    if m[f] ~= v and m.keyed == '1' then
      changed[#changed + 1] = f
      changed[#changed + 1] = v
    end
  end
  if #changed > 0 then redis.call('HSET', K_META, unpack(changed)) end
  local keep = keep_for()
  if refresh then
    for i = 12, 20 do redis.call('PEXPIRE', KEYS[i], keep) end
  else
    for key in pairs(KD.touched) do redis.call('PEXPIRE', key, keep) end
  end
  KD.touched = {}
  return plain_finish(reply)
end


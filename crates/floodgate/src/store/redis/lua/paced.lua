-- The rate-only fast path, first: an acquire of a rate-only limiter granted at once, or refused
-- when it cannot wait, answered before the helpers the other paths need are made
-- (helpers.lua, fast.lua's own: each closure a script makes costs every call that runs past it,
-- and this path makes none of them). Its replies carry numbers, not formatted strings. What it
-- does not answer (a repeat, a wait, a queue, a lease due, a concurrency limiter...) goes on to
-- fast.lua or the general path, with an acquire's `hot` read here once for both.
-- The same rules as LimiterCore's rate_at/take_rate, checked against the core by tests/twin.rs.

-- Writes back the hot value (the fields in HOT order after the tag), in the one HSET of
-- `holders` that also writes the first `n` entries of `fields` (the operation's own field/value
-- pairs, or nil), and, when due, refreshes every key's TTL. The fields are parameters, not
-- upvalues: a closure over the fast path's 24 locals costs each call about 0.8 us of Redis time
-- to make (an upvalue object per local). `hot` goes first, so `fields` is passed as it is (no
-- append, which grew the table once per power of two: a reallocation each, and garbage).
local function save_hot(refresh, fields, n, mode, ...)
  local packed = struct.pack(HOT_FMT, mode, HOT_TAG, ...)
  if fields then
    redis.call('HSET', K_HOLD, HOT_FIELD, packed, unpack(fields, 1, n))
  else
    redis.call('HSET', K_HOLD, HOT_FIELD, packed)
  end
  if refresh then
    -- (`tat`, the rate's interval and burst: HOT's 18th to 20th fields; -1 without a rate.)
    local tat, rate_t, rate_burst = select(17, ...)
    local keep = keep_ms(rate_t > 0 and math.max(rate_t * rate_burst, tat - now) or 0)
    -- `meta` (KEYS[1]) last: each PEXPIRE reads the clock anew, so no key outlives it.
    for i = 9, 1, -1 do redis.call('PEXPIRE', KEYS[i], keep) end
  end
end
-- The delay to report from the fast paths' `due` (a lower bound of the next deadline). A number:
-- Redis sends a Lua number as an integer reply, where each `string.format` of a 16-digit number
-- costs a call about 0.2-0.8 µs (the store reads either as text).
local function delay(due)
  if due >= NONE then return -1 end
  return due - now
end
-- A repeated idempotent acquire (its key already has an entry) takes the general path.
local is_repeat = op == 'acquire' and idem(ARGV[7])
  and (redis.call('HEXISTS', K_HOLD, 'k:' .. ARGV[7]) == 1
    or redis.call('HEXISTS', K_OUT, 'p:' .. ARGV[7]) == 1)

-- `hot` as an acquire read it here (fast.lua reads a release's itself).
local raw_hot
if op == 'acquire' and not general_only and not is_repeat then
  raw_hot = redis.call('HGET', K_HOLD, HOT_FIELD)
  -- Its mode byte first ('r', 114): a concurrency limiter's acquire unpacks `hot` once, in
  -- fast.lua. (A value an older release wrote as text has `|` for its second byte: not this.)
  if raw_hot and string.byte(raw_hot, 1) == 114 and string.byte(raw_hot, 2) == HOT_TAG_BYTE then
    local mode, _, qlen, in_use, limit, next_token, lease_us, cap, ttl_at, c_granted, c_released,
      ewma, next_seq, queued_permits, due, max_wait, max_queue, heavy, tat, rate_t, rate_burst,
      c_paced, c_timed_out, max_dl = struct.unpack(HOT_FMT, raw_hot)
    local permits, lease = tonumber(ARGV[4]), lease_us
    if ARGV[5] ~= '' then lease = tonumber(ARGV[5]) end
    local key = ARGV[7]
    if due > now and qlen == 0 and permits >= 1 and permits <= cap and lease >= MIN_LEASE
      and lease <= MAX_LEASE then
      local refresh = ttl_at <= now
      if refresh then ttl_at = now + TTL_REFRESH end
      -- GCRA (as rate_at/take_rate in state.lua): granted at once, or refused if it cannot wait.
      local t = rate_t
      local ra = math.max(0, tat + t * permits - t * rate_burst)
      if ra <= now then
        local token = math.max(next_token, now)
        next_token = token + 1
        tat = math.max(tat, now) + t * permits
        c_granted, c_paced = c_granted + 1, c_paced + 1
        if idem(key) then remember_paced(key, token, permits, lease_us, ARGV[3]) end
        save_hot(refresh, nil, 0, mode, qlen, in_use, limit, next_token, lease_us, cap, ttl_at, c_granted,
          c_released, ewma, next_seq, queued_permits, due, max_wait, max_queue, heavy, tat, rate_t,
          rate_burst, c_paced, c_timed_out, max_dl)
        -- token, permits, lease (none), deadline and granted_at (now), waited, the delay.
        return {'granted', token, permits, 0, now, now, 0, delay(due)}
      end
      local wait = max_wait
      if ARGV[6] ~= '' then wait = math.min(tonumber(ARGV[6]), wait) end
      if ra - now > wait then
        c_timed_out = c_timed_out + 1
        save_hot(refresh, nil, 0, mode, qlen, in_use, limit, next_token, lease_us, cap, ttl_at, c_granted,
          c_released, ewma, next_seq, queued_permits, due, max_wait, max_queue, heavy, tat, rate_t,
          rate_burst, c_paced, c_timed_out, max_dl)
        return {'timeout', math.max(ra - now, 1000), delay(due)}
      end
      -- It can wait for its turn: the general path queues it.
    end
  end
end

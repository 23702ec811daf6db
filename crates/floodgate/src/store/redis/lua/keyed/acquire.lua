-- kacquire: grant at once, queue in the key's FIFO, or refuse (core/keyed/ops.rs).
-- ARGV: 4-10 as the plain acquire, and last the key (checked by the store: 1 to 256
--       characters, no control character). A plain `acquire` (no key) answers {'no_key'}.
-- Reply: as the plain acquire | {'too_many_keys', max_keys, retry_after} | {'no_key'} (a plain
--        acquire, with no key, of a keyed limiter).

if op == 'acquire' then return {'no_key', '-1'} end
if op == 'kacquire' then
  local permits, lease_arg, wait_arg, key, channel, attempt, tkey =
    tonumber(ARGV[4]), ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[10] or '', ARGV[#ARGV]
  advance()
  prune_outcomes()
  if idem(key) then
    -- The same request again: the grant it got, or its wait to join (as the plain acquire).
    local entry = redis.call('HGET', K_HOLD, 'k:' .. key)
    local kind = entry and string.sub(entry, 1, 2)
    if kind == 'W|' then
      local w = parse_waiter(key)
      if w.permits ~= permits then return mismatch(w.permits) end
      if w.tkey ~= tkey then return key_mismatch() end
      local wait = max_wait
      if wait_arg ~= '' then wait = math.min(tonumber(wait_arg), max_wait) end
      local deadline = now + wait
      if w.channel ~= channel or w.deadline ~= deadline then
        -- Joined: the same place in its key's queue; the wait lasts as long as this caller asks.
        local mem = member(w.key, w.permits, w.lease, deadline, w.enqueued_at, true, channel,
          w.label)
        redis.call('ZREM', K_KQ, kq_member(w.tkey, w.seq, w.member))
        redis.call('ZADD', K_KQ, 0, kq_member(w.tkey, w.seq, mem))
        redis.call('ZADD', K_WAITS, fmt(deadline), wait_member(w.seq, key))
        redis.call('HSET', K_HOLD, 'k:' .. key, 'W|' .. fmt(w.seq) .. '|' .. w.tkey .. SEP .. mem)
      end
      redis.call('HSET', K_HOLD, 'a:' .. key, attempt)
      return finish({'queued', fmt(math.max(1, deadline - now))})
    elseif kind == 'G|' or kind == 'I|' then
      local reply = repeat_granted(entry, kind, key, attempt, permits,
        function(token) return redis.call('HGET', K_KH, token) end, tkey)
      if reply then return reply end
    else
      local reply = repeat_paced(key, permits, tkey)
      if reply then return reply end
    end
  end
  if permits < 1 then
    c.rejected = c.rejected + 1
    return finish({'invalid', 'permits', 'must be at least 1'})
  end
  local k = kget(tkey)
  local key_limit = k and k.limit
  if not k then key_limit = limits_for(tkey) end
  local cap = permit_cap()
  if key_limit and (not cap or key_limit < cap) then cap = key_limit end
  if KD.rate and (not cap or KD.rate.burst < cap) then cap = KD.rate.burst end
  if cap and permits > cap then
    c.rejected = c.rejected + 1
    return finish({'exceeds', fmt(permits), fmt(cap)})
  end
  local lease, wait = acquire_terms(lease_arg, wait_arg)
  if not lease then return wait end
  if not k then
    if redis.call('HLEN', K_KS) >= KD.max then
      KD.tmk = KD.tmk + 1
      return finish({'too_many_keys', fmt(KD.max), fmt(retry_hint(1))})
    end
    k = new_key(tkey)
  end
  -- The common case, without queueing: nobody waits on the total, this key has no waiters,
  -- and everything fits.
  if redis.call('LLEN', K_RING) == 0 and k.qlen == 0 and admits(k, permits) and fits(permits)
    and not learning_until and (rate_at(permits) or 0) <= now then
    local g = kgrant(tkey, k, permits, lease, now, key, ARGV[9], false)
    -- (A paced grant, rate only, is held by nobody: nothing for a retry to find.)
    if idem(key) and concurrency then redis.call('HSET', K_HOLD, 'a:' .. key, attempt) end
    table.insert(g, 1, 'granted')
    return finish(g)
  end
  if redis.call('ZCARD', K_KQ) >= max_queue then
    c.queue_full = c.queue_full + 1
    local hint = khint(tkey, permits)
    maybe_drop(tkey)
    return finish({'queue_full', fmt(hint)})
  end
  local seq = next_seq
  next_seq = next_seq + 1
  local deadline = now + wait
  local mem = member(key, permits, lease, deadline, now, true, channel, ARGV[9])
  redis.call('HSET', K_HOLD, 'k:' .. key, 'W|' .. fmt(seq) .. '|' .. tkey .. SEP .. mem)
  if idem(key) then redis.call('HSET', K_HOLD, 'a:' .. key, attempt) end
  redis.call('ZADD', K_KQ, 0, kq_member(tkey, seq, mem))
  redis.call('ZADD', K_WAITS, fmt(deadline), wait_member(seq, key))
  ktouch(K_KQ)
  ktouch(K_WAITS)
  queued_permits = queued_permits + permits
  local first = k.qlen == 0
  k.qlen = k.qlen + 1
  k.qperm = k.qperm + permits
  kdirty(tkey)
  reindex(tkey, k)
  if first then
    KD.head_moved(tkey)
    -- The head is new: the key may join the ring (or wait for its rate).
    k.sleeping = nil
    wake_key(tkey)
  end
  grant_waiters()
  local last = wakes[#wakes]
  if last and last[1] == key and string.sub(last[3], 1, 2) == 'G|' then
    -- Granted in the same step: answered here, not published.
    wakes[#wakes] = nil
    local g = split(last[3])
    g[1] = 'granted'
    return finish(g)
  end
  -- Below the clock's resolution a wait would end the moment it began: try once.
  if wait < 1 then
    local w = parse_waiter(key)
    local ahead = permits_ahead(w)
    remove_waiter(w)
    c.timed_out = c.timed_out + 1
    return finish({'timeout', fmt(retry_hint(ahead))})
  end
  return finish({'queued', fmt(wait)})
end

-- keys: a keyed limiter's key count and busiest keys.
-- ARGV: 4 most keys listed.
-- Reply: {'keys', count, overrides, too_many_keys, keys_created, per-key concurrency ('' none),
--         max_keys, per-key rate limit, period us, burst ('' none), then per key: key, in_use, holders, waiting, limit ('' none), weight,
--         then when the overrides last changed ('' never: put_key, a revival's kput), so a
--         server re-reads them (kdef) only then, to revive the limiter with them (keyed_revive.rs)}.
if op == 'keys' then
  advance()
  kflush()
  local r = KD.rate
  local out = {'keys', fmt(redis.call('HLEN', K_KS)), fmt(redis.call('HLEN', K_KO)),
               fmt(KD.tmk), fmt(KD.created), ofmt(KD.conc), fmt(KD.max),
               r and fmt(r.limit) or '', r and fmt(r.period) or '', r and fmt(r.burst) or ''}
  local n = tonumber(ARGV[4]) or 0
  if n > 0 then
    for _, tkey in ipairs(redis.call('ZREVRANGE', K_BUSY, 0, n - 1)) do
      local k = kget(tkey)
      if k then
        for _, v in ipairs({tkey, fmt(k.in_use), fmt(k.holders), fmt(k.qlen), ofmt(k.limit),
                            fmt(k.weight)}) do
          out[#out + 1] = v
        end
      end
    end
  end
  out[#out + 1] = m.k_ov_at or ''
  return finish(out)
end

-- put_key: set (or remove) one key's override; applies at once to an active key.
-- ARGV: 4 key, 5 concurrency ('' the default), 6 weight ('' removes the override).
-- Reply: {'ok'} | {'invalid', 'key', message}.
if op == 'put_key' then
  local tkey = ARGV[4]
  advance()
  if ARGV[6] ~= '' then
    if ARGV[5] ~= '' and not concurrency then
      return finish({'invalid', 'concurrency', 'a rate-only keyed limiter holds no permits: an ' ..
        'override may set only its weight'})
    end
    if redis.call('HEXISTS', K_KO, tkey) == 0 and redis.call('HLEN', K_KO) >= KD.max then
      return finish({'invalid', 'key', 'this limiter already has max_keys (' .. fmt(KD.max) ..
        ') overrides'})
    end
    redis.call('HSET', K_KO, tkey, ARGV[5] .. '|' .. ARGV[6])
    ktouch(K_KO)
  else
    redis.call('HDEL', K_KO, tkey)
  end
  -- Servers that read the overrides before read them again (see `keys`).
  redis.call('HSET', K_META, 'k_ov_at', fmt(now))
  local k = kget(tkey)
  if k then
    k.limit, k.weight = limits_for(tkey)
    kdirty(tkey)
    refuse_impossible()
    wake_key(tkey)
    grant_waiters()
  end
  return finish({'ok'})
end


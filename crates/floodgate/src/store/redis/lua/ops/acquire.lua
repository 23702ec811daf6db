-- acquire: grant at once, queue, or refuse (a repeated idempotent acquire: its grant or wait).
-- ARGV: 4 permits, 5 lease us ('' default), 6 wait us ('' max), 7 waiter key, 8 wake channel,
--       9 holder label, 10 attempt id.
-- Reply: {'granted', token, permits, lease, deadline, granted_at, waited} | {'queued', wait} |
--        {'timeout', retry_after} | {'queue_full', retry_after} | {'exceeds', permits, cap} |
--        {'invalid', field, message} | {'unknown'}.
-- A reply made by finish() ends with the delay in us to the next deadline ('-1': none).

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
      if w.permits ~= permits then return mismatch(w.permits) end
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
      local reply = repeat_granted(entry, kind, key, attempt, permits)
      if reply then return reply end
    else
      local reply = repeat_paced(key, permits)
      if reply then return reply end
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
  local lease, wait = acquire_terms(lease_arg, wait_arg)
  if not lease then return wait end
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
  -- (A TTL is set after the write that creates the key; `holders`, which holds `hot`, is never
  -- created here, and keeps `meta`'s TTL.)
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


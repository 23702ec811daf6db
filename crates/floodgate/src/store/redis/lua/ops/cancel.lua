-- cancel: a queued acquire gives up (or its own timer ended, or its caller left for good).
-- ARGV: 4 waiter key, 5 'drop' | 'timeout' | 'abandon', 6 attempt id (abandon).
-- Reply: {'cancelled'} | {'timed_out', retry_after} | {'decided', outcome} | {'kept'} | {'gone'}.
-- A reply made by finish() ends with the delay in us to the next deadline ('-1': none).

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


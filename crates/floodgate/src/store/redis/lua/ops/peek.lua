-- peek: a waiter's outcome, read-only (after a lost subscription).
-- ARGV: 4 waiter key.   Reply: {'decided', outcome} | {'waiting'}.
-- A reply made by finish() ends with the delay in us to the next deadline ('-1': none).

if op == 'peek' then
  -- Read-only: has this waiter's outcome been decided? Used after a lost subscription.
  local entry = redis.call('HGET', K_HOLD, 'k:' .. ARGV[4])
  if entry and string.sub(entry, 1, 2) == 'G|' then return {'decided', entry, '-1'} end
  local outcome = redis.call('HGET', K_OUT, ARGV[4])
  if outcome then return {'decided', outcome, '-1'} end
  return {'waiting', '-1'}
end


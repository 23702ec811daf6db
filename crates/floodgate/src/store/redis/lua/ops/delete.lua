-- delete: the limiter goes; its waiters are answered `D` by `drain`.
-- ARGV: none.   Reply: {'deleted', waiters left to drain}.
-- A reply made by finish() ends with the delay in us to the next deadline ('-1': none).

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


-- (After guard.lua.) A limiter that exists and is not keyed is the plain script's: the store
-- runs the operation there (or, for an acquire naming a key, refuses it).
if m.keyed ~= '1' then return {'plain', '-1'} end

-- delete (keyed): as the plain delete; the key queue moves aside to be answered `D` by drain.
if op == 'delete' then
  redis.call('DEL', K_META, K_HOT)
  redis.call('SET', K_TOK, fmt(math.max(next_token, now)), 'PX', ARGV[3])
  if redis.call('EXISTS', K_KQ) == 1 then
    redis.call('UNLINK', K_DEAD)
    redis.call('RENAME', K_KQ, K_DEAD)
    redis.call('PEXPIRE', K_DEAD, ARGV[3])
  end
  redis.call('UNLINK', K_HOLD, K_LEASE, K_Q, K_HEAVY, K_WAITS, K_OUT, K_OUTT, K_KS, K_KO, K_RING,
    K_KH, K_BUSY, K_SLEEP, K_IDLE, KD.K_HEADS)
  return {'deleted', fmt(kdrain()), '-1'}
end

-- A keyed limiter's schedules name a key (`kschedule`); they are given back by the keyed
-- `unschedule` (keyed/unschedule.lua).
if op == 'schedule' then
  return finish({'invalid', 'key', 'this limiter is keyed: a schedule names a key'})
end


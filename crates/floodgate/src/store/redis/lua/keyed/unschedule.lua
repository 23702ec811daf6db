-- unschedule (keyed): give back a keyed schedule's unused, unstarted tail to the total's rate
-- and its key's (core/keyed/reserve.rs). The tokens' times are walked again from where both
-- rates stood before the schedule, exactly as kschedule took them.
-- ARGV: 4 reservation id, 5 count.   Reply: {'returned', n} | {'invalid', field, message}.
-- A reply made by finish() ends with the delay in us to the next deadline ('-1': none).

if op == 'unschedule' then
  local id, unused = ARGV[4], tonumber(ARGV[5])
  if not rate_limit and not KD.rate then
    return {'invalid', 'reservation', 'this limiter has no rate limit, so it has no reservations',
      '-1'}
  end
  if not unused or unused < 1 then return {'invalid', 'count', 'must be at least 1', '-1'} end
  advance()
  local tkey = redis.call('HGET', K_KH, 'r:' .. id)
  if not tkey then return finish({'returned', '0'}) end
  local k = kget(tkey)
  local r = k and KR.parse(k.res)
  if not r or r.id ~= id then
    redis.call('HDEL', K_KH, 'r:' .. id)
    return finish({'returned', '0'})
  end
  -- Still the tail of both rates: the same rates, and nothing taken after it.
  local trate, krate = KR.total_rate(), KR.key_rate()
  if r.trate ~= trate or r.krate ~= krate or (trate ~= '' and r.tend ~= tat)
      or (krate ~= '' and r.kend ~= k.tat) then
    return finish({'returned', '0'})
  end
  -- Tokens start in order: count those started by now, then keep those and as many of the
  -- rest as are not given back.
  local wt, wk, start = r.tbefore, r.kbefore, r.at
  local started = 0
  while started < r.count do
    local at, nt, nk = KR.step(r, wt, wk)
    if at > now then break end
    wt, wk, start = nt, nk, at
    started = started + 1
  end
  local returned = math.min(r.count - started, unused)
  if returned <= 0 then return finish({'returned', '0'}) end
  local kept = r.count - returned
  for _ = started + 1, kept do
    local at, nt, nk = KR.step(r, wt, wk)
    wt, wk, start = nt, nk, at
  end
  if wt then tat = wt end
  if wk then k.tat = wk end
  r.tend, r.kend, r.count, r.last = wt, wk, kept, start
  k.res = KR.format(r)
  kdirty(tkey)
  if kept == 0 then KR.forget(tkey, k) end
  -- The key's head (if its own rate held it) and everyone the total's rate held may run.
  wake_key(tkey)
  grant_waiters()
  maybe_drop(tkey)
  return finish({'returned', fmt(returned)})
end

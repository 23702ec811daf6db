-- unschedule: give back a reservation's unused, unstarted tail.
-- ARGV: 4 reservation id, 5 count.   Reply: {'returned', n} | {'invalid', field, message}.
-- A reply made by finish() ends with the delay in us to the next deadline ('-1': none).

if op == 'unschedule' then
  -- ARGV[4]: the reservation id, ARGV[5]: how many tokens the producer did not use.
  -- Reply: {'returned', n}. Mirrors LimiterCore::unschedule (core/reservation.rs).
  local id, unused = ARGV[4], tonumber(ARGV[5])
  if not rate_limit then return {'invalid', 'reservation', 'this limiter has no rate limit, so it has no reservations', '-1'} end
  if not unused or unused < 1 then return {'invalid', 'count', 'must be at least 1', '-1'} end
  advance()
  local res = split(redis.call('HGET', K_META, 'res') or '')
  if res[1] ~= id or tonumber(res[2]) ~= tat then return finish({'returned', '0'}) end
  local t = interval()
  local lead = t * rate_burst
  local ahead = tat - now
  local future = 0
  if ahead > lead then future = math.ceil((ahead - lead) / t) end
  local returned = math.min(future, unused, tonumber(res[3]))
  if returned <= 0 then return finish({'returned', '0'}) end
  tat = tat - t * returned
  redis.call('HSET', K_META, 'res', id .. '|' .. fmt(tat) .. '|' .. fmt(tonumber(res[3]) - returned))
  grant_waiters()
  return finish({'returned', fmt(returned)})
end


-- schedule: reserve rate tokens for a producer's fan-out.
-- ARGV: 4 count, 5 reservation id.
-- Reply: {'offsets', offset us...} | {'invalid', 'count', message}.
-- A reply made by finish() ends with the delay in us to the next deadline ('-1': none).

if op == 'schedule' then
  local count = tonumber(ARGV[4])
  if not rate_limit then return {'invalid', 'count', 'this limiter has no rate limit to schedule against', '-1'} end
  advance()
  local before = tat
  local reply = {'offsets'}
  local last, fit = 0, 0
  for _ = 1, count do
    local at = math.max(now, rate_at(1))
    last = at - now
    if last <= max_wait then fit = fit + 1 end
    reply[#reply + 1] = fmt(last)
    take_rate(at, 1)
  end
  -- The limiter's cap on waits bounds how far ahead a schedule reserves (as in core::schedule).
  if last > max_wait then
    tat = before
    -- Refused, but the time that passed (expiries, ended waits) is kept, as in the core.
    return finish({'invalid', 'count', 'would reserve tokens further ahead than this limiter\'s max_wait_ms ('
      .. fmt(math.floor(max_wait / 1000)) .. ' ms), which bounds a schedule; ' .. fmt(fit) .. ' fit now'})
  end
  c.scheduled = c.scheduled + count
  -- ARGV[5]: the reservation id the store drew; remembered with `tat` after it, so that its
  -- unused tail can be given back while nothing has been taken after it (core/reservation.rs).
  redis.call('HSET', K_META, 'res', ARGV[5] .. '|' .. fmt(tat) .. '|' .. fmt(count))
  return finish(reply)
end


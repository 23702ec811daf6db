-- kschedule: reserve `count` tokens of the total's rate and the key's for a fan-out; each start
-- offset satisfies both. All or nothing, bounded by max_wait (core/keyed/pacing.rs).
-- ARGV: 4 key (checked by the store), 5 count (1 to MAX_SCHEDULE, checked by the store),
-- 6 the reservation id the store drew ('' or '0': none is remembered).
-- Reply: {'offsets', offset us...} | {'invalid', 'count' | 'key', message} |
-- {'too_many_keys', max_keys, retry_after} (a new key beyond max_keys, as kacquire's).
-- A reply made by finish() ends with the delay in us to the next deadline ('-1': none).

if op == 'kschedule' then
  local tkey, count = ARGV[4], tonumber(ARGV[5])
  if not rate_limit and not KD.rate then
    return {'invalid', 'count',
      'this limiter has no rate limit (total or per key) to schedule against', '-1'}
  end
  advance()
  local k = kget(tkey)
  if not k then
    if redis.call('HLEN', K_KS) >= KD.max then
      KD.tmk = KD.tmk + 1
      return finish({'too_many_keys', fmt(KD.max), fmt(retry_hint(1))})
    end
    k = new_key(tkey)
  end
  local total_before, key_tat = tat, k.tat
  local key_before = k.tat
  local r = KD.rate
  local reply = {'offsets'}
  local last = 0
  for _ = 1, count do
    local at = now
    local ra = rate_at(1)
    if ra and ra > at then at = ra end
    if r then
      local ka = math.max(0, key_tat + r.t - r.t * r.burst)
      if ka > at then at = ka end
      key_tat = math.max(key_tat, at) + r.t
    end
    last = at - now
    reply[#reply + 1] = fmt(last)
    take_rate(at, 1)
  end
  local horizon = math.min(max_wait, MAX_SCHEDULE_AHEAD)
  if last > horizon then
    tat = total_before
    local fit = 0
    for i = 2, #reply do
      if tonumber(reply[i]) <= horizon then fit = fit + 1 end
    end
    maybe_drop(tkey)
    return finish({'invalid', 'count', "would reserve tokens further ahead than this limiter's " ..
      'max_wait_ms (' .. fmt(math.floor(horizon / 1000)) .. ' ms), which bounds a schedule; ' ..
      fmt(fit) .. ' fit now'})
  end
  k.tat = key_tat
  kdirty(tkey)
  c.scheduled = c.scheduled + count
  local id = ARGV[6] or ''
  if id ~= '' and id ~= '0' then
    KR.remember(tkey, k, id, total_before, key_before, count, now + last)
  end
  maybe_drop(tkey)
  return finish(reply)
end


-- An integer EWMA of latencies (core/adaptive's `ewma`: the first sample sets it).
local function gradient_ewma(avg, sample, weight)
  if avg == 0 then return math.max(sample, 1) end
  if sample >= avg then return avg + math.floor((sample - avg) / weight) end
  return avg - math.floor((avg - sample) / weight)
end

-- The gradient controller (core/adaptive/mod.rs, step for step: read it for the why).
local function gradient_feedback(outcome, latency)
  local ext = split(a_ext)
  local tolerance, probe_rounds = tonumber(ext[2]), tonumber(ext[3])
  local g = split(m.g_state or '0|0|0|0|0|0')
  local short, long, ceiling, credit = tonumber(g[1]), tonumber(g[2]), tonumber(g[3]), tonumber(g[4])
  local samples, backoff = tonumber(g[5]), tonumber(g[6])
  local function save()
    redis.call('HSET', K_META, 'g_state', table.concat({fmt(short), fmt(long), fmt(ceiling),
      fmt(credit), fmt(samples), fmt(backoff)}, '|'))
  end
  local news
  if not last_decrease then
    news = true
  elseif latency then
    news = now - latency >= last_decrease
  else
    news = now >= last_decrease + math.max(a_cool, ewma or 0)
  end
  local new = limit
  if outcome == 'throttled' then
    if not news then return limit end
    local deep = successes == 0 and last_decrease ~= nil
    last_decrease = now
    successes = 0
    credit = 0
    if ceiling > 0 and limit == ceiling + 1 and not deep then
      backoff = math.min(backoff + 1, GRADIENT_MAX_BACKOFF)
      save()
      return math.max(ceiling, a_min)
    end
    backoff = 0
    ceiling = math.max(math.min(in_use, limit) - 1, a_min)
    local lowered = math.floor(limit * a_dec)
    if deep then lowered = math.floor(lowered * a_dec) end
    new = math.max(math.min(lowered, limit - 1), a_min)
    save()
    return new
  end
  if outcome ~= 'ok' then return limit end
  if news and last_decrease then successes = successes + 1 end
  if latency then
    if long > 0 then latency = math.min(latency, long * 2) end
    short = gradient_ewma(short, latency, GRADIENT_SHORT_WEIGHT)
    long = gradient_ewma(long, latency, GRADIENT_LONG_WEIGHT)
    samples = math.min(samples + 1, GRADIENT_WARM_UP)
    local cooled = not last_decrease or now >= last_decrease + short
    if samples >= GRADIENT_WARM_UP and short > tolerance * long and cooled then
      local gradient = math.max(tolerance * long / short, 0.5)
      new = math.max(math.min(math.floor(limit * (0.8 + 0.2 * gradient)), limit), a_min)
      last_decrease = now
      successes = 0
      credit = 0
      ceiling = limit
      save()
      return new
    end
  end
  if in_use * 2 < limit then
    save()
    return limit
  end
  local step, threshold
  if ceiling == 0 then
    step, threshold = limit, limit
  elseif limit < ceiling then
    step, threshold = math.max(math.floor((ceiling - limit) / 2), 1), limit
  elseif limit == ceiling then
    step, threshold = 1, limit * probe_rounds * 2 ^ backoff
  else
    step, threshold = limit - ceiling, limit
  end
  if short > long then step = math.max(math.floor(step / 2), 1) end
  credit = credit + step
  if credit >= threshold then
    local permits = math.floor(credit / threshold)
    credit = credit - permits * threshold
    new = limit + permits
    if limit < ceiling then new = math.min(new, ceiling) end
    new = math.min(new, a_max)
    if ceiling > 0 and new >= ceiling * 2 then ceiling = 0 end
  end
  save()
  return new
end

